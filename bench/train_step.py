"""Training-step speed and memory: the plain baseline against each optimisation alone and together.

    python bench/train_step.py --backbone r50 --batch-size 2 --crop 256x512 --steps 3
    python bench/train_step.py --only best          # one variant: baseline, best, or any name below
    python bench/train_step.py --backbone r18 --base-channels 16 --crop 128x256 --steps 10   # quick

Every variant is the trainer's own program (launch/assembly.build_training from a TrainConfig,
on the shared-memory loader, synthetic data unless --data) in its own fresh process, --warmup
untimed iterations then --steps timed ones (median). Any launch/run.py flag sets the common
base; each variant then adds its flags to the plain baseline: eager, fp32 (O0), NCHW, mmseg's
BN + ReLU, dilated convolutions computed whole (--no-atrous).

Columns: images/s; achieved TFLOP/s (the FLOPs the variant really computes: the plain count
minus what the padding-aware convolutions, the ASPP bottleneck's image-pool split and Winograd skip); MFU against the matmul peak of the variant's
compute dtype measured at the start of this run; effective MFU (the plain model's FLOPs over
the step time, above the real MFU when work is skipped); peak RSS of the process and the step's
own memory (peak RSS minus the RSS before the first step); the step's tensor peak (one more,
untimed step under torch.profiler's allocator accounting: the most bytes its tensors held at
once, what CUDA's max_memory_allocated measures, without the freed pages glibc keeps); the loss of the timed steps against
the baseline's (the same data and initialisation: exact variants agree to float rounding, bf16
and the leaky-ReLU norm do not). Ratios are to the baseline measured in the same run.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (finish, machine_line, markdown, measure_peaks, peak_rss_mib, rss_mib, run_child,  # noqa: E402
                    tensor_peak_mib)

from core.config import _f, parse_config  # noqa: E402
from launch.dist import cpu_threads  # noqa: E402

BASE_DEFAULTS = ["--preset", "cityscapes", "--backbone", "r50", "--batch-size", "2", "--crop", "256x512",
                 "--workers", "1", "--no-tensorboard", "--no-evaluate", "--no-checkpoints"]
PLAIN = ["--no-channels-last", "--no-compile", "--no-atrous", "--no-winograd", "--norm", "bn", "--opt-level", "O0"]
BF16 = ["--opt-level", "O1", "--amp-dtype", "bfloat16"]
FP32_BEST = ["--channels-last", "--atrous", "--winograd"]
VARIANTS = {  # name: (flags added to PLAIN, needs bf16 kernels)
    "baseline": ([], False),
    "channels_last": (["--channels-last"], False),
    "atrous": (["--atrous"], False),
    "winograd": (["--winograd"], False),
    "compile": (["--compile"], False),
    # the fused kernel works on channels-last memory (NCHW takes its slower torch path)
    "inplace-abn": (["--norm", "inplace-abn-residual", "--channels-last"], False),
    # what a user short of memory runs: the defaults with the memory-saving norm, without Winograd's
    # scratch buffers (~0.4 GB at R50-D8: transformed tiles and weights, core/winograd.py)
    "memory-saving": (FP32_BEST + ["--norm", "inplace-abn-residual", "--no-winograd"], False),
    "bf16-O1": (BF16, True),
    "bf16-O2": (["--opt-level", "O2", "--amp-dtype", "bfloat16"], True),
    "fp32-best": (FP32_BEST, False),
    "fp32-best+compile": (FP32_BEST + ["--compile"], False),
    "best": (FP32_BEST + BF16, True),
}


@dataclass
class BenchOptions:
    steps: int = _f(3, "timed iterations per variant (median)")
    warmup: int = _f(1, "untimed iterations first (a compiled variant compiles here)")
    only: str = _f("", f"run only this variant ({', '.join(VARIANTS)})")
    json: str = _f("", "also write the results to this JSON file")
    child: str = _f("", "internal: run one variant in this process and print its JSON")


def run_variant(argv, name: str) -> dict:
    """The child: one variant of the training step, timed, in this fresh process."""
    import torch

    from core.winograd import release_workspace
    from launch.assembly import build_training, resolve_data, set_up_process
    cfg, opts = parse_config(argv + PLAIN + VARIANTS[name][0], extra=BenchOptions, prog="bench/train_step.py")
    cfg = replace(cfg, iters=opts.warmup + opts.steps + 1)  # + 1 profiled for its tensor memory
    env, device = set_up_process(cfg)
    training = build_training(cfg, env, device, resolve_data(cfg, env), log=lambda s: None)
    try:
        plain, skipped = training.flops_per_step(), training.flops_skipped_per_step()
        rss_before = rss_mib()
        batches, times, losses = iter(training.loader), [], []
        for i in range(cfg.iters - 1):
            training.schedule.set_iteration(i)
            t0 = time.perf_counter()
            result = training.step(next(batches))
            times.append(time.perf_counter() - t0)
            losses.append(result.loss)
        timed = times[opts.warmup:]
        rss_peak = peak_rss_mib()  # before the profiled step below, whose bookkeeping adds to RSS
        training.schedule.set_iteration(cfg.iters - 1)
        batch = next(batches)
        release_workspace()  # Winograd's kept scratch buffers: allocated again, so counted, in this step
        tensor_peak = tensor_peak_mib(lambda: training.step(batch))
        return {"variant": name, "median_s": statistics.median(timed), "times_s": timed, "losses": losses[opts.warmup:],
                "flops_plain": plain, "flops_real": plain - skipped, "rss_before_mib": rss_before,
                "peak_rss_mib": rss_peak, "tensor_peak_mib": tensor_peak,
                "dtype": "bfloat16" if training.amp.compute_dtype == torch.bfloat16
                else "float32", "threads": torch.get_num_threads(), "batch": training.batch_size}
    finally:
        training.close()


def main(argv=None) -> int:
    argv = BASE_DEFAULTS + list(sys.argv[1:] if argv is None else argv)
    cfg, opts = parse_config(argv, extra=BenchOptions, prog="bench/train_step.py")
    if opts.child:
        import json
        print(json.dumps(run_variant(argv[:argv.index("--child")] if "--child" in argv else argv, opts.child)))
        return 0
    if opts.only and opts.only not in VARIANTS:
        raise SystemExit(f"--only: {opts.only!r} is not one of {', '.join(VARIANTS)}")
    from core.cpu import bf16_here
    bf16_ok, why = bf16_here()
    print(f"machine: {machine_line()}")
    print(f"case: {'bf16 kernels present: bf16 variants measured' if bf16_ok else 'no bf16 kernels (' + why + '): bf16 variants left out, they would run on a slow emulation'}")
    names = [opts.only] if opts.only else [n for n, (_, needs) in VARIANTS.items() if bf16_ok or not needs]
    if opts.only and VARIANTS[opts.only][1] and not bf16_ok:
        print(f"warning: {opts.only} uses bf16 without bf16 kernels here: expect it to be slow", file=sys.stderr)
    threads = cpu_threads(cfg.threads, 1)
    peaks = measure_peaks(["float32"] + (["bfloat16"] if bf16_ok else []), threads)
    print("matmul peak: " + ", ".join(f"{d} {t:.3f} TFLOP/s" for d, t in peaks.items()) + f" ({threads} threads)")
    print(f"model {cfg.backbone} base {cfg.base_channels} OS{cfg.output_stride}, batch {cfg.batch_size}, crop "
          f"{cfg.crop[0]}x{cfg.crop[1]}, {opts.warmup} warm-up + {opts.steps} timed steps per variant", flush=True)
    rows = []
    for name in names:
        r = run_child(__file__, [a for a in argv if a not in ("--child",)], name)
        if "error" not in r:
            t = r["median_s"]
            peak = peaks.get(r["dtype"]) or peaks["float32"]
            r.update(images_per_s=r["batch"] / t, tflops=r["flops_real"] / t / 1e12,
                     mfu=r["flops_real"] / t / 1e12 / peak, eff_mfu=r["flops_plain"] / t / 1e12 / peak,
                     step_mem_mib=r["peak_rss_mib"] - r["rss_before_mib"])
        rows.append(r)
        print(f"{name}: " + (r["error"] if "error" in r else
                            f"{r['images_per_s']:.3f} images/s, step {r['median_s']:.2f} s, MFU {r['mfu']:.2f}, "
                            f"effective MFU {r['eff_mfu']:.2f}, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                            f"step tensor peak {r['tensor_peak_mib']:.0f} MiB"), flush=True)
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["variant"] == "baseline"), None)
    for r in ok:
        if base is not None:
            r["speedup"] = base["median_s"] / r["median_s"]
            r["mem_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
            r["step_mem_ratio"] = r["step_mem_mib"] / base["step_mem_mib"]
            r["tensor_ratio"] = r["tensor_peak_mib"] / base["tensor_peak_mib"]
            n = min(len(r["losses"]), len(base["losses"]))
            r["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], base["losses"][:n]))
    columns = [("variant", "variant", ""), ("images/s", "images_per_s", "{:.3f}"), ("vs baseline", "speedup", "{:.2f}x"),
               ("TFLOP/s", "tflops", "{:.3f}"), ("MFU", "mfu", "{:.2f}"), ("effective MFU", "eff_mfu", "{:.2f}"),
               ("dtype", "dtype", ""), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("vs baseline", "mem_ratio", "{:.2f}"),
               ("step memory MiB", "step_mem_mib", "{:.0f}"), ("vs baseline", "step_mem_ratio", "{:.2f}"),
               ("step tensor peak MiB", "tensor_peak_mib", "{:.0f}"), ("vs baseline", "tensor_ratio", "{:.2f}"),
               ("loss vs baseline", "loss_rel", "{:.1e}")]
    print("\n" + markdown(ok, columns))
    return finish(rows, opts.json, peaks)


if __name__ == "__main__":
    sys.exit(main())
