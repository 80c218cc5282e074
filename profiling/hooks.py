"""Per-module forward and backward meters, attached only while tracing.

A ModuleMeter hooks the modules at one depth (ModuleLists expanded, so the ASPP branches are
rows of their own) and reads a *meter* at each boundary: the wall clock for times (the device
synchronised first on accelerators, otherwise we would time kernel launches), or
FlopCounterMode's running total for FLOPs (profiling/flops.py). Times and FLOPs share the same
boundaries, so FLOP/s per module divides matching intervals.

Forward: a forward pre hook and a forward hook per module.

Backward, without torch's full backward hooks. Those wrap a module's inputs and outputs in an
identity autograd function (BackwardHookFunction), which (1) makes an in-place op on a hooked
output an error (nn.ReLU(inplace=True) after a hooked BN: "Output 0 of BackwardHookFunction is a
view and is being modified inplace"), and (2) changes the order in which gradients of a tensor
with three or more consumers are summed: layer3's output feeds layer4.0.conv1, layer4.0's
downsample and the aux head, and with layer4's input wrapped, conv1 + downsample are summed
first. Float addition is not associative, so every gradient below layer3 changes in its last
bits and a traced run would drift from run.py's losses (tests/test_profiling.py shows both).
Turning `inplace` off while tracing would fix (1), not (2). So the meter adds no autograd node
at all; it hooks the nodes the module's forward created:
  * start: a pre hook on the autograd node of each output (it runs once that output's gradient
    is complete, i.e. when the module's own backward can begin);
  * end: a post hook on each "entry" node, a node created inside the module that feeds the
    gradient of the module's inputs (found by walking the graph from the outputs down to the
    inputs' nodes, told apart by sequence number: nodes created inside come after the inputs'),
    and a post-accumulate-grad hook on each parameter. A module none of whose inputs needs a
    gradient (the stem) ends with its last parameter gradient.
Hooks only read the meter and return None, so every gradient is bit-identical, and the in-place
ReLUs stay in place (no memory changes either). The graph walk runs after the forward hook has
read the clock, so its cost falls outside every module's time (in the forward's "rest" row).
The engine runs CPU backward nodes one at a time in priority order, so a module's nodes run
contiguously (the ASPP branches one after the other, the aux head before the decode head).

Free when off: nothing is registered until a ModuleMeter is built; remove() takes every module
and parameter hook away, and node hooks die with the step's graph (tests check both).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

_ACCUMULATE = "torch::autograd::AccumulateGrad"


def modules_at_depth(model: nn.Module, depth: int) -> Dict[str, nn.Module]:
    """Named submodules whose dotted name has exactly `depth` parts (or fewer, if they are leaves);
    a ModuleList is never called itself, so its children (one more part) stand in for it."""
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    out = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, nn.ModuleList):
            continue
        parts = name.count(".") + 1
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        in_list = bool(parent) and isinstance(model.get_submodule(parent), nn.ModuleList)
        if parts == depth or (in_list and parts == depth + 1) or \
                (parts < depth and not any(True for _ in module.children())):
            out[name] = module
    return out


def wall_clock_ms(sync: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    """A meter reading milliseconds, after `sync()` (the device's synchronize on accelerators)."""
    if sync is None:
        return lambda: time.perf_counter() * 1000.0

    def read() -> float:
        sync()
        return time.perf_counter() * 1000.0
    return read


def clock_for(device) -> Callable[[], float]:
    """The wall-clock meter for a core.device.Device (a sync first on accelerators only)."""
    return wall_clock_ms(device.synchronize if device.type != "cpu" else None)


class _Call:
    """One forward call of a module, followed through its backward."""
    __slots__ = ("start", "end")

    def __init__(self):
        self.start: Optional[float] = None
        self.end: Optional[float] = None


def _seq(node) -> int:
    return node._sequence_nr()


def _graph_boundary(node, boundary: int, entries: list, seen: set) -> None:
    """Collect the nodes below `node` created after `boundary` that feed a node from before it."""
    stack = [node]
    while stack:
        n = stack.pop()
        key = _seq(n)  # unique within one forward (one thread); Python wrappers of a node may differ
        if key in seen:
            continue
        seen.add(key)
        is_entry = False
        for nxt, _ in n.next_functions:
            if nxt is None or nxt.name() == _ACCUMULATE:
                continue
            if _seq(nxt) <= boundary:
                is_entry = True
            else:
                stack.append(nxt)
        if is_entry:
            entries.append(n)


class ModuleMeter:
    """Forward and backward amounts of `read()` per module at `depth`, summed over calls.

    Call flush() after each backward (it closes that backward's intervals), table() for rows,
    remove() to detach everything.
    """

    def __init__(self, model: nn.Module, depth: int, read: Callable[[], float]):
        self.read = read
        self.modules = modules_at_depth(model, depth)
        self.forward = {name: 0.0 for name in self.modules}
        self.backward = {name: 0.0 for name in self.modules}
        self.forward_calls = {name: 0 for name in self.modules}
        self.backward_calls = {name: 0 for name in self.modules}
        self._fwd_open: Dict[str, List[tuple]] = {name: [] for name in self.modules}
        self._calls: Dict[str, List[_Call]] = {name: [] for name in self.modules}  # not yet flushed
        self._param_last: Dict[str, float] = {}
        self._handles = []
        for name, module in self.modules.items():
            self._handles += [module.register_forward_pre_hook(self._fwd_pre(name), with_kwargs=True),
                              module.register_forward_hook(self._fwd_post(name))]
            for p in module.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._param_done(name)))

    # ---- forward -----------------------------------------------------------------------------
    def _fwd_pre(self, name: str):
        def hook(module, args, kwargs):
            inputs = [t.grad_fn for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            boundary = max((_seq(fn) for fn in inputs), default=-1)
            self._fwd_open[name].append((self.read(), boundary))
        return hook

    def _fwd_post(self, name: str):
        def hook(module, args, output):
            start, boundary = self._fwd_open[name].pop()
            self.forward[name] += self.read() - start
            self.forward_calls[name] += 1
            if torch.is_grad_enabled():
                self._follow_backward(name, output, boundary)
        return hook

    def _follow_backward(self, name: str, output, boundary: int) -> None:
        heads = {}
        for t in tree_leaves(output):
            fn = t.grad_fn if isinstance(t, torch.Tensor) else None
            if fn is not None and _seq(fn) > boundary:
                heads[_seq(fn)] = fn
        if not heads:
            return
        entries, seen = [], set()
        if boundary >= 0:  # inputs with a gradient: find where the module hands it on
            for fn in heads.values():
                _graph_boundary(fn, boundary, entries, seen)
        call = _Call()
        self._calls[name].append(call)

        def started(grad_outputs):
            if call.start is None:
                call.start = self.read()

        def finished(grad_inputs, grad_outputs):
            call.end = self.read()
        for fn in heads.values():
            fn.register_prehook(started)
        for fn in entries:
            fn.register_hook(finished)

    def _param_done(self, name: str):
        def hook(param):
            self._param_last[name] = self.read()
        return hook

    # ---- results ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Close the backward that just ran. A call's backward ends at its last entry node or
        its module's last parameter gradient, whichever is later."""
        for name, calls in self._calls.items():
            done = [c for c in calls if c.start is not None]
            if not done:
                continue
            last = max(done, key=lambda c: c.end if c.end is not None else c.start)
            param_end = self._param_last.get(name)
            for c in done:
                end = c.end if c.end is not None else c.start
                if c is last and param_end is not None:
                    end = max(end, param_end)
                self.backward[name] += end - c.start
                self.backward_calls[name] += 1
        for calls in self._calls.values():
            calls.clear()
        self._param_last.clear()

    def reset(self) -> None:
        for d in (self.forward, self.backward, self.forward_calls, self.backward_calls):
            for k in d:
                d[k] = 0

    def table(self, steps: int = 1) -> List[dict]:
        """Per module, in model order: forward/backward amount per step and calls per step."""
        n = max(steps, 1)
        return [{"module": name, "forward": self.forward[name] / n, "backward": self.backward[name] / n,
                 "forward_calls": self.forward_calls[name] / n, "backward_calls": self.backward_calls[name] / n}
                for name in self.modules]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for calls in self._calls.values():
            calls.clear()  # drops the references to this step's graph nodes

    def __enter__(self) -> "ModuleMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attached_hooks(model: nn.Module) -> List[str]:
    """Every module or parameter hook left on `model` (empty when nothing is attached)."""
    found = []
    for name, module in model.named_modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            if getattr(module, attr, None):
                found.append(f"{name or '<model>'}.{attr}")
    for name, p in model.named_parameters():
        if getattr(p, "_post_accumulate_grad_hooks", None):
            found.append(f"{name}._post_accumulate_grad_hooks")
    return found
