"""Benchmark of the C++ kernels against their numpy/torch reference, a memcpy of the same bytes,
and the library calls they replace (cv2.resize of the whole frame, mmseg's numpy+cv2
PhotoMetricDistortion, Pillow polygons), all measured in the same run.

    python bench/kernels.py                  # markdown tables on stdout
    python bench/kernels.py --json out.json  # also write the numbers

Times are medians over --repeat runs after one warm-up; the machine may be shared, so compare
the ratios rather than absolute times. The C++ kernel and its memcpy of the same bytes run alternately
(one call each, repeated), so both medians see the same background load. memcpy is
numpy's single-threaded copy; the kernels use --threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import ops  # noqa: E402

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
FRAME_HW = (1024, 2048)  # Cityscapes
CROP_HW = (512, 1024)  # mmseg DeepLabV3 Cityscapes crop
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclasses.dataclass
class BenchConfig:
    threads: int = 0  # 0: torch.get_num_threads()
    repeat: int = 7
    json: str = ""
    seed: int = 0


def parse_config(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return BenchConfig(**vars(parser.parse_args(argv)))  # unknown flags already failed in argparse


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: page faults, lazy tables, thread start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def alternating_median_ms(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median ms of each fn, calling them in turn (fn0, fn1, ..., fn0, ...) after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def memcpy_fn(total_bytes: int) -> Callable[[], object]:
    """A numpy copy moving the same number of bytes (half read, half written)."""
    src = np.ones(max(1, total_bytes // 2), np.uint8)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def cityscapes_like_polygons(rng, count=60):
    polygons = []
    for _ in range(count):
        centre = rng.uniform([0, 0], [FRAME_HW[1], FRAME_HW[0]])
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 80))))
        radii = rng.uniform(5, 400) * rng.uniform(0.3, 1.0, angles.size)
        polygons.append(np.round(centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]))
    return polygons, [int(v) for v in rng.integers(0, 34, count)]


def mmseg_photometric(img, brightness, contrast, saturation, hue):
    """mmseg 1.x PhotoMetricDistortion with all four steps drawn, contrast first."""
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    img = convert(convert(img, beta=brightness), alpha=contrast)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=saturation)
    hsv = cv2.cvtColor(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


@dataclasses.dataclass
class Case:
    op: str
    workload: str
    run: Callable[[], object]  # calls kernels.ops (the C++ path when the reference is off)
    bytes_moved: int  # bytes read + written by the C++ kernel; 0 = not bandwidth-bound
    baseline: Callable[[], object] | None = None  # the library call it replaces, if any
    baseline_name: str = ""


def build_cases(cfg: BenchConfig, threads: int) -> list[Case]:
    rng = np.random.default_rng(cfg.seed)
    h, w = FRAME_HW
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 34, (h, w), dtype=np.uint8)
    crop = rng.integers(0, 256, CROP_HW + (3,), dtype=np.uint8)
    batch = rng.integers(0, 256, (8,) + CROP_HW + (3,), dtype=np.uint8)
    table = np.full(256, 255, np.uint8)
    table[7:34] = rng.integers(0, 19, 27)
    pred = rng.integers(0, 19, (h, w), dtype=np.uint8)
    gt = np.where(rng.random((h, w)) < 0.1, 255, rng.integers(0, 19, (h, w))).astype(np.uint8)
    polygons, values = cityscapes_like_polygons(rng)
    canvas = np.zeros((h, w), np.uint8)
    out_f32 = torch.empty((8, 3) + CROP_HW)
    out_bf16 = torch.empty((8, 3) + CROP_HW, dtype=torch.bfloat16)
    cl = torch.channels_last
    out_f32_cl = torch.empty((8, 3) + CROP_HW, memory_format=cl)
    out_bf16_cl = torch.empty((8, 3) + CROP_HW, dtype=torch.bfloat16, memory_format=cl)
    ch, cw = CROP_HW
    frame_15 = (int(h * 1.5), int(w * 1.5))
    window_15 = (100, 200, ch, cw)
    # The source rows/cols a 1.5x crop reads (about crop / 1.5 per side), plus the crop written.
    resize_bytes = int(ch / 1.5 + 2) * int(cw / 1.5 + 2) * 3 + ch * cw * 3
    t = threads
    cases = [
        Case("resize_crop", "bilinear 2048x1024x3 -> x1.5, crop 512x1024, flip",
             lambda: ops.resize_crop(image, frame_15, window_15, True, "bilinear", num_threads=t), resize_bytes,
             lambda: np.ascontiguousarray(cv2.resize(image, frame_15[::-1])[100:612, 200:1224, :][:, ::-1]),
             "cv2.resize whole + crop + flip"),
        Case("resize_crop", "nearest label 2048x1024 -> x1.5, crop 512x1024",
             lambda: ops.resize_crop(label, frame_15, window_15, False, "nearest", num_threads=t), resize_bytes // 3,
             lambda: np.ascontiguousarray(cv2.resize(label, frame_15[::-1], interpolation=cv2.INTER_NEAREST)[100:612, 200:1224]),
             "cv2.resize whole + crop"),
        Case("label_histogram", "512x1024 window of a 1024x2048 label",
             lambda: ops.label_histogram(label, (0, 0, ch, cw)), ch * cw),
        Case("photometric", "512x1024x3, all four steps",
             lambda: ops.photometric(crop, 17.5, 1.3, 0.7, 11, True, num_threads=t), 2 * crop.nbytes,
             lambda: mmseg_photometric(crop, 17.5, 1.3, 0.7, 11), "mmseg numpy + cv2.cvtColor"),
        Case("photometric", "512x1024x3, brightness only",
             lambda: ops.photometric(crop, 17.5, None, None, None, True, num_threads=t), 2 * crop.nbytes),
        Case("normalize", "8x512x1024x3 uint8 -> float32 NCHW",
             lambda: ops.normalize(batch, MEAN, STD, True, torch.float32, out=out_f32, num_threads=t),
             batch.nbytes * 5),
        Case("normalize", "8x512x1024x3 uint8 -> bfloat16 NCHW",
             lambda: ops.normalize(batch, MEAN, STD, True, torch.bfloat16, out=out_bf16, num_threads=t),
             batch.nbytes * 3),
        # What a channels_last model (the CPU trainer) needs; the baseline is how core/engine.py
        # got there before: the NCHW kernel, then a full-size copy into channels_last memory
        # (preallocated here; the engine's .contiguous() also allocated it every step).
        Case("normalize", "8x512x1024x3 uint8 -> float32 channels_last",
             lambda: ops.normalize(batch, MEAN, STD, True, torch.float32, out=out_f32_cl, num_threads=t,
                                   memory_format=cl),
             batch.nbytes * 5,
             lambda: out_f32_cl.copy_(ops.normalize(batch, MEAN, STD, True, torch.float32, out=out_f32,
                                                    num_threads=t)),
             "C++ NCHW, then copy_ into channels_last"),
        Case("normalize", "8x512x1024x3 uint8 -> bfloat16 channels_last",
             lambda: ops.normalize(batch, MEAN, STD, True, torch.bfloat16, out=out_bf16_cl, num_threads=t,
                                   memory_format=cl),
             batch.nbytes * 3,
             lambda: out_bf16_cl.copy_(ops.normalize(batch, MEAN, STD, True, torch.bfloat16, out=out_bf16,
                                                     num_threads=t)),
             "C++ NCHW, then copy_ into channels_last"),
        Case("label_lookup", "1024x2048 id -> trainId",
             lambda: ops.label_lookup(label, table, num_threads=t), 2 * label.nbytes),
        Case("confusion_matrix", "1024x2048 uint8, 19 classes",
             lambda: ops.confusion_matrix(pred, gt, 19, num_threads=t), 2 * pred.nbytes),
        Case("fill_polygons", "1024x2048 canvas, 60 polygons of 3-80 vertices",
             lambda: ops.fill_polygons(canvas, polygons, values), 0),
    ]
    return cases


def measure(cfg: BenchConfig) -> dict:
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    rows = []
    for case in build_cases(cfg, threads):
        kernels.use_reference(True)
        ref_ms = median_ms(case.run, max(1, cfg.repeat // 2))
        kernels.use_reference(False)
        # The C++ call and its memcpy alternate, so both see the same load. Baselines run on their
        # own: interleaved, their large temporaries slowed the next kernel call by up to 1.5x.
        if case.bytes_moved:
            cpp_ms, copy_ms = alternating_median_ms([case.run, memcpy_fn(case.bytes_moved)], cfg.repeat)
        else:
            cpp_ms = median_ms(case.run, cfg.repeat)
        row = dict(op=case.op, workload=case.workload, reference_ms=ref_ms, cpp_ms=cpp_ms,
                   speedup_vs_reference=ref_ms / cpp_ms)
        if case.bytes_moved:
            row.update(gbps=case.bytes_moved / cpp_ms / 1e6, memcpy_gbps=case.bytes_moved / copy_ms / 1e6)
            row["fraction_of_memcpy"] = row["gbps"] / row["memcpy_gbps"]
        if case.baseline is not None:
            base_ms = median_ms(case.baseline, cfg.repeat)
            row.update(baseline=case.baseline_name, baseline_ms=base_ms, speedup_vs_baseline=base_ms / cpp_ms)
        rows.append(row)
        print(f"  measured {case.op}: {case.workload}", file=sys.stderr)
    return dict(threads=threads, ops=rows, resize_vs_cv2=measure_resize_scales(cfg, threads))


def measure_resize_scales(cfg: BenchConfig, threads: int) -> list[dict]:
    """Crop-aware resize against cv2.resize of the whole frame then crop, per scale."""
    rng = np.random.default_rng(cfg.seed)
    h, w = FRAME_HW
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rows = []
    for scale in SCALES:
        frame = (int(h * scale + 0.5), int(w * scale + 0.5))
        ch, cw = min(CROP_HW[0], frame[0]), min(CROP_HW[1], frame[1])
        y0, x0 = (frame[0] - ch) // 2, (frame[1] - cw) // 2
        cpp_ms = median_ms(lambda: ops.resize_crop(image, frame, (y0, x0, ch, cw), True, num_threads=threads), cfg.repeat)
        cv2_ms = median_ms(lambda: np.ascontiguousarray(
            cv2.resize(image, frame[::-1])[y0:y0 + ch, x0:x0 + cw][:, ::-1]), cfg.repeat)
        rows.append(dict(scale=scale, frame=f"{frame[1]}x{frame[0]}", cpp_ms=cpp_ms, cv2_ms=cv2_ms,
                         speedup=cv2_ms / cpp_ms, pixels_avoided=frame[0] * frame[1] / (ch * cw)))
    return rows


def markdown(result: dict) -> str:
    lines = [f"Threads: {result['threads']} (C++ kernels, cv2 and torch alike).", "",
             "| op | workload | reference ms | C++ ms | C++ vs reference | C++ GB/s | memcpy GB/s | of memcpy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["ops"]:
        bw = (f"{r['gbps']:.1f} | {r['memcpy_gbps']:.1f} | {100 * r['fraction_of_memcpy']:.0f}%"
              if "gbps" in r else "- | - | -")
        lines.append(f"| {r['op']} | {r['workload']} | {r['reference_ms']:.2f} | {r['cpp_ms']:.2f} | "
                     f"{r['speedup_vs_reference']:.1f}x | {bw} |")
    lines += ["", "| op | workload | library baseline | baseline ms | C++ ms | C++ vs baseline |", "|---|---|---|---:|---:|---:|"]
    for r in result["ops"]:
        if "baseline" in r:
            lines.append(f"| {r['op']} | {r['workload']} | {r['baseline']} | {r['baseline_ms']:.2f} | "
                         f"{r['cpp_ms']:.2f} | {r['speedup_vs_baseline']:.1f}x |")
    lines += ["", "Crop-aware resize (2048x1024x3, bilinear, 512x1024 crop, flip) against cv2.resize of the "
              "whole frame then crop:", "",
              "| scale | resized frame | cv2 whole+crop ms | resize_crop ms | speedup | frame px / crop px |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in result["resize_vs_cv2"]:
        lines.append(f"| {r['scale']} | {r['frame']} | {r['cv2_ms']:.2f} | {r['cpp_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['pixels_avoided']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    cfg = parse_config(argv)
    result = measure(cfg)
    print(markdown(result))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
