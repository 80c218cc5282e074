"""Padding-aware atrous convolution (core/atrous.py) against oneDNN's conv in NCHW and in
channels_last, all measured in the same run.

    python bench/atrous.py            # R50-D8's ASPP (2048->512, d 12/24/36) and layer4 (512->512,
                                      # d 4 and 2) 3x3 convs, batch 2, feature maps 32x64 and 64x128
    python bench/atrous.py --quick    # narrower convs (256->128 / 128->128) on 32x64 only
    python bench/atrous.py --threads 1 --clock cpu   # CPU time of one thread: immune to other jobs
    python bench/atrous.py --dtype bfloat16 --maps 32x64 --json out.json

Columns: oneDNN NCHW, oneDNN channels_last, "taps" (all three products by per-tap matrix
products) and "hybrid" (oneDNN channels_last forward and backward-data, per-tap grad_weight).
Each algorithm gets its input in its own memory format (NCHW for "nchw", channels_last for the
others), as the issue measured. The algorithms of one case run in turn (one call each, repeated
--repeat times after a warm-up) and the table shows medians, so all see the same background
load; on a shared machine compare the ratios (to NCHW of the same case), not the times. With
2 threads on 2 cores shared with other jobs, every OpenMP region waits for a descheduled thread,
which punishes the many small ops of "taps" most; --threads 1 --clock cpu shows the work itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import atrous, atrous_plan  # noqa: E402
from core.model import build_model  # noqa: E402

ALGOS = ("nchw", "channels_last", "taps", "hybrid")
# (label, cin, cout, dilations) of R50-D8 and of the --quick version.
FULL = [("ASPP", 2048, 512, (12, 24, 36)), ("layer4", 512, 512, (4, 2))]
QUICK = [("ASPP/8", 256, 128, (12, 24, 36)), ("layer4/4", 128, 128, (4, 2))]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


def make_call(algo, x, w, g, d, train):
    fmt = torch.contiguous_format if algo == "nchw" else torch.channels_last
    x = x.contiguous(memory_format=fmt).requires_grad_(train)
    w = w.contiguous(memory_format=fmt).requires_grad_(train)
    g = g.contiguous(memory_format=fmt)

    def call():
        with torch.set_grad_enabled(train):
            if algo in ("taps", "hybrid"):
                y = atrous.atrous_conv2d(x, w, None, d, algo)
            else:
                y = F.conv2d(x, w, None, 1, d, d)
            if train:
                y.backward(g)
                x.grad = w.grad = None
    return call


def measure(calls, repeat, clock):
    for c in calls:
        c()  # warm-up: oneDNN primitive creation, allocator
    times = [[] for _ in calls]
    for _ in range(repeat):
        for c, t in zip(calls, times):
            start = clock()
            c()
            t.append(clock() - start)
    return [statistics.median(t) * 1e3 for t in times]


def check_issue_counts():
    """The issue's figures: ~59% of the ASPP dilated convs' MACs read only padding at 32x64,
    about a third at 64x128 (R50-D8, crops 256x512 and 512x1024)."""
    with torch.device("meta"):
        model = build_model("r50", output_stride=8)
    rows = []
    for crop in ((256, 512), (512, 1024)):
        counts = atrous_plan.count_skipped_macs(model, (2, 3) + crop)
        aspp = [v for k, v in counts["layers"].items() if k.startswith("decode_head.")]
        l4 = [v for k, v in counts["layers"].items() if k.startswith("backbone.layer4.")]
        frac = lambda vs: 1 - sum(n for _, n in vs) / sum(p for p, _ in vs)
        rows.append(f"| {crop[0]}x{crop[1]} | {crop[0] // 8}x{crop[1] // 8} | {frac(aspp):.1%} | "
                    f"{frac(l4):.1%} | {(counts['plain'] - counts['needed']) / 1e9:.1f} |")
    print("| crop | feature map | ASPP dilated MACs skipped | layer4 dilated MACs skipped "
          "| GMAC skipped per forward (batch 2) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="narrow convs, 32x64 only")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--maps", default="", help="feature maps HxW,HxW (default 32x64,64x128)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time, with --threads 1 immune to other load")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"batch {args.batch}, median of {args.repeat} interleaved repeats, {args.clock} clock\n")
    check_issue_counts()
    print("\nms (ratio to NCHW of the same case and pass); `rule` is default_algorithm's choice "
          "(train for fwd+bwd, eval for fwd) for an NCHW / a channels_last model; "
          "`best` is this run's fastest.\n")
    print("| conv | map | d | MACs needed | pass | oneDNN NCHW | oneDNN channels_last | taps | hybrid | rule | best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    maps = [(32, 64)] if args.quick else [(32, 64), (64, 128)]
    if args.maps:
        maps = [tuple(int(v) for v in m.split("x")) for m in args.maps.split(",")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for h, w in maps:
        for label, cin, cout, dils in (QUICK if args.quick else FULL):
            x = torch.randn(args.batch, cin, h, w, generator=gen).to(dtype)
            wt = (torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5).to(dtype)
            g = torch.randn(args.batch, cout, h, w, generator=gen).to(dtype)
            for d in dils:
                plain, needed = atrous.conv_macs(args.batch, cin, cout, h, w, d)
                for train in (False, True):
                    ms = measure([make_call(a, x, wt, g, d, train) for a in ALGOS], args.repeat, clock)
                    rule = " / ".join(atrous.default_algorithm(args.batch, cin, cout, h, w, d, "cpu", train, dtype, cl)
                                      for cl in (False, True))
                    best = ALGOS[ms.index(min(ms))]
                    cells = " | ".join(f"{t:.0f} ({t / ms[0]:.2f})" for t in ms)
                    print(f"| {label} {cin}->{cout} | {h}x{w} | {d} | {needed / plain:.0%} | "
                          f"{'fwd+bwd' if train else 'fwd'} | {cells} | {rule} | {best} |", flush=True)
                    results.append(dict(conv=label, cin=cin, cout=cout, h=h, w=w, d=d, train=train,
                                        needed_fraction=needed / plain, rule=rule, best=best,
                                        ms=dict(zip(ALGOS, ms))))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
                       "dtype": args.dtype, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
