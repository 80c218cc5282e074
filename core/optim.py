"""SGD and the poly learning-rate schedule of mmseg's schedule_40k/80k.

mmengine's PolyLR (eta_min=1e-4, power=0.9, by iteration) has the closed form
    lr(t) = eta_min + (base_lr - eta_min) * (1 - t / T) ** power,   t = 0 .. T-1
for the step that starts at iteration t (0-based), which is what `PolyLR.lr_at` computes.
mmseg's DeepLabV3 configs use no paramwise options, so weight decay applies to every parameter.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch


def build_sgd(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
              weight_decay: float = 5e-4) -> torch.optim.SGD:
    params = list(params)
    if not params:
        raise ValueError("build_sgd: no parameters to optimise")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class PolyLR:
    """Sets every param group's lr for iteration t; state is plain numbers (checkpoint-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9,
                 min_lr: float = 1e-4):
        if max_iters < 1:
            raise ValueError(f"PolyLR: max_iters must be >= 1, got {max_iters}")
        self.optimizer = optimizer
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        self.base_lrs: List[float] = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.iteration = 0

    def lr_at(self, iteration: int, base_lr: float) -> float:
        progress = min(max(iteration, 0), self.max_iters) / self.max_iters
        return self.min_lr + (base_lr - self.min_lr) * (1.0 - progress) ** self.power

    def set_iteration(self, iteration: int) -> float:
        """Set the lrs for the step that starts at `iteration`; returns the first group's lr."""
        self.iteration = iteration
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(iteration, base)
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict:
        return {"max_iters": self.max_iters, "power": self.power, "min_lr": self.min_lr,
                "base_lrs": list(self.base_lrs), "iteration": self.iteration}

    def load_state_dict(self, state: Dict) -> None:
        for key in ("max_iters", "power", "min_lr"):
            if state[key] != getattr(self, key):
                # A resumed run keeps the new flags (e.g. a longer --iters) but says so.
                print(f"[PolyLR] checkpoint had {key}={state[key]}, continuing with {getattr(self, key)}",
                      flush=True)
        self.base_lrs = list(state["base_lrs"])
        self.set_iteration(int(state["iteration"]))
