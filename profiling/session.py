"""A profiling run: real training steps of the trainer, timed per op, per module and per phase.

Uses the trainer's own pieces (core.engine.train_one_step, core.amp, the shared-memory loader),
so what it measures is what `launch/run.py` runs. Hooks only read clocks: numerics are unchanged.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Tuple

import torch

from core import build_model
from core.amp import Amp, resolve_dtype
from core.device import get_device
from core.engine import train_one_step
from core.losses import seg_loss
from core.optim import build_sgd
from profiling.hooks import ModuleTimer, StepTimes
from profiling.report import bar_chart_png, markdown_table, write_json


def parse_hw(text: str, name: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--{name} must look like HxW (e.g. 512x1024), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"--{name} must be positive, got {text!r}")
    return h, w


def _op_rows(prof, top: int) -> list:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000.0,
             "total_ms": e.cpu_time_total / 1000.0, "share": e.self_cpu_time_total / total}
            for e in events]
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:top]


class StepRunner:
    """The trainer's step on the trainer's loader, for a profiling or tuning config.

    `step()` returns (data-wait ms, compute ms) of one iteration; `close()` frees the loader's
    shared memory and workers.
    """

    def __init__(self, cfg, channels_last: bool = True):
        from data_loader.loader import build_train_loader
        from data_loader.synthetic import default_dataset

        crop = parse_hw(cfg.crop, "crop")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = get_device(cfg.device)
        root = cfg.data or default_dataset()
        model = build_model(cfg.backbone, cfg.output_stride, num_classes=19).to(self.device.torch_device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.amp = Amp(cfg.opt_level, self.device.type,
                       resolve_dtype(cfg.amp_dtype or "auto", self.device.autocast_dtype))
        self.model = self.amp.prepare(model.train())
        self.optimizer = build_sgd(self.amp.optim_params, lr=0.01)
        self.loss_fn = functools.partial(seg_loss, aux_weight=0.4)
        self.channels_last = channels_last
        scale = (crop[1] * 2, crop[0] * 2)  # twice the crop, as Cityscapes' 2048x1024 for 512x1024
        self.loader = build_train_loader(root, batch_size=cfg.batch_size, crop=crop, scale=scale,
                                         workers=cfg.workers, seed=cfg.seed)
        self._it = iter(self.loader)

    def step(self) -> Tuple[float, float]:
        t0 = time.perf_counter()
        batch = next(self._it)
        t1 = time.perf_counter()
        train_one_step(self.model, batch.image, batch.label, self.amp, self.optimizer, self.loss_fn,
                       self.device.torch_device, channels_last=self.channels_last)
        self.device.synchronize()  # the step's time must include its device work
        t2 = time.perf_counter()
        return (t1 - t0) * 1000.0, (t2 - t1) * 1000.0

    def close(self) -> None:
        self.loader.close()


def run_trace(cfg) -> dict:
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {cfg.steps} and {cfg.warmup}")
    parse_hw(cfg.crop, "crop")
    os.makedirs(cfg.out, exist_ok=True)
    runner = StepRunner(cfg)
    device = runner.device
    timer = ModuleTimer(runner.model, depth=cfg.depth, sync=device.synchronize)
    times = StepTimes()
    try:
        timer.enabled = False
        for _ in range(cfg.warmup):
            runner.step()
        timer.enabled = True
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            for i in range(cfg.steps):
                with torch.profiler.record_function(f"step_{i}"):
                    times.add(*runner.step())
                print(f"[trace] step {i + 1}/{cfg.steps}  data-wait {times.data_wait_ms[-1]:.1f} ms  "
                      f"compute {times.compute_ms[-1]:.1f} ms", flush=True)
    finally:
        timer.remove()
        runner.close()

    prof.export_chrome_trace(os.path.join(cfg.out, "trace.json"))
    ops = _op_rows(prof, cfg.top)
    modules = timer.table(cfg.steps)
    steps = times.summary()
    images_per_s = cfg.batch_size * 1000.0 / max(steps["data_wait_ms"]["mean"] + steps["compute_ms"]["mean"], 1e-9)
    result = {"config": vars(cfg) if not hasattr(cfg, "__dataclass_fields__") else
              {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "steps": steps, "images_per_s": images_per_s, "ops": ops, "modules": modules}
    write_json(os.path.join(cfg.out, "ops.json"), ops)
    write_json(os.path.join(cfg.out, "modules.json"), modules)
    write_json(os.path.join(cfg.out, "steps.json"), {"summary": steps, "data_wait_ms": times.data_wait_ms,
                                                     "compute_ms": times.compute_ms})
    ops_md = markdown_table(ops, ["op", "calls", "self_ms", "share"], ["{}", "{}", "{:.2f}", "{:.1%}"])
    mod_md = markdown_table(modules, ["module", "ms_per_step", "share", "calls_per_step"],
                            ["{}", "{:.2f}", "{:.1%}", "{:.0f}"])
    with open(os.path.join(cfg.out, "ops.md"), "w") as f:
        f.write(ops_md + "\n")
    with open(os.path.join(cfg.out, "modules.md"), "w") as f:
        f.write(mod_md + "\n")
    bar_chart_png(os.path.join(cfg.out, "ops.png"), [r["op"] for r in ops], [r["self_ms"] / cfg.steps for r in ops],
                  f"self time per step by op ({cfg.backbone}, {cfg.crop}, batch {cfg.batch_size}, {cfg.opt_level})")
    bar_chart_png(os.path.join(cfg.out, "modules.png"), [r["module"] for r in modules],
                  [r["ms_per_step"] for r in modules], f"forward time per step by module (depth {cfg.depth})")
    print("\nper-op self time (all steps):\n" + ops_md)
    print("\nper-module forward time:\n" + mod_md)
    print(f"\ndata-wait {steps['data_wait_ms']['mean']:.1f} ms vs compute {steps['compute_ms']['mean']:.1f} ms "
          f"per step ({steps['data_wait_share']:.1%} waiting); {images_per_s:.1f} images/s")
    return result
