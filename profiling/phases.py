"""Where a step's wall time goes: data wait plus the engine's own phases, checked against the step.

core.engine.train_one_step calls `timer(phase)` at the END of each of its phases (ENGINE_PHASES);
PhaseTimer is that callback. The trace loop adds "data_wait" (the `next(loader)` before the
step) and measures the whole iteration on its own, from before `next(loader)` to after the step
returned (and the device finished). The phases partition that interval, so their sum must equal
the step up to the few Python statements outside any phase; `within_tolerance` checks it:

    |sum of phases - step| <= TOLERANCE_REL * step + TOLERANCE_ABS_MS      (2% + 1 ms)

per step and for the means. A step that fails it means the engine does work no phase reports
(e.g. a new sync after the optimizer), and the breakdown no longer explains the step.

On accelerators every reading synchronises the device first, so each phase owns the kernels it
launched. DDP's gradient all-reduce runs inside "backward" (overlapped with it, bucket by
bucket); AllReduceTimer measures it through a DDP comm hook and it is reported beside the
breakdown, never added to the sum (that time is already inside "backward").
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

ENGINE_PHASES = ("input", "forward", "backward", "communication", "optimizer")  # core/engine.py, in order
PHASES = ("data_wait",) + ENGINE_PHASES
TOLERANCE_REL, TOLERANCE_ABS_MS = 0.02, 1.0
TOLERANCE_TEXT = f"|sum - step| <= {TOLERANCE_REL:.0%} of the step + {TOLERANCE_ABS_MS:g} ms"


def within_tolerance(sum_ms: float, step_ms: float) -> bool:
    return abs(sum_ms - step_ms) <= TOLERANCE_REL * step_ms + TOLERANCE_ABS_MS


class PhaseTimer:
    """Per-step phase durations in ms. start_step() before next(loader), mark("data_wait") after
    it, pass the timer itself as the step's `timer`, end_step() after the step returned.

    With annotate=True each phase is also a torch.profiler range in the chrome trace; a range is
    opened when the previous phase ends, so it is named after the phase the engine is expected
    to report next (ENGINE_PHASES order); the breakdown itself uses the names the engine reports.
    """

    def __init__(self, read: Callable[[], float], annotate: bool = False):
        self.read = read
        self.annotate = annotate
        self.steps: List[Dict[str, float]] = []
        self.names: List[str] = list(PHASES)  # and any phase the engine reports beyond ENGINE_PHASES
        self._t0 = self._last = 0.0
        self._current: Dict[str, float] = {}
        self._range = None
        self._expected: List[str] = []
        self._warned = False

    def start_step(self) -> None:
        self._t0 = self._last = self.read()
        self._current = {}
        self._expected = list(PHASES)
        self._open_range()

    def mark(self, phase: str) -> None:
        now = self.read()
        self._current[phase] = self._current.get(phase, 0.0) + now - self._last
        self._last = now
        self._close_range()
        if self._expected and self._expected[0] == phase:
            self._expected.pop(0)
        elif not self._warned:
            self._warned = True
            warnings.warn(f"the engine reported phase {phase!r} where {self._expected[:1]} was expected: "
                          "update profiling.phases.ENGINE_PHASES to core/engine.py's phases (the breakdown "
                          "uses the reported names; only the chrome trace's range labels are affected)")
        self._open_range()

    __call__ = mark  # the engine calls timer(phase)

    def end_step(self) -> Dict[str, float]:
        step_ms = self.read() - self._t0
        self._close_range()
        self.names += [p for p in self._current if p not in self.names]  # a phase added to the engine
        row = {p: self._current.get(p, 0.0) for p in self.names}
        total = sum(row.values())
        row.update(sum_ms=total, step_ms=step_ms, within_tolerance=within_tolerance(total, step_ms))
        self.steps.append(row)
        return row

    def _open_range(self) -> None:
        if self.annotate and self._expected:
            self._range = torch.autograd.profiler.record_function(self._expected[0])
            self._range.__enter__()

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def summary(self) -> Dict:
        """Mean of every phase, their sum against the mean step, and the per-step check."""
        if not self.steps:
            return {}
        n = len(self.steps)
        mean = {k: sum(s.get(k, 0.0) for s in self.steps) / n for k in self.names}
        sum_ms = sum(mean.values())
        step_ms = sum(s["step_ms"] for s in self.steps) / n
        return {"phases_ms": mean, "sum_ms": sum_ms, "step_ms": step_ms, "tolerance": TOLERANCE_TEXT,
                "mean_within_tolerance": within_tolerance(sum_ms, step_ms),
                "steps_within_tolerance": sum(bool(s["within_tolerance"]) for s in self.steps), "steps": n}


class AllReduceTimer:
    """DDP's bucketed gradient all-reduce, timed through a comm hook.

    The hook is torch's own default all-reduce (ddp_comm_hooks.default_hooks.allreduce_hook:
    divide the bucket by the world size, all-reduce SUM, the same arithmetic as DDP's built-in
    path), wrapped to read the host clock when the bucket is handed over and when its future
    completes. No device sync here: that would serialise the overlap being measured.
    """

    def __init__(self, ddp_model, group=None):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        self._allreduce = default_hooks.allreduce_hook
        self.group = group
        self.spans: List[tuple] = []
        self.steps: List[Dict[str, float]] = []
        ddp_model.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):
        start = time.perf_counter()
        fut = self._allreduce(self.group, bucket)

        def done(f):
            self.spans.append((start, time.perf_counter()))
            return f.value()
        return fut.then(done)

    def discard(self) -> None:
        """Forget the buckets seen so far (the warm-up steps')."""
        self.spans = []

    def end_step(self) -> Optional[Dict[str, float]]:
        spans, self.spans = self.spans, []
        if not spans:
            return None
        row = {"buckets": len(spans), "allreduce_ms": 1000.0 * sum(e - s for s, e in spans),
               "span_ms": 1000.0 * (max(e for _, e in spans) - min(s for s, _ in spans))}
        self.steps.append(row)
        return row

    def summary(self) -> Dict:
        if not self.steps:
            return {}
        n = len(self.steps)
        return {k: sum(s[k] for s in self.steps) / n for k in ("buckets", "allreduce_ms", "span_ms")}
