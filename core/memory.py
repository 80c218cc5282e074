"""How much memory a training process will need, known before it allocates any: the Cityscapes
recipe (R50-D8, batch 8 at 512x1024) in one CPU process grows to about 20 GiB, and a machine that
does not have it should be told at start-up, not by the OOM killer an hour in.

The estimate runs the model's forward on the meta device (no memory, no compute) and adds up the
tensors autograd saves for the backward, each storage once: that is what a step holds at its peak,
when the backward starts. Added to it: weights, gradients and SGD momentum (3 fp32 copies of the
parameters, a 4th at O2 for the low-precision model beside its masters), the loader's slots, and a
fixed allowance for the interpreter, torch and oneDNN. Saved tensors are counted in fp32, so at
O1-O3 the figure is an upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

RUNTIME_BYTES = 600 * 2 ** 20  # python + torch + oneDNN + the decoders, measured idle RSS ~0.5 GiB


@dataclass
class MemoryEstimate:
    activations: int  # bytes autograd saves in one forward
    parameters: int  # bytes of weights + gradients + optimizer state (+ O2/O3 copies)
    loader: int  # bytes of the loader's shared-memory slots
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.activations + self.parameters + self.loader + self.runtime

    def describe(self) -> str:
        return (f"{_size(self.total)} (saved activations {_size(self.activations)}, weights + gradients + momentum "
                f"{_size(self.parameters)}, loader slots {_size(self.loader)}, runtime {_size(self.runtime)})")


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def saved_activation_bytes(build: Callable[[], torch.nn.Module], batch: int, crop_hw: Tuple[int, int],
                           channels_last: bool = True) -> Tuple[int, int]:
    """(bytes autograd saves in one training forward, parameter count) of `build()` on a
    [batch, 3, H, W] input; each storage counted once (a ReLU output the next conv also saves is
    one tensor)."""
    with torch.device("meta"):
        model = build()
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return t

    x = torch.empty(batch, 3, *crop_hw, device="meta").to(memory_format=fmt)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(n for k, n in storages.items() if k not in params), sum(p.numel() for p in model.parameters())


def estimate_train_memory(build: Callable[[], torch.nn.Module], batch: int, crop_hw: Tuple[int, int],
                          channels_last: bool, master_weights: bool, loader_bytes: int) -> MemoryEstimate:
    """`master_weights`: the opt level keeps fp32 masters beside a low-precision model (O2);
    `loader_bytes`: the loader's shared-memory slots."""
    activations, n_params = saved_activation_bytes(build, batch, crop_hw, channels_last)
    copies = 3 + (1 if master_weights else 0)  # weights, grads, momentum (+ the low-precision model)
    return MemoryEstimate(activations, 4 * copies * n_params, loader_bytes)


def available_bytes() -> int:
    """Memory this machine can still give (MemAvailable), as psutil reports it."""
    import psutil
    return int(psutil.virtual_memory().available)
