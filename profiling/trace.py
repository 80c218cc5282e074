"""Where does a DeepLabV3 training step spend its time?

    python profiling/trace.py --steps 20                       # synthetic data, r18, small crops
    python profiling/trace.py --data /data/cityscapes --backbone r50 --crop 512x1024 --opt-level O1

Runs real training steps (the trainer's own step) and writes to --out:
  ops.md / ops.json         per-op self time (torch.profiler), top --top ops
  modules.md / modules.json per-module forward time (hooks; depth --depth)
  steps.json                data-wait vs compute per step
  trace.json                a chrome trace (open in chrome://tracing or ui.perfetto.dev)
  ops.png, modules.png      bar charts of the two tables
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



@dataclass
class TraceConfig:
    data: Optional[str] = None          # Cityscapes-layout root; None = the embedded synthetic set
    backbone: str = "r18"
    output_stride: int = 8
    crop: str = "128x256"               # HxW
    batch_size: int = 2
    steps: int = 10
    warmup: int = 2
    opt_level: str = "O0"
    amp_dtype: Optional[str] = None
    workers: int = 1
    threads: int = 0                    # 0 = torch's default
    depth: int = 2                      # module depth for the per-module table
    top: int = 25
    device: str = "cpu"
    seed: int = 0
    out: str = "work/trace"


def parse_args(argv=None) -> TraceConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TraceConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, str: str, "int": int, "str": str}.get(f.type, str)
        p.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default})")
    return TraceConfig(**vars(p.parse_args(argv)))


def main(cfg: TraceConfig) -> dict:
    from profiling.session import run_trace
    return run_trace(cfg)


if __name__ == "__main__":
    cfg = parse_args()
    t0 = time.time()
    main(cfg)
    print(f"trace done in {time.time() - t0:.1f} s; results in {cfg.out}")
