"""Memory-saving BatchNorm + activation (In-Place ABN style), selectable per run with `norm`.

In-Place ABN (Rota Bulo, Porzi, Kontschieder, CVPR 2018; mapillary/inplace_abn) computes BN and
its activation in one op that keeps only its OUTPUT for the backward: x_hat is rebuilt as
(act^-1(y) - beta) / gamma. y is kept anyway by the next conv, so the BN input is never stored.
That needs an invertible activation, and ReLU is not one (the BN backward needs x_hat at every
position, also where ReLU output is 0), hence:

    NORMS
    bn                    nn.BatchNorm2d + ReLU: mmseg's numerics (the default).
    inplace-abn           each BN+ReLU becomes BatchNormAct2d with leaky ReLU (slope 0.01), keeping
                          only its output; BNs followed by the residual add (bottleneck bn3, the
                          downsample BN) use identity, and the ReLU after the add stays exact.
    inplace-abn-residual  as inplace-abn, but bn3 (BasicBlock: bn2) also takes the shortcut and applies
                          leaky ReLU after the add: it keeps only the block's output, rebuilding its
                          own output as act^-1(out) - shortcut. The ReLU after the add becomes leaky.

Both memory-saving choices change the network: it is no longer mmseg's ReLU network. State-dict
keys are the same for every choice (BatchNormAct2d is an nn.BatchNorm2d), so mmseg checkpoints
load key for key, but a model trained with ReLU and evaluated with leaky ReLU gives different
outputs. A weight (gamma) of exactly 0 cannot be inverted: its channel gets d(gamma) = 0 (dx
stays exact), so a zero-initialised gamma would stay 0; this project initialises gamma to 1.

The op is a torch.library custom op with a fake implementation and a registered autograd
formula, so torch.compile'd models trace it once. CPU float32 channels_last tensors run the C++
kernels (kernels.ops.bn_act_*); anything else (CUDA/NPU, bf16/fp16 under AMP, float64, NCHW)
runs the same math in torch (kernels.reference_bn), computing in float32 and returning the
input's dtype. With `enable_sync()` (core.sync_bn.convert_sync_batchnorm does it) the batch
statistics are all-gathered and the two backward sums all-reduced over the process group, with
plain torch.distributed collectives: gloo on the CPU, NCCL/HCCL on accelerators.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import ops
from kernels import reference_bn

NORMS = ("bn", "inplace-abn", "inplace-abn-residual")
ACTIVATIONS = {"leaky_relu": None, "identity": 1.0, "relu": 0.0}  # kernel slope (leaky: its own)

_GROUPS: Dict[str, object] = {}  # name -> process group, for synchronised layers (custom ops take strings)


def _group_name(group) -> str:
    if group is None or group is dist.group.WORLD:
        _GROUPS["world"] = dist.group.WORLD
        return "world"
    name = f"group{id(group)}"
    _GROUPS[name] = group
    return name


# ---- the custom ops ------------------------------------------------------------------------------

def _uses_kernel(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> bool:
    """CPU float32 channels_last 4-D data: the C++ kernels (or kernels.reference when forced)."""
    ok = (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.ndim == 4
          and x.is_contiguous(memory_format=torch.channels_last))
    return ok and all(t is None or (t.dtype == torch.float32 and t.shape == x.shape
                                    and t.is_contiguous(memory_format=torch.channels_last)) for t in others)


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """[N,C,H,W] channels_last -> its [N*H*W, C] view (no copy)."""
    return None if t is None else t.movedim(1, -1).reshape(-1, t.shape[1])


def _last(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.movedim(1, -1)


@torch.library.custom_op("deeplab::bn_act_train", mutates_args=())
def bn_act_train(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float, slope: float,
                 save_output: bool, group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN + act(. [+ residual]) with batch statistics (over `group` if given).

    Returns (y, mean, invstd, unbiased var); the last three per channel in the compute dtype
    (float32; float64 for float64 x). The backward keeps y if save_output (slope > 0), else x.
    """
    c = x.shape[1]
    kernel = _uses_kernel(x, weight, residual)
    if kernel:
        mean, var = ops.bn_act_stats(_rows(x))
    else:
        mean, var = (t.double() for t in reference_bn.stats(_last(x)))
    count = x.numel() // c
    if group:
        mean, var, count = _gather_stats(mean, var, count, _GROUPS[group])
    dt = reference_bn.compute_dtype(x)
    invstd = torch.rsqrt(var + eps).to(dt)
    unbiased = (var * (count / max(count - 1, 1))).to(dt)
    mean = mean.to(dt)
    y = torch.empty_like(x)
    if kernel:
        ops.bn_act_forward(_rows(x), mean, invstd, weight, bias, slope, _rows(residual), out=_rows(y))
    else:
        _last(y).copy_(reference_bn.forward(_last(x), mean, invstd, weight, bias, slope, _last(residual)))
    return y, mean, invstd, unbiased


@bn_act_train.register_fake
def _(x, weight, bias, residual, eps, slope, save_output, group):
    dt = reference_bn.compute_dtype(x)
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=dt), x.new_empty(c, dtype=dt), x.new_empty(c, dtype=dt)


@torch.library.custom_op("deeplab::bn_act_train_backward", mutates_args=())
def bn_act_train_backward(dy: Tensor, saved: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, slope: float, save_output: bool,
                          group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) of bn_act_train; dresidual is empty without a residual."""
    c = saved.shape[1]
    kernel = _uses_kernel(saved, weight, residual)
    if kernel:
        dy = dy.to(torch.float32).contiguous(memory_format=torch.channels_last)
        dres = torch.empty_like(saved) if residual is not None else None
        sum_g, sum_gx = ops.bn_act_backward_reduce(_rows(saved), _rows(dy), mean, invstd, weight, bias, slope,
                                                   save_output, _rows(residual), _rows(dres))
    else:
        sum_g, sum_gx, g = reference_bn.backward_reduce(_last(saved), _last(dy), mean, invstd, weight, bias, slope,
                                                        save_output, _last(residual))
        dres = None
        if residual is not None:  # in saved's layout, as the fake implementation promises
            dres = torch.empty_like(saved, dtype=residual.dtype)
            _last(dres).copy_(g)
    # The affine gradients are this rank's sums: DDP averages them like any other parameter's.
    dweight, dbias = sum_gx.to(weight.dtype), sum_g.to(weight.dtype)
    count = saved.numel() // c
    if group:
        both = torch.cat([sum_g, sum_gx, sum_g.new_tensor([float(count)])])
        dist.all_reduce(both, group=_GROUPS[group])
        sum_g, sum_gx, count = both[:c], both[c:2 * c], float(both[-1])
    dt = invstd.dtype
    mean_g, mean_gx = (sum_g / count).to(dt), (sum_gx / count).to(dt)
    dx = torch.empty_like(saved)
    if kernel:
        ops.bn_act_backward(_rows(saved), _rows(dy), mean, invstd, weight, bias, mean_g, mean_gx, slope, save_output,
                            _rows(residual), out=_rows(dx))
    else:
        _last(dx).copy_(reference_bn.backward(_last(saved), _last(dy), mean, invstd, weight, bias, mean_g, mean_gx,
                                              slope, save_output, _last(residual)))
    return dx, dweight, dbias, (saved.new_empty(0) if dres is None else dres)


@bn_act_train_backward.register_fake
def _(dy, saved, weight, bias, residual, mean, invstd, slope, save_output, group):
    dres = saved.new_empty(0) if residual is None else torch.empty_like(saved, dtype=residual.dtype)
    return torch.empty_like(saved), torch.empty_like(weight), torch.empty_like(weight), dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, slope, save_output, group = inputs
    y, mean, invstd, _ = output
    # The point of the op: with save_output, x itself is not kept.
    ctx.save_for_backward(y if save_output else x, weight, bias, residual, mean, invstd)
    ctx.slope, ctx.save_output, ctx.group = slope, save_output, group
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _dmean, _dinvstd, _dvar):
    saved, weight, bias, residual, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias, dres = bn_act_train_backward(dy, saved, weight, bias, residual, mean, invstd, ctx.slope,
                                                     ctx.save_output, ctx.group)
    return dx, dweight, dbias, (dres if ctx.has_residual else None), None, None, None, None


bn_act_train.register_autograd(_backward, setup_context=_setup_context)


def _gather_stats(mean: Tensor, var: Tensor, count: int, group) -> Tuple[Tensor, Tensor, int]:
    """Global (mean, biased var, count) from every rank's, by Chan et al.'s parallel combination
    of (count, mean, M2), in float64: as accurate as one pass over the concatenated batch."""
    local = torch.cat([mean.new_tensor([float(count)]), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    c = mean.numel()
    counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
    return g_mean, g_m2 / total, int(total.item())


# ---- the module ----------------------------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (after adding `residual` if forward gets one), in one op
    that in training keeps its output instead of its input (leaky_relu, identity) or its input
    (relu: not invertible; a fused exact BN+ReLU).

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d, and the same running-statistic
    updates (momentum or cumulative average, unbiased variance). With one value per channel in
    training (the ASPP image pool at batch 1) it behaves like core.blocks.PoolBatchNorm2d: the
    normalised value is 0, the output is act(bias), and the running statistics stay as they are.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "leaky_relu", slope: float = 0.01,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if activation == "leaky_relu" and not slope > 0:
            raise ValueError(f"slope must be > 0 for leaky_relu (it is inverted in the backward), got {slope}")
        self.activation = activation
        self.slope = float(slope) if activation == "leaky_relu" else ACTIVATIONS[activation]
        self.process_group = None
        self.sync = False

    def extra_repr(self) -> str:
        act = f"leaky_relu({self.slope})" if self.activation == "leaky_relu" else self.activation
        return f"{super().extra_repr()}, activation={act}" + (", sync=True" if self.sync else "")

    def enable_sync(self, process_group=None) -> "BatchNormAct2d":
        """Synchronise training-mode statistics over `process_group` (default: WORLD) when
        torch.distributed is initialised with more than one rank."""
        self.sync, self.process_group = True, process_group
        return self

    def folded_activation(self) -> nn.Module:
        """What remains once this BN is folded into the preceding conv (core.blocks)."""
        return Activation(self.activation, self.slope)

    def _sync_group(self) -> str:
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return ""
        if dist.get_world_size(self.process_group or dist.group.WORLD) <= 1:
            return ""
        return _group_name(self.process_group)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        if not (self.training or self.running_mean is None):
            # Eval: running statistics, plain torch ops (autograd works if asked for).
            out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return _activate(out if residual is None else out + residual, self.slope, inplace=True)
        # meta tensors (FLOP counting, atrous planning) carry no values to share: no collective
        group = self._sync_group() if self.training and x.device.type != "meta" else ""
        if self.training and not group and x.numel() // x.shape[1] == 1:
            return self._one_value_forward(x, residual)
        weight, bias = self.weight, self.bias
        if weight is None:
            weight = torch.ones(self.num_features, device=x.device, dtype=torch.float32)
            bias = torch.zeros_like(weight)
        y, mean, _, var = bn_act_train(x, weight, bias, residual, self.eps, self.slope, self.activation != "relu",
                                       group)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        return y

    def _one_value_forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        # The batch statistics of one value are the value itself and variance 0 (PoolBatchNorm2d).
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        xhat = (x - mean) * torch.rsqrt(torch.zeros_like(mean) + self.eps)
        out = xhat
        if self.weight is not None:
            out = xhat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if residual is not None:
            out = out + residual
        return _activate(out, self.slope).to(x.dtype)


def _activate(v: Tensor, slope: float, inplace: bool = False) -> Tensor:
    if slope == 1.0:
        return v
    if slope == 0.0:
        return F.relu(v, inplace=inplace)
    return F.leaky_relu(v, slope, inplace=inplace)


class Activation(nn.Module):
    """act(x [+ residual]): a BatchNormAct2d once its BN is folded into the conv before it."""

    def __init__(self, activation: str = "leaky_relu", slope: float = 0.01):
        super().__init__()
        self.activation, self.slope = activation, slope

    def extra_repr(self) -> str:
        return f"{self.activation}" + (f"({self.slope})" if self.activation == "leaky_relu" else "")

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _activate(x if residual is None else x + residual, self.slope)


# ---- how a model builds its norms --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NormSpec:
    """The BN layers of one `norm` choice. Blocks ask for the BN they need by where it sits:

    bn_act(c)      BN followed by ReLU. For 'bn' the block applies its own ReLU (fuses_act False).
    bn(c)          BN with nothing after it but the residual add (the downsample BN).
    bn_add_act(c)  BN whose output is added to the shortcut, then ReLU'd (bottleneck bn3). With
                   fuses_residual it is called as bn(x, shortcut) and applies the activation itself.
    """
    norm: str = "bn"
    bn_class: type = nn.BatchNorm2d  # the BatchNorm of norm='bn' (build_model's norm_layer)
    slope: float = 0.01

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")

    @property
    def fuses_act(self) -> bool:
        return self.norm != "bn"

    @property
    def fuses_residual(self) -> bool:
        return self.norm == "inplace-abn-residual"

    def bn_act(self, channels: int) -> nn.Module:
        if self.norm == "bn":
            return self.bn_class(channels)
        return BatchNormAct2d(channels, activation="leaky_relu", slope=self.slope)

    def bn(self, channels: int) -> nn.Module:
        return self.bn_class(channels) if self.norm == "bn" else BatchNormAct2d(channels, activation="identity")

    def bn_add_act(self, channels: int) -> nn.Module:
        return self.bn_act(channels) if self.fuses_residual else self.bn(channels)


def norm_spec(norm="bn", norm_layer: Optional[type] = None) -> NormSpec:
    """A NormSpec from a `norm` name (or a NormSpec, returned as is); norm_layer replaces
    nn.BatchNorm2d for norm='bn' only. A BatchNorm class given as `norm` means norm='bn' with it."""
    if isinstance(norm, NormSpec):
        return norm
    if isinstance(norm, type):
        norm, norm_layer = "bn", norm
    spec = NormSpec(norm)
    if norm_layer is not None:
        if norm != "bn":
            raise ValueError(f"norm_layer replaces the BatchNorm of norm='bn' only; got norm={norm!r}")
        spec = dataclasses.replace(spec, bn_class=norm_layer)
    return spec
