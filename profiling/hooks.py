"""Per-module timing hooks and a step timer that splits data-wait from compute.

Module times are measured with forward pre/post hooks. On an accelerator each hook synchronises
the device first (otherwise we would time the kernel launch, not the kernel), which slows the run:
these hooks are for profiling runs, never for training runs. They only read clocks and never
touch tensors, so numerics are unchanged.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn


def modules_at_depth(model: nn.Module, depth: int) -> Dict[str, nn.Module]:
    """Named submodules whose dotted name has exactly `depth` parts (or fewer, if they are leaves)."""
    out = {}
    for name, module in model.named_modules():
        if not name:
            continue
        parts = name.count(".") + 1
        if isinstance(module, nn.ModuleList):
            continue  # never called itself: its children are timed instead
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        in_list = bool(parent) and isinstance(model.get_submodule(parent), nn.ModuleList)
        if parts == depth or (in_list and parts == depth + 1) or \
                (parts < depth and not any(True for _ in module.children())):
            out[name] = module
    return out


class ModuleTimer:
    """Wall-clock time of each selected module's forward, summed over calls.

    Nested modules overlap (a stage contains its blocks), so compare modules of one depth.
    """

    def __init__(self, model: nn.Module, depth: int = 2, sync: Optional[Callable[[], None]] = None):
        self.sync = sync or (lambda: None)
        self.totals_ms: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self._starts: Dict[str, List[float]] = defaultdict(list)
        self._handles = []
        self.enabled = True
        for name, module in modules_at_depth(model, depth).items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            if self.enabled:
                self.sync()
                self._starts[name].append(time.perf_counter())
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            if self.enabled and self._starts[name]:
                self.sync()
                self.totals_ms[name] += (time.perf_counter() - self._starts[name].pop()) * 1000.0
                self.calls[name] += 1
        return hook

    def reset(self) -> None:
        self.totals_ms.clear()
        self.calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def table(self, steps: int) -> List[dict]:
        """Rows sorted by time: module, ms per step, share of the listed total, calls per step."""
        total = sum(self.totals_ms.values()) or 1.0
        rows = [{"module": k, "ms_per_step": v / max(steps, 1), "share": v / total,
                 "calls_per_step": self.calls[k] / max(steps, 1)}
                for k, v in self.totals_ms.items()]
        return sorted(rows, key=lambda r: -r["ms_per_step"])


@dataclass
class StepTimes:
    """Per-step wall times in milliseconds: waiting for the batch, and everything after it."""
    data_wait_ms: List[float] = field(default_factory=list)
    compute_ms: List[float] = field(default_factory=list)

    def add(self, data_wait_ms: float, compute_ms: float) -> None:
        self.data_wait_ms.append(data_wait_ms)
        self.compute_ms.append(compute_ms)

    def summary(self) -> dict:
        def stats(xs):
            if not xs:
                return {"mean": 0.0, "median": 0.0, "max": 0.0}
            t = torch.tensor(xs, dtype=torch.float64)
            return {"mean": float(t.mean()), "median": float(t.median()), "max": float(t.max())}
        wait, comp = stats(self.data_wait_ms), stats(self.compute_ms)
        total = wait["mean"] + comp["mean"]
        return {"steps": len(self.compute_ms), "data_wait_ms": wait, "compute_ms": comp,
                "data_wait_share": wait["mean"] / total if total else 0.0}
