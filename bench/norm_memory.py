"""Peak memory (and step time) of real training steps for each `norm` choice (core/norm.py).

    python bench/norm_memory.py                 # R50-D8, batch 2, 256x512, fp32, 3 steps per norm
    python bench/norm_memory.py --quick         # r18 at 1/4 width, batch 2, 128x256: seconds
    python bench/norm_memory.py --mmap-threshold 131072   # glibc allocator pinned (see below)
    python bench/norm_memory.py --rounds 3 --steps 4      # interleaved rounds: steadier step times

Each norm runs in its own fresh process (peak RSS is a per-process high-water mark), one after
the other, and reports resource.getrusage(RUSAGE_SELF).ru_maxrss after each step. The step is
core.engine.train_one_step, the trainer's own (channels_last input, fp32 O0, SGD momentum 0.9,
CE + 0.4 x aux CE), on fixed random images and labels, so the numbers are the model's and not
the loader's. Ratios are against `bn` measured in the same run. On a shared machine wall times
swing with the other jobs (and OpenMP threads that spin while waiting make it worse); the CPU
time of the process is steadier, most of all with --threads 1 (and OMP_WAIT_POLICY=PASSIVE).

glibc's malloc raises its mmap threshold (up to 32 MiB) after freeing large blocks, so from the
second step on, most activation buffers come from heap arenas whose freed space it keeps: peak
RSS is then well above the live peak. --mmap-threshold N sets MALLOC_MMAP_THRESHOLD_=N in the
children (fixed threshold: blocks >= N bytes are always mmapped and returned when freed).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {"backbone": "r50", "base_channels": 64, "batch": 2, "crop": (256, 512)}
QUICK = {"backbone": "r18", "base_channels": 16, "batch": 2, "crop": (128, 256)}


def cpu_model() -> str:
    """'model name (family F model M, avx2/avx512f)' from /proc/cpuinfo (VMs often hide the name)."""
    try:
        info = {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in info.get("flags", "").split()]
        return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}"
                f", {os.cpu_count()} logical CPUs, {'/'.join(flags) or 'no avx2'})")
    except OSError:
        return platform.processor() or platform.machine()


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(norm: str, setup: dict, steps: int, threads: int) -> dict:
    """Build the model and run `steps` train steps in this (fresh) process."""
    import torch

    from core import build_model
    from core.amp import Amp
    from core.engine import train_one_step
    from core.losses import seg_loss
    from core.optim import build_sgd

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(setup["backbone"], 8, num_classes=19, norm=norm, base_channels=setup["base_channels"])
    model = model.train().to(memory_format=torch.channels_last)
    amp = Amp("O0", "cpu", torch.bfloat16)
    model = amp.prepare(model)
    optimizer = build_sgd(amp.optim_params, 0.01)
    loss_fn = functools.partial(seg_loss, aux_weight=0.4)
    gen = torch.Generator().manual_seed(1)
    h, w = setup["crop"]
    image = torch.randint(0, 256, (setup["batch"], h, w, 3), dtype=torch.uint8, generator=gen)
    label = torch.randint(0, 19, (setup["batch"], h, w), dtype=torch.uint8, generator=gen)
    step = functools.partial(train_one_step, amp=amp, optimizer=optimizer, loss_fn=loss_fn, device=torch.device("cpu"))
    if "batch" in inspect.signature(train_one_step).parameters:  # the loader's Batch (zero-copy slot views)
        from data_loader.loader import Batch
        inputs = {"batch": Batch(image, label, {})}
    else:
        inputs = {"image": image, "label": label}
    start_rss = max_rss_mib()
    times, cpu, peaks, losses = [], [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        result = step(model, **inputs)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peaks.append(max_rss_mib())
        losses.append(result.loss)
    return {"norm": norm, "start_rss_mib": start_rss, "peak_rss_mib": peaks, "step_s": times, "cpu_s": cpu,
            "loss": losses, "threads": torch.get_num_threads()}


def run_child(norm: str, args) -> dict:
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", norm, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"norm {norm!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from core.norm import NORMS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model (r18/16, 128x256) instead of R50-D8")
    parser.add_argument("--steps", type=int, default=3, help="train steps per norm (peak settles from step 2)")
    parser.add_argument("--norms", default=",".join(NORMS), help="comma-separated; 'bn' is the baseline")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the norms this many times, interleaved; report medians over rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ for the children")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(child(args.child, setup, args.steps, args.threads)))
        return 0
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        parser.error(f"unknown norm(s) {unknown}; choose from {', '.join(NORMS)}")
    if "bn" not in norms:
        norms.insert(0, "bn")
    rounds = [[run_child(n, args) for n in norms] for _ in range(max(1, args.rounds))]
    base = rounds[0][0]
    crop = "x".join(map(str, setup["crop"]))
    print(f"{setup['backbone']} (base {setup['base_channels']}) D8, batch {setup['batch']}, {crop}, fp32, "
          f"{args.steps} train steps per fresh process, {len(rounds)} round(s), {base['threads']} threads, "
          f"CPU: {cpu_model()}, malloc mmap threshold: {args.mmap_threshold or 'glibc default (dynamic)'}")
    print()
    print("| norm | peak RSS MiB | vs bn | peak - RSS before step 1, MiB | vs bn | step s | vs bn | CPU s/step | vs bn |")
    print("|---|---|---|---|---|---|---|---|---|")

    def summary(i):
        """Medians over rounds of: peak RSS, peak - RSS before step 1, and the median wall and CPU
        (process: all threads) time of the steps after the first."""
        runs = [r[i] for r in rounds]
        return [statistics.median(v) for v in zip(*[
            (max(r["peak_rss_mib"]), max(r["peak_rss_mib"]) - r["start_rss_mib"],
             statistics.median(r["step_s"][1:] or r["step_s"]), statistics.median(r["cpu_s"][1:] or r["cpu_s"]))
            for r in runs])]

    b_peak, b_step_mem, b_time, b_cpu = summary(0)
    for i, norm in enumerate(norms):
        peak, step_mem, t, c = summary(i)
        print(f"| {norm} | {peak:.0f} | {peak / b_peak:.3f} | {step_mem:.0f} | {step_mem / b_step_mem:.3f} | "
              f"{t:.2f} | {t / b_time:.2f} | {c:.2f} | {c / b_cpu:.2f} |")
    print()
    print("losses per step (round 1): " + "; ".join(
        f"{r['norm']}: " + ", ".join(f"{v:.4f}" for v in r["loss"]) for r in rounds[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "cpu": cpu_model(), "args": vars(args),
                                               "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
