"""Throughput tuning: sweep settings with short real training runs and report the best.

    python launch/tune.py                                    # r18 on the synthetic set, small crops
    python launch/tune.py --backbone r50 --crop 256x512 --opt-levels O0,O1,O2 --threads 1,2

Every combination of the swept values runs --warmup + --steps iterations of the trainer's own
step (core.engine.train_one_step on the shared-memory loader). The first combination is the
baseline; each row prints its images/s and its ratio to that baseline measured in this same run
(absolute times on shared machines are noisy; ratios within one run are what to compare).
Opt levels change numerics as well as speed: check a level's loss curve (tests compare them to O0)
before adopting it. Writes tune.json, tune.md and tune.png to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class TuneConfig:
    data: Optional[str] = None          # Cityscapes-layout root; None = the embedded synthetic set
    backbone: str = "r18"
    output_stride: int = 8
    crop: str = "128x256"               # HxW
    device: str = "cpu"
    steps: int = 6
    warmup: int = 2
    seed: int = 0
    opt_levels: str = "O0,O1"           # comma-separated values to sweep ...
    channels_last: str = "off,on"
    batch_sizes: str = "2"
    workers: str = "1"
    threads: str = "0"                  # 0 = torch's default
    amp_dtype: Optional[str] = None
    out: str = "work/tune"


@dataclass
class RunSettings:
    """One point of the sweep, shaped like profiling.trace.TraceConfig for StepRunner."""
    data: Optional[str]
    backbone: str
    output_stride: int
    crop: str
    device: str
    seed: int
    amp_dtype: Optional[str]
    opt_level: str
    channels_last: bool
    batch_size: int
    workers: int
    threads: int


def parse_args(argv=None) -> TuneConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TuneConfig):
        kind = int if f.type in ("int", int) else str
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f"(default: {f.default})")
    return TuneConfig(**vars(p.parse_args(argv)))


def _split(text: str, name: str, kind):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--{name} needs at least one value")
    if kind is bool:
        table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
        bad = [v for v in values if v.lower() not in table]
        if bad:
            raise ValueError(f"--{name} takes on/off values, got {bad}")
        return [table[v.lower()] for v in values]
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated {kind.__name__} values, got {text!r}") from None


def build_sweep(cfg: TuneConfig) -> List[RunSettings]:
    levels = _split(cfg.opt_levels, "opt-levels", str)
    bad = [lv for lv in levels if lv not in ("O0", "O1", "O2", "O3")]
    if bad:
        raise ValueError(f"--opt-levels takes O0..O3, got {bad}")
    grid = itertools.product(levels, _split(cfg.channels_last, "channels-last", bool),
                             _split(cfg.batch_sizes, "batch-sizes", int), _split(cfg.workers, "workers", int),
                             _split(cfg.threads, "threads", int))
    return [RunSettings(cfg.data, cfg.backbone, cfg.output_stride, cfg.crop, cfg.device, cfg.seed, cfg.amp_dtype,
                        lv, cl, bs, wk, th) for lv, cl, bs, wk, th in grid]


def measure(run: RunSettings, steps: int, warmup: int) -> dict:
    from profiling.session import StepRunner

    runner = StepRunner(run, channels_last=run.channels_last)
    try:
        for _ in range(warmup):
            runner.step()
        totals, waits = [], []
        for _ in range(steps):
            wait, compute = runner.step()
            totals.append(wait + compute)
            waits.append(wait)
    finally:
        runner.close()
    step_ms = statistics.median(totals)
    return {"step_ms": step_ms, "data_wait_ms": statistics.median(waits),
            "images_per_s": run.batch_size * 1000.0 / step_ms}


def main(cfg: TuneConfig) -> List[dict]:
    from profiling.report import bar_chart_png, markdown_table, write_json

    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {cfg.steps} and {cfg.warmup}")
    sweep = build_sweep(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    rows = []
    t0 = time.time()
    for i, run in enumerate(sweep):
        result = measure(run, cfg.steps, cfg.warmup)
        row = {"opt_level": run.opt_level, "channels_last": run.channels_last, "batch_size": run.batch_size,
               "workers": run.workers, "threads": run.threads, **result}
        rows.append(row)
        done = time.time() - t0
        eta = done / (i + 1) * (len(sweep) - i - 1)
        print(f"[tune] {i + 1}/{len(sweep)} {_label(row)}: {row['images_per_s']:.2f} images/s "
              f"(step {row['step_ms']:.0f} ms, data-wait {row['data_wait_ms']:.1f} ms)  ETA {eta:.0f} s", flush=True)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["vs_baseline"] = row["images_per_s"] / base
    ranked = sorted(rows, key=lambda r: -r["images_per_s"])
    table = markdown_table(ranked, ["opt_level", "channels_last", "batch_size", "workers", "threads", "step_ms",
                                    "data_wait_ms", "images_per_s", "vs_baseline"],
                           ["{}", "{}", "{}", "{}", "{}", "{:.0f}", "{:.1f}", "{:.2f}", "{:.2f}x"])
    write_json(os.path.join(cfg.out, "tune.json"), {"config": dataclasses.asdict(cfg), "runs": rows,
                                                    "best": ranked[0]})
    with open(os.path.join(cfg.out, "tune.md"), "w") as f:
        f.write(table + "\n")
    bar_chart_png(os.path.join(cfg.out, "tune.png"), [_label(r) for r in ranked], [r["images_per_s"] for r in ranked],
                  f"images/s by setting ({cfg.backbone}, crop {cfg.crop}); baseline = {_label(rows[0])}",
                  unit="img/s")
    print("\n" + table)
    print(f"\nbest: {_label(ranked[0])} at {ranked[0]['images_per_s']:.2f} images/s, "
          f"{ranked[0]['vs_baseline']:.2f}x the baseline ({_label(rows[0])})")
    return rows


def _label(r: dict) -> str:
    return (f"{r['opt_level']} {'NHWC' if r['channels_last'] else 'NCHW'} bs{r['batch_size']} "
            f"w{r['workers']} t{r['threads'] or 'auto'}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as exc:
        print(f"tune.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
