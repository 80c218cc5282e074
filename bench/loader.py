"""Training-data throughput: this project's loader against a plain torch DataLoader, in one run.

    python bench/loader.py [--data ROOT] [--pack PATH] --workers N --batch-size B --images N
                           [--only project|reference]

Pipelines (all mmseg's Cityscapes train pipeline: scale (2048,1024) x U(0.5,2), 512x1024 crop with
cat_max_ratio 0.75, flip, photometric distortion):
  reference      torch.utils.data.DataLoader, same workers and batch size, each item: cv2.imread
                 image + label, cv2.resize of the whole image, crop, flip, distort, normalise to
                 float CHW (data_loader.reference_pipeline) and default collate.
  project-png    data_loader.build_train_loader from the PNGs (uint8 out; normalising happens
                 on the device).
  project-pack   the same from the pre-decoded pack (built into a temp folder if --pack is absent).
  decode ceiling PNG image + label decoding only, in as many parallel processes as workers
                 (OpenCV and the project's decoder): no loader that decodes PNGs can beat it.
  start methods  this loader with workers started by fork / forkserver (the default) / spawn, each
                 in a fresh process: seconds from build_train_loader() to the first batch, for the
                 first loader of the process and for a second one, and the steady rate after that.
                 (fork is measured from a parent whose thread pools are idle, the only case where
                 it is safe; the loader never picks it itself: data_loader/processes.py.)
Rates are steady state: the clock starts when the first batch arrives (worker start-up excluded).
The machine may be shared, so every pipeline is measured --rounds times, interleaved, and the
best round is reported.
Without --data a synthetic 2048x1024 set is generated once into the cache (see
data_loader.synthetic.default_dataset). Every worker and both pipelines use one thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_loader.cityscapes import CityscapesIndex  # noqa: E402
from data_loader.decode import pyspng, read_image_rgb, read_label  # noqa: E402
from data_loader.loader import build_train_loader  # noqa: E402
from data_loader.processes import get_context  # noqa: E402
from data_loader.reference_pipeline import normalize_chw, reference_train_sample  # noqa: E402
from data_loader.transforms import TrainTransformConfig  # noqa: E402

CROP = (512, 1024)
SCALE = (2048, 1024)


@dataclass
class BenchConfig:
    data: str | None
    pack: str | None
    workers: int
    batch_size: int
    images: int
    only: str | None
    seed: int
    rounds: int
    probe_start_method: str | None = None


class ReferenceDataset(torch.utils.data.Dataset):
    def __init__(self, samples, seed: int):
        self.samples, self.seed = samples, seed
        self.cfg = TrainTransformConfig(crop_size=CROP, scale=SCALE)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image_path, label_path = self.samples[i]
        image = cv2.imread(image_path)
        label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        rng = np.random.default_rng()  # a baseline: only the statistics of the draws matter
        image, label = reference_train_sample(image, label, rng, self.cfg)
        return torch.from_numpy(normalize_chw(image)), torch.from_numpy(label.astype(np.int64))


def _single_thread_worker(_):
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def measure(batches, batch_size: int, images: int) -> float:
    """Images/s over `images` images after the first batch (start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, seen = time.perf_counter(), 0
    while seen < images:
        next(iterator)
        seen += batch_size
    return seen / (time.perf_counter() - start)


def reference_rate(cfg: BenchConfig, samples) -> float:
    loader = torch.utils.data.DataLoader(
        ReferenceDataset(samples, cfg.seed), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.workers, worker_init_fn=_single_thread_worker, persistent_workers=cfg.workers > 0,
        prefetch_factor=2 if cfg.workers > 0 else None,
        multiprocessing_context=get_context(None) if cfg.workers > 0 else None)

    def endless():
        while True:
            yield from loader

    return measure(endless(), cfg.batch_size, cfg.images)


def project_rate(cfg: BenchConfig, pack: str | None) -> float:
    with build_train_loader(cfg.data, "train", cfg.batch_size, crop=CROP, scale=SCALE, workers=cfg.workers,
                            seed=cfg.seed, pack=pack) as loader:
        return measure(loader, cfg.batch_size, cfg.images)


def _decode_chunk(args) -> None:
    samples, first, count, use_opencv = args
    cv2.setNumThreads(1)
    for k in range(first, first + count):
        image_path, label_path = samples[k % len(samples)]
        if use_opencv:
            cv2.imread(image_path)
            cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        else:
            read_image_rgb(image_path)
            read_label(label_path)


def decode_ceiling(samples, processes: int, count: int, use_opencv: bool) -> float:
    """Image + label pairs decoded per second by `processes` parallel processes, nothing else."""
    processes = max(processes, 1)
    with get_context(None).Pool(processes) as pool:
        pool.map(_decode_chunk, [(samples, 0, 1, use_opencv)] * processes)  # warm up
        start = time.perf_counter()
        pool.map(_decode_chunk, [(samples, p * count, count, use_opencv) for p in range(processes)], chunksize=1)
        return processes * count / (time.perf_counter() - start)


def probe_start_method(cfg: BenchConfig, method: str) -> dict:
    """In this (fresh) process: start-up of a first and a second loader, then the steady rate."""
    first_batch = []
    rate = 0.0
    for attempt in range(2):
        t0 = time.perf_counter()
        with build_train_loader(cfg.data, "train", cfg.batch_size, crop=CROP, scale=SCALE, workers=cfg.workers,
                                seed=cfg.seed, start_method=method) as loader:
            batches = iter(loader)
            next(batches)
            first_batch.append(time.perf_counter() - t0)
            if attempt == 1:
                rate = measure(batches, cfg.batch_size, cfg.images)
    return {"method": method, "first_loader_s": first_batch[0], "second_loader_s": first_batch[1],
            "images_per_s": rate}


def start_method_costs(cfg: BenchConfig, methods=("fork", "forkserver", "spawn")) -> list:
    rows = []
    for method in methods:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--data", cfg.data, "--workers",
                              str(cfg.workers), "--batch-size", str(cfg.batch_size), "--images", str(cfg.images),
                              "--seed", str(cfg.seed), "--probe-start-method", method],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"start-method probe {method} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Cityscapes-layout root (default: a synthetic 2048x1024 set)")
    p.add_argument("--pack", default=None, help="pack folder of --data (default: packed into a temp folder)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--images", type=int, default=40, help="images measured per pipeline")
    p.add_argument("--only", choices=("project", "reference", "startup"), default=None)
    p.add_argument("--probe-start-method", default=None, help=argparse.SUPPRESS)  # internal: one probe
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved measurements per pipeline (best is kept)")
    return BenchConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if cfg.data is None:
        from data_loader.synthetic import default_dataset

        cfg.data = default_dataset(num_train=8, num_val=0, size=(2048, 1024))
        print(f"data: synthetic 2048x1024 set at {cfg.data}")
    if cfg.probe_start_method:
        print(json.dumps(probe_start_method(cfg, cfg.probe_start_method)))
        return 0
    if cfg.only == "startup":
        cfg.only = "startup-only"
    samples = CityscapesIndex(cfg.data, "train").samples
    print(f"{len(samples)} train images, workers={cfg.workers}, batch={cfg.batch_size}, {cfg.images} images "
          f"per pipeline, crop {CROP[0]}x{CROP[1]}, decoder {'pyspng' if pyspng else 'OpenCV'}")
    rates: dict[str, float] = {}

    def keep_best(name, rate):
        rates[name] = max(rates.get(name, 0.0), rate)

    if cfg.only in (None, "startup-only"):
        print("\nworker start method (each in a fresh process; seconds to the first batch, then steady rate):")
        print("| start method | first loader s | second loader s | images/s |\n|---|---:|---:|---:|")
        for row in start_method_costs(cfg):
            print(f"| {row['method']} | {row['first_loader_s']:.2f} | {row['second_loader_s']:.2f} | "
                  f"{row['images_per_s']:.2f} |")
        if cfg.only == "startup-only":
            return 0
    pack, tmp = cfg.pack, None
    if cfg.only in (None, "project") and pack is None:
        from data_loader.pack import write_pack

        tmp = tempfile.TemporaryDirectory(prefix="bench-pack-")
        with open(os.devnull, "w") as quiet:
            write_pack(cfg.data, "train", tmp.name, stream=quiet)
        pack = tmp.name
    per_process = max(2, cfg.images // max(cfg.workers, 1) // 2)
    for _ in range(cfg.rounds):
        keep_best("decode ceiling (OpenCV)", decode_ceiling(samples, cfg.workers, per_process, True))
        keep_best("decode ceiling (project decoder)", decode_ceiling(samples, cfg.workers, per_process, False))
        if cfg.only in (None, "reference"):
            keep_best("reference", reference_rate(cfg, samples))
        if cfg.only in (None, "project"):
            keep_best("project-png", project_rate(cfg, None))
            keep_best("project-pack", project_rate(cfg, pack))
    if tmp is not None:
        tmp.cleanup()
    for name, rate in rates.items():
        print(f"{name}: {rate:.2f} images/s")
    ratios = [("project-png / reference", "project-png", "reference"),
              ("project-pack / reference", "project-pack", "reference"),
              ("project-png / decode ceiling (project decoder)", "project-png", "decode ceiling (project decoder)"),
              ("project-png / decode ceiling (OpenCV)", "project-png", "decode ceiling (OpenCV)")]
    for label, a, b in ratios:
        if a in rates and b in rates:
            print(f"ratio {label}: {rates[a] / rates[b]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
