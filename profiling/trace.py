#!/usr/bin/env python
"""Where does a DeepLabV3 training step spend its time?

    python profiling/trace.py --steps 10                    # the demo model, as `python launch/run.py` trains it
    python profiling/trace.py --backbone r50 --base-channels 64 --crop 256x512 --global-batch 2 --steps 3
    torchrun --nproc-per-node 2 profiling/trace.py ...      # under a process group (rank 0 writes the reports)

Takes every flag of launch/run.py (the same parser: core.config.parse_config) plus its own, and
runs the trainer's own program: set_up_process, resolve_data, build_training (launch/assembly.py),
then --warmup + --steps iterations of run.py's loop (poly LR set per iteration), so the losses are
run.py's for the same flags and seed. The --steps iterations are traced; --out gets:

  ops.md/.json/.png        per-op self time (torch.profiler), top --top ops
  modules.md/.json/.png    per module at --depth: forward and backward ms, GFLOP, GFLOP/s, share
  breakdown.md/.png        data wait, input, forward, backward, communication, optimizer vs the step
  steps.json               those phases and the loss of every step
  trace.json               chrome trace (chrome://tracing or ui.perfetto.dev)
  summary.json             images/s, MFU, peak memory, py-spy results
  loader_worker{i}.svg     with --py-spy: each loader worker's flame graph over the traced steps
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# Run as a script from a checkout: make the repository importable even without `pip install -e .`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from core.config import TrainConfig, _f, parse_config  # noqa: E402

PROG = "profiling/trace.py"


@dataclass
class TraceOptions:
    steps: int = _f(10, "iterations traced, after --warmup")
    warmup: int = _f(2, "iterations run first exactly as in training (nothing attached, not reported)")
    depth: int = _f(2, "module depth of the per-module table (1: backbone/heads, 2: stages and head parts; "
                    "the ASPP branches are always rows of their own)")
    top: int = _f(25, "ops listed in the per-op table")
    out: str = _f(os.path.join("work", "trace"), "output directory")
    py_spy: bool = _f(False, "record every loader worker with py-spy into loader_worker{i}.svg (needs ptrace "
                      "permission; without it the rest of the trace still runs)")
    py_spy_rate: int = _f(100, "py-spy samples per second")


def parse(argv=None):
    """(TrainConfig, TraceOptions) from the command line; ValueError names the offending flag."""
    cfg, opts = parse_config(argv, extra=TraceOptions, prog=PROG,
                             description="Profile real training steps (see the module docstring / README.md).")
    check(cfg, opts)
    return cfg, opts


def check(cfg: TrainConfig, opts: TraceOptions) -> None:
    for name, low in (("steps", 1), ("warmup", 0), ("depth", 1), ("top", 1), ("py_spy_rate", 1)):
        if getattr(opts, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(opts, name)}")
    if opts.warmup + opts.steps > cfg.iters:
        raise ValueError(f"--warmup {opts.warmup} + --steps {opts.steps} exceeds --iters {cfg.iters}, the length of "
                         f"the poly LR schedule the steps follow; give --iters >= {opts.warmup + opts.steps}")
    if cfg.eval_only:
        raise ValueError("--eval-only: trace.py profiles training steps; it does not evaluate")
    if cfg.resume:
        raise ValueError("--resume: trace.py starts from the initial weights (--load-from FILE loads weights)")
    from launch import dist
    if dist.detect_env() is None and (cfg.nproc > 1 or cfg.nnodes > 1):
        raise ValueError(f"--nproc {cfg.nproc} / --nnodes {cfg.nnodes}: trace.py does not start ranks itself; run it "
                         f"under a launcher, e.g. torchrun --nproc-per-node {cfg.nproc} {PROG} ...")


def main(argv=None) -> int:
    try:
        cfg, opts = parse(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from launch import dist
    from launch.assembly import build_training, resolve_data, set_up_process
    from profiling.session import run_trace

    env, device = set_up_process(cfg)
    training = None
    try:
        data_root = resolve_data(cfg, env)
        training = build_training(cfg, env, device, data_root,
                                  log=(lambda text: print(text, flush=True)) if env.is_main else (lambda text: None))
        run_trace(cfg, opts, env, device, training)
        return 0
    except BaseException as exc:
        if not isinstance(exc, SystemExit) and env.distributed:
            print(f"[rank {env.rank}] failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        if training is not None:
            training.close()  # loader workers and shared memory
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
