"""Model FLOP utilisation: FLOPs of one training step, and the matmul peak they are compared to.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward of a copy of the
model built on the `meta` device (no memory, no compute, no effect on the real model's weights,
BN statistics or RNG). DESIGN.md's figure for R50-D8, batch 2, 256x512 is ~1.7 TFLOP; this
counts 1.675 TFLOP.

Peak: the best rate of a square matmul in the compute dtype over ~0.3 s, cached per machine,
device, dtype and thread count in ~/.cache/deeplab-trainer/peak_tflops.json (or pass
--peak-tflops). It is an achievable peak, not the datasheet's, so MFU reads as "share of what
a big GEMM reaches here".
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "deeplab-trainer", "peak_tflops.json")


def count_train_step_flops(build: Callable[[], torch.nn.Module], batch: int, crop_hw) -> int:
    """FLOPs of forward + backward of `build()` on a [batch, 3, H, W] input (per process)."""
    with torch.device("meta"):
        model = build()
    model.train()
    x = torch.empty(batch, 3, *crop_hw, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        loss = sum(v.float().sum() for v in out.values())
        loss.backward()
    return int(counter.get_total_flops())


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3,
                        use_cache: bool = True) -> float:
    key = f"{_device_name(device)}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    cache = _read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    n = 2048 if device.type != "cpu" else 1024
    gen = torch.Generator().manual_seed(0)  # a private generator: the training RNG stays untouched
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = (lambda: getattr(torch, device.type).synchronize()) if device.type != "cpu" else (lambda: None)
    torch.mm(a, b)  # warm-up (library init, caches)
    sync()
    best = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
    if use_cache:
        cache[key] = best
        _write_cache(cache)
    return best


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"cpu:{name}"
    mod = getattr(torch, device.type)
    return f"{device.type}:{mod.get_device_name(device)}"


def _read_cache() -> dict:
    try:
        with open(CACHE) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    try:
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        tmp = f"{CACHE}.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(cache, fh, indent=1)
        os.replace(tmp, CACHE)
    except OSError:
        pass  # a read-only home is no reason to fail a run
