"""FLOPs per module, forward and backward, of one training step.

Counted with torch.utils.flop_counter.FlopCounterMode over one forward + backward of a copy of
the model built on the `meta` device, exactly as core.mfu.count_train_step_flops counts the
step's total (same builder, input shape and loss), so the per-module rows add up to the FLOPs
that MFU uses. The meta copy has no data and runs no kernel: the real model's weights, BN
statistics and the RNG are untouched, so the traced run stays identical to run.py's.

Attribution does not use FlopCounterMode's own module hierarchy: its backward boundaries are
"gradient of the outputs ready" to "gradient of the inputs ready", and an input shared with
another module (layer3's output feeds layer4 and the aux head) is only ready when every consumer
is done, so layer4's backward would be booked under the aux head. Instead the same ModuleMeter
that times the traced steps (profiling/hooks.py) reads the counter's running total at each
module's forward and backward boundaries: FLOPs and milliseconds then cover the same intervals,
and FLOP/s per module is their ratio.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from profiling.hooks import ModuleMeter


def module_flops(build: Callable[[], torch.nn.Module], batch: int, crop_hw: Sequence[int], depth: int) -> Dict:
    """{"modules": {name: {"forward": F, "backward": B}}, "forward_total", "backward_total", "total"}
    for a [batch, 3, H, W] input; whatever no listed module covers (the loss, the final
    upsampling) is total minus the rows."""
    with torch.device("meta"):
        model = build()
    model.train()
    x = torch.empty(batch, 3, *crop_hw, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[]):  # the meta copy must not move the training RNG
        meter = ModuleMeter(model, depth, read=counter.get_total_flops)
        try:
            with counter:
                out = model(x)
                forward_total = counter.get_total_flops()
                loss = sum(v.float().sum() for v in out.values())  # as core.mfu.count_train_step_flops
                loss.backward()
            meter.flush()
        finally:
            meter.remove()
    total = counter.get_total_flops()
    rows = {r["module"]: {"forward": int(r["forward"]), "backward": int(r["backward"])} for r in meter.table()}
    return {"modules": rows, "forward_total": int(forward_total), "backward_total": int(total - forward_total),
            "total": int(total)}
