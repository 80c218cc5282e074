"""apex-style opt levels O0-O3 on torch.amp, as ONE table, and the object that applies a level.

apex's levels (NVIDIA apex docs, "opt-levels"):
    O0  fp32 everywhere.
    O1  fp32 weights; matmul/conv run in low precision through autocast (softmax, losses,
        interpolation stay fp32 by autocast's own lists); dynamic loss scale.
    O2  the model itself in low precision except BatchNorm, fp32 "master" weights kept by the
        optimizer (grads copied up, the step done in fp32, weights copied down); dynamic scale.
    O3  pure low precision (BN too), no master weights; static loss scale 1.0.
Loss scaling only matters for float16: bfloat16 has fp32's exponent range, so with bf16 the
scaler is disabled at every level. The training step calls the same methods whatever the
level (autocast(), backward(), unscale_(), step(), update()); this table decides what they do.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class OptLevel:
    name: str
    autocast: bool            # forward under torch.autocast(dtype)
    cast_model: bool          # parameters and buffers stored in the low-precision dtype
    keep_bn_fp32: bool        # ... except BatchNorm layers (only meaningful with cast_model)
    master_weights: bool      # optimizer steps fp32 copies of the low-precision parameters
    dynamic_loss_scale: bool  # with float16: torch.amp.GradScaler; otherwise no scaling


OPT_LEVELS: Dict[str, OptLevel] = {
    "O0": OptLevel("O0", autocast=False, cast_model=False, keep_bn_fp32=True, master_weights=False,
                   dynamic_loss_scale=False),
    "O1": OptLevel("O1", autocast=True, cast_model=False, keep_bn_fp32=True, master_weights=False,
                   dynamic_loss_scale=True),
    "O2": OptLevel("O2", autocast=False, cast_model=True, keep_bn_fp32=True, master_weights=True,
                   dynamic_loss_scale=True),
    "O3": OptLevel("O3", autocast=False, cast_model=True, keep_bn_fp32=False, master_weights=False,
                   dynamic_loss_scale=False),
}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(amp_dtype: str, default: torch.dtype) -> torch.dtype:
    """'auto' -> the device's default (bf16 on CPU, fp16 on CUDA/NPU); else the named dtype."""
    if amp_dtype == "auto":
        return default
    if amp_dtype not in _DTYPES:
        raise ValueError(f"--amp-dtype must be auto, bfloat16 or float16; got {amp_dtype!r}")
    return _DTYPES[amp_dtype]


class Amp:
    """Applies one OptLevel to a model/optimizer pair. Create, then `prepare(model)` once."""

    def __init__(self, level: str, device_type: str, dtype: torch.dtype, init_scale: float = 65536.0):
        if level not in OPT_LEVELS:
            raise ValueError(f"--opt-level must be one of {', '.join(OPT_LEVELS)}; got {level!r}")
        self.level = OPT_LEVELS[level]
        self.device_type = device_type
        self.low_dtype = dtype
        low = level != "O0"
        self.compute_dtype = dtype if low else torch.float32  # what the matmul peak is measured in
        self.input_dtype = dtype if self.level.cast_model else torch.float32
        use_scaler = self.level.dynamic_loss_scale and dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=use_scaler)
        self._pairs: List[tuple] = []  # (model param, fp32 master) where they are distinct tensors
        self._optim_params: List[nn.Parameter] = []
        self._master_of: Dict[int, nn.Parameter] = {}

    # ---- set-up ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast the (fp32) model for this level and set up master weights. Returns the model."""
        if self.level.cast_model:
            model.to(self.low_dtype)
            if self.level.keep_bn_fp32:
                for m in model.modules():
                    if isinstance(m, _BatchNorm):
                        # Every BN here (torch's, PoolBatchNorm2d, CpuSyncBatchNorm) returns its
                        # input's dtype with fp32 parameters, as apex's O2 BN does.
                        m.float()
        for p in model.parameters():
            if self.level.master_weights and p.dtype != torch.float32:
                master = nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                self._pairs.append((p, master))
            else:
                master = p
            self._master_of[id(p)] = master
            self._optim_params.append(master)
        return model

    @property
    def optim_params(self) -> List[nn.Parameter]:
        """What the optimizer steps: fp32 masters at O2, the model's own parameters otherwise."""
        return self._optim_params

    # ---- the step ---------------------------------------------------------------------------
    def autocast(self):
        if not self.level.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.low_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to the optimizer's (fp32) parameters and divide out the loss scale."""
        for p, master in self._pairs:
            master.grad = None if p.grad is None else p.grad.float()
        self.scaler.unscale_(optimizer)

    @torch.no_grad()
    def grads_finite(self) -> torch.Tensor:
        """0-dim bool tensor: every gradient finite. One reduction (sums propagate inf/NaN)."""
        grads = [p.grad for p in self._optim_params if p.grad is not None]
        if not grads:
            return torch.tensor(True)
        sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])
        return torch.isfinite(sums.sum())

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        for p, master in self._pairs:
            p.copy_(master)

    def update(self) -> None:
        self.scaler.update()

    def zero_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints -------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state with fp32 values (masters where they exist), so a checkpoint is the
        same whatever level trained it and loads into an fp32 model as is."""
        state = model.state_dict()
        for name, p in model.named_parameters():
            state[name] = self._master_of.get(id(p), p).detach()
        return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}

    def state_dict(self) -> Dict:
        return {"level": self.level.name, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def describe(level: str, dtype: Optional[torch.dtype]) -> str:
    lv = OPT_LEVELS[level]
    if level == "O0":
        return "O0: fp32"
    parts = [f"{level}: {str(dtype).replace('torch.', '')}"]
    parts.append("autocast" if lv.autocast else ("model cast, BN fp32" if lv.keep_bn_fp32 else "model cast"))
    if lv.master_weights:
        parts.append("fp32 master weights")
    parts.append("dynamic loss scale" if (lv.dynamic_loss_scale and dtype == torch.float16) else "no loss scale")
    return ", ".join(parts)
