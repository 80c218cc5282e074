"""Model FLOP utilisation: FLOPs of one training step, and the matmul peak they are compared to.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward of a copy of the
model built on the `meta` device (no memory, no compute, no effect on the real model's weights,
BN statistics or RNG). DESIGN.md's figure for R50-D8, batch 2, 256x512 is ~1.7 TFLOP; this
counts 1.675 TFLOP.

Peak: the best rate of a square matmul in the compute dtype, per process (at this process's
thread count). It is an achievable peak, not the datasheet's, so MFU reads as "share of what a
big GEMM reaches here". A peak measured while other work shares the cores is too low and makes
every MFU too high (seen here: 0.044 TFLOP/s cached on a busy machine against about 0.11 real,
so MFU read 2.5x too high for ever after), so the measurement defends itself:
  * best of several rounds, each ~0.15 s of back-to-back matmuls;
  * on the CPU each round also checks that this process actually got the cores: its CPU time
    over (wall time x threads) must be at least CLEAN_CPU_SHARE. A round below that ran on a
    shared machine and does not count as clean;
  * only a clean measurement is cached (in the file the caller names, keyed by the CPU model,
    its ISA flags that matter for GEMMs, dtype, threads and torch version); a busy one is used
    for this run with a warning and measured again next time;
  * `force=True` (run.py --measure-peak) re-measures and replaces it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.cpu import cpu_flags, cpu_model

PEAK_CACHE_NAME = "peak_tflops.json"
CLEAN_CPU_SHARE = 0.85  # below this share of the cores, another process was competing
ROUNDS, ROUND_SECONDS = 8, 0.15
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


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


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, cache_file: Optional[str] = None,
                        force: bool = False, log: Optional[Callable[[str], None]] = None,
                        clean_share: float = CLEAN_CPU_SHARE) -> float:
    """Peak TFLOP/s of one process here (cached in `cache_file` when measured on a quiet machine)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    key = cache_key(device, dtype)
    cache = _read_cache(cache_file) if cache_file else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and not force and entry.get("clean"):
        return float(entry["tflops"])
    result = _measure(device, dtype, clean_share)
    if not result["clean"]:
        log(f"peak FLOP/s: this process got only {result['cpu_share']:.0%} of its {result['threads']} thread(s)' "
            f"CPU time while measuring (another process was busy), so the peak of {result['tflops']:.3f} TFLOP/s "
            f"is probably too low and MFU too high; it is not cached. Re-measure on a quiet machine "
            f"(launch/run.py --measure-peak), or give --peak-tflops.")
    elif cache_file:
        cache[key] = result
        _write_cache(cache_file, cache)
    return result["tflops"]


def _measure(device: torch.device, dtype: torch.dtype, clean_share: float) -> dict:
    n = 2048 if device.type != "cpu" else 1024
    gen = torch.Generator().manual_seed(0)  # a private generator: the training RNG stays untouched
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = (lambda: getattr(torch, device.type).synchronize()) if device.type != "cpu" else (lambda: None)
    gemms = [(lambda: torch.mm(a, b), 2 * n ** 3)]
    if device.type == "cpu":
        # A model-like product as a 1x1 conv on channels_last memory, which oneDNN's JIT kernels
        # run (R50's layer4 shape, [4096 x 2048] @ [2048 x 512]): on the Zen 4 here 0.213 TFLOP/s in
        # fp32 where torch.mm (MKL) reached 0.196-0.200; a peak below what the model's convs
        # achieve would print an MFU above 1.
        x = torch.randn(1, 64, 64, 2048, generator=gen).to(dtype).permute(0, 3, 1, 2)
        w = torch.randn(512, 2048, 1, 1, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        gemms.append((lambda: torch.nn.functional.conv2d(x, w), 2 * 4096 * 2048 * 512))
    for gemm, _ in gemms:
        gemm()  # warm-up (library init, caches)
    sync()
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    best, best_clean, shares = 0.0, 0.0, []
    for r in range(ROUNDS):
        gemm, gemm_flops = gemms[r % len(gemms)]
        flops, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < ROUND_SECONDS:
            t0 = time.perf_counter()
            for _ in range(4):
                gemm()
            sync()
            flops += 4 * gemm_flops
            best = max(best, 4 * gemm_flops / (time.perf_counter() - t0) / 1e12)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        # On an accelerator the host thread mostly waits: the share test is for CPU matmuls only.
        share = cpu / (wall * threads) if device.type == "cpu" else 1.0
        shares.append(share)
        if share >= clean_share:
            best_clean = max(best_clean, flops / wall / 1e12)
    clean = best_clean > 0
    return {"tflops": best_clean if clean else best, "clean": clean, "cpu_share": max(shares), "threads": threads,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "n": n}


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    isa = f"|isa={_cpu_features()}" if device.type == "cpu" else ""
    return f"{_device_name(device)}{isa}|{dtype}|threads={threads}|torch={torch.__version__}"


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu:{cpu_model()}"
    mod = getattr(torch, device.type)
    return f"{device.type}:{mod.get_device_name(device)}"


def _cpu_features() -> str:
    """The GEMM-relevant ISA as torch sees it and as the CPU flags list it (two machines with the
    same model name can expose different flags under different hypervisors)."""
    flags = cpu_flags()
    return ",".join([torch.backends.cpu.get_cpu_capability()] + [f for f in CPU_FLAGS if f in flags])


def _read_cache(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, cache: dict) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(cache, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache directory is no reason to fail a run
