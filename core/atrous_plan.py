"""Counting what the padding-aware atrous convolutions skip, measuring their algorithms, and the
optional per-layer plan (measured choices a caller persists with its checkpoint: a second
measurement on a busy machine could choose differently, and the algorithms differ in rounding)."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from core.atrous import ALGORITHMS, PaddingAwareConv2d, _compute_dtype, _run, conv_macs, shape_key


def get_plan(model: nn.Module) -> Dict[str, Dict[str, str]]:
    """{module name: {shape key: algorithm}}: plain strings, to save in a checkpoint."""
    return {name: dict(m.plan) for name, m in model.named_modules()
            if isinstance(m, PaddingAwareConv2d) and m.plan}


def set_plan(model: nn.Module, plan: Dict[str, Dict[str, str]]) -> None:
    """Restore a plan from get_plan / measure_plan (e.g. from a checkpoint)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, PaddingAwareConv2d)}
    for name, entries in plan.items():
        if name not in modules:
            raise KeyError(f"plan names {name!r}, which is not a converted conv of this model")
        if any(a not in ALGORITHMS for a in entries.values()):
            raise ValueError(f"plan for {name!r} has algorithms {set(entries.values())}; expected {ALGORITHMS}")
        modules[name].plan = dict(entries)


# ---- counting and measuring ------------------------------------------------------------------
def conv_calls(model: nn.Module, input_shape,
               which: Callable[[nn.Module], bool] = PaddingAwareConv2d.eligible) -> List[Tuple[str, nn.Conv2d, Tuple[int, ...]]]:
    """(name, module, input shape) of every call of a conv `which` selects (default: the eligible
    dilated convs) in one forward of `model` on an input of `input_shape`, run on the meta device
    (no compute; the model's own parameters, buffers and BN statistics are not touched)."""
    calls: List[Tuple[str, nn.Conv2d, Tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: calls.append((name, mod, tuple(a[0].shape))))
             for name, m in model.named_modules() if which(m)]
    state = {k: torch.empty_like(v, device="meta")
             for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    # In eval mode: the same dilated convs run on the same shapes, and no norm layer needs batch
    # statistics (a batch of 1 per rank has a single value per channel after the ASPP's pooling,
    # which only a synchronised BN can normalise, and meta tensors are never synchronised).
    modes = {m: m.training for m in model.modules()}
    # the input in the dtype of the first conv's weights (O2/O3 cast the model to bf16/fp16)
    dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, nn.Conv2d)), torch.float32)
    model.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(model, state, (torch.empty(tuple(input_shape), device="meta", dtype=dtype),))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return calls


def count_skipped_macs(model: nn.Module, input_shape, dtype: torch.dtype = torch.float32,
                       device_type: str = "cpu", channels_last: bool = True) -> Dict[str, object]:
    """Multiply-adds of one forward of the model's dilated 3x3 convs: `plain` (F.conv2d's),
    `needed` (those reading the image), per layer `layers[name] = (plain, needed)`, and
    `train_step_flops_skipped`: FLOPs (2 per MAC) that a training step in `dtype` on `device_type`
    does not compute because converted convs choose "taps" or "hybrid" (both skip in all three
    products). Subtract it from core.mfu's count (which sees plain convs) for a true MFU."""
    layers: Dict[str, Tuple[int, int]] = {}
    skipped = 0
    for name, m, shape in conv_calls(model, input_shape):
        plain, needed = conv_macs(shape[0], shape[1], m.out_channels, shape[2], shape[3], m.dilation[0])
        p0, n0 = layers.get(name, (0, 0))
        layers[name] = (p0 + plain, n0 + needed)
        if isinstance(m, PaddingAwareConv2d) and \
                m.choice(shape, dtype, device_type, True, channels_last) in ("taps", "hybrid"):
            skipped += 6 * (plain - needed)
    return {"plain": sum(p for p, _ in layers.values()), "needed": sum(q for _, q in layers.values()),
            "layers": layers, "train_step_flops_skipped": skipped}


def time_algorithms(x: torch.Tensor, weight: torch.Tensor, dilation: int, training: bool,
                    algorithms=("nchw", "channels_last", "taps", "hybrid"), repeats: int = 3):
    """Median seconds of each algorithm on these tensors (forward, or forward + backward),
    calling them in turn so that all see the same background load."""
    sync = getattr(torch, x.device.type).synchronize if x.device.type not in ("cpu", "meta") else (lambda: None)
    x, w = x.detach().requires_grad_(training), weight.detach().requires_grad_(training)

    def run(algorithm):
        with torch.set_grad_enabled(training):
            y = _run(algorithm, x, w, None, dilation)
            if training:
                y.backward(torch.ones_like(y))
                x.grad = w.grad = None
        sync()

    times: Dict[str, List[float]] = {a: [] for a in algorithms}
    for rep in range(repeats + 1):  # the first round warms up (primitive creation, allocator)
        for a in algorithms:
            start = time.perf_counter()
            run(a)
            if rep:
                times[a].append(time.perf_counter() - start)
    return {a: sorted(t)[len(t) // 2] for a, t in times.items()}


def measure_plan(model: nn.Module, input_shape, training: bool = True, channels_last: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None, repeats: int = 3,
                 seed: int = 0) -> Dict[str, Dict[str, str]]:
    """Time the algorithms for every converted conv of `model` at the shapes it sees for an input
    of `input_shape` (layers of one shape once), store the fastest in each module's plan and
    return get_plan(model). Inputs come from a private generator: the global RNG is untouched.
    Save the plan with the checkpoint and set_plan it on resume: a second measurement on a busy
    machine could choose differently, and the algorithms differ in fp rounding."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    done: Dict[Tuple, str] = {}
    for name, m, shape in conv_calls(model, input_shape):
        if not isinstance(m, PaddingAwareConv2d):
            continue
        dev = m.weight.device
        x = torch.randn(shape, generator=gen).to(device=dev, dtype=m.weight.dtype, memory_format=fmt)
        ctx = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
               else torch.autocast(dev.type, enabled=False))
        with ctx:
            key = shape_key(shape, m.out_channels, _compute_dtype(x), training, channels_last)
            sig = (key, m.out_channels, m.dilation[0], dev.type)
            if sig not in done:
                times = time_algorithms(x, m.weight, m.dilation[0], training, repeats=repeats)
                done[sig] = min(times, key=times.get)
        m.plan[key] = done[sig]
    return get_plan(model)
