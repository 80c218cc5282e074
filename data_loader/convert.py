"""Write gtFine *_labelTrainIds.png from *_polygons.json (or *_labelIds.png when no JSON exists).

    python -m data_loader.convert ROOT [--nproc N] [--force] [--polygon-backend kernel|pillow]

This is the step mmseg runs with tools/convert_datasets/cityscapes.py. Files that already have a
*_labelTrainIds.png are skipped unless --force. Outputs are written to a temporary name and
renamed, so an interrupted run never leaves a truncated PNG that a later run would skip.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from dataclasses import dataclass

import cv2

from .cityscapes import (
    ID_TO_TRAINID,
    LABEL_IDS_SUFFIX,
    LABEL_SUFFIX,
    POLYGONS_SUFFIX,
    VALID_LABEL_IDS,
    DatasetError,
    check_label_values,
)
from .decode import read_label
from .polygons import polygons_to_label
from .progress import Progress


@dataclass
class ConvertConfig:
    root: str
    nproc: int = 1
    force: bool = False
    polygon_backend: str = "kernel"


@dataclass
class Job:
    source: str  # a *_polygons.json or *_labelIds.png
    output: str  # the *_labelTrainIds.png to write


def find_jobs(root: str, force: bool) -> tuple[list[Job], int]:
    """Conversion jobs under ROOT/gtFine and the number of already-converted files skipped."""
    gt_dir = os.path.join(root, "gtFine")
    if not os.path.isdir(gt_dir):
        raise DatasetError(f"{gt_dir}: missing folder (expected a Cityscapes layout under {root})")
    jobs, skipped = [], 0
    for dirpath, _, filenames in sorted(os.walk(gt_dir)):
        names = set(filenames)
        stems = {n[: -len(POLYGONS_SUFFIX)] for n in names if n.endswith(POLYGONS_SUFFIX)}
        stems |= {n[: -len(LABEL_IDS_SUFFIX)] for n in names if n.endswith(LABEL_IDS_SUFFIX)}
        for stem in sorted(stems):
            output = os.path.join(dirpath, stem + LABEL_SUFFIX)
            if not force and os.path.exists(output):
                skipped += 1
                continue
            json_name = stem + POLYGONS_SUFFIX
            source = json_name if json_name in names else stem + LABEL_IDS_SUFFIX
            jobs.append(Job(os.path.join(dirpath, source), output))
    return jobs, skipped


def convert_one(job: Job, polygon_backend: str = "kernel") -> None:
    if job.source.endswith(POLYGONS_SUFFIX):
        train_ids = polygons_to_label(job.source, "trainIds", polygon_backend)
    else:
        from kernels import ops

        label_ids = read_label(job.source)
        check_label_values(label_ids, job.source, VALID_LABEL_IDS, kind="label id")
        train_ids = ops.label_lookup(label_ids, ID_TO_TRAINID, num_threads=1)
    tmp = f"{job.output}.tmp{os.getpid()}.png"
    if not cv2.imwrite(tmp, train_ids):
        raise DatasetError(f"{job.output}: cannot write")
    os.replace(tmp, job.output)


def _run_job(args) -> tuple[str, str | None]:
    job, backend = args
    try:
        convert_one(job, backend)
        return job.source, None
    except Exception as e:  # reported with the file name by the parent
        return job.source, f"{type(e).__name__}: {e}"


def convert(cfg: ConvertConfig, stream=None) -> tuple[int, int]:
    """Convert every pending file; returns (converted, skipped). Raises DatasetError listing failures."""
    if cfg.nproc < 1:
        raise ValueError(f"nproc={cfg.nproc}: expected >= 1")
    if cfg.polygon_backend not in ("pillow", "kernel"):
        raise ValueError(f"polygon_backend={cfg.polygon_backend!r}: expected 'pillow' or 'kernel'")
    jobs, skipped = find_jobs(os.path.abspath(cfg.root), cfg.force)
    progress = Progress(len(jobs), "convert", stream)
    failures = []
    work = [(job, cfg.polygon_backend) for job in jobs]
    if cfg.nproc == 1 or len(jobs) <= 1:
        results = map(_run_job, work)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(cfg.nproc, len(jobs)))
        results = pool.imap_unordered(_run_job, work, chunksize=4)
    try:
        for source, error in results:
            if error is not None:
                failures.append((source, error))
            progress.update()
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if failures:
        lines = "\n".join(f"  {msg}" if msg.startswith(src) else f"  {src}: {msg}" for src, msg in sorted(failures))
        raise DatasetError(f"{len(failures)} of {len(jobs)} files failed to convert:\n{lines}")
    return len(jobs), skipped


def parse_args(argv=None) -> ConvertConfig:
    p = argparse.ArgumentParser(prog="python -m data_loader.convert", description=__doc__.split("\n")[0])
    p.add_argument("root", help="Cityscapes root (holds gtFine/)")
    p.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--force", action="store_true", help="rewrite files that already exist")
    p.add_argument(
        "--polygon-backend",
        choices=("pillow", "kernel"),
        default="kernel",
        help="rasteriser for polygons: kernels ops.fill_polygons (default; pixel-identical to Pillow, "
        "tested) or Pillow ImageDraw, which cityscapesscripts uses",
    )
    return ConvertConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        converted, skipped = convert(cfg)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {converted} files, skipped {skipped} already converted (use --force to redo them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
