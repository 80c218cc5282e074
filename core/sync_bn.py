"""Synchronised BatchNorm for `--sync-bn`, on accelerators and on the CPU (gloo).

torch.nn.SyncBatchNorm only synchronises CUDA/XPU/PrivateUse1 (NPU) tensors (it raises for CPU
ones, and DDP rejects it in CPU modules). On accelerators `convert_sync_batchnorm` is torch's;
on the CPU it installs CpuSyncBatchNorm, which computes the same thing with plain collectives:
per-rank (count, mean, M2) are all-gathered and combined with Chan et al.'s parallel-variance
formula (numerically as good as one big batch), and the backward all-reduces the two sums BN's
input gradient needs.

core.norm.BatchNormAct2d (the memory-saving norms) synchronises itself with the same collectives
on any backend (gloo, NCCL, HCCL); converting only switches that on, on every device, and keeps
the module (replacing it with a SyncBatchNorm would drop its activation).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from core.distributed import is_distributed

_BatchNorm = nn.modules.batchnorm._BatchNorm


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are synchronised over the default (gloo) group.

    Not a subclass of nn.SyncBatchNorm on purpose: DDP refuses nn.SyncBatchNorm on CPU modules.
    Same parameters, buffers and state-dict keys as BatchNorm2d / SyncBatchNorm.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._syncs(x):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        group = self.process_group or dist.group.WORLD
        return _CpuSyncBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.eps, momentum, group)

    def _syncs(self, x: torch.Tensor) -> bool:
        # meta tensors (FLOP counting, atrous planning) carry no values to share: no collective
        return (self.training and self.track_running_stats and x.device.type != "meta"
                and is_distributed(self.process_group))


class _CpuSyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        xf = x.float()
        dims = [0] + list(range(2, x.ndim))
        count = xf.numel() // xf.shape[1]
        var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
        local = torch.cat([torch.tensor([float(count)]), mean, var * count])  # count, mean, M2
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered).double()
        c = stats[:, :1]
        means, m2s = stats[:, 1:1 + mean.numel()], stats[:, 1 + mean.numel():]
        total = c.sum()
        g_mean = (c * means).sum(0) / total
        g_m2 = m2s.sum(0) + (c * (means - g_mean) ** 2).sum(0)  # Chan's combination
        g_var = g_m2 / total
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
            unbiased = g_var * total / max(float(total) - 1.0, 1.0)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, -1] + [1] * (x.ndim - 2)
        invstd = torch.rsqrt(g_var + eps).float()
        xhat = (xf - g_mean.float().view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.total = float(total)
        ctx.group = group
        ctx.in_dtype = x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        g = grad_out.float()
        dims = [0] + list(range(2, g.ndim))
        shape = [1, -1] + [1] * (g.ndim - 2)
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * xhat).sum(dims)
        # The affine grads stay local: DDP averages them like every other parameter gradient.
        grad_weight = sum_dy_xhat.clone() if weight is not None else None
        grad_bias = sum_dy.clone() if weight is not None else None
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        sum_dy, sum_dy_xhat = both.chunk(2)
        scale = invstd if weight is None else invstd * weight.float()
        grad_x = (g - (sum_dy / ctx.total).view(shape) - xhat * (sum_dy_xhat / ctx.total).view(shape))
        grad_x = grad_x * scale.view(shape)
        if weight is not None:
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        return grad_x.to(ctx.in_dtype), grad_weight, grad_bias, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu", process_group=None) -> nn.Module:
    """Every BatchNorm of `module` -> a synchronised one: torch's nn.SyncBatchNorm on
    accelerators (torch.nn.SyncBatchNorm.convert_sync_batchnorm), CpuSyncBatchNorm on the CPU.
    core.norm.BatchNormAct2d layers stay as they are, with their own synchronisation enabled."""
    return _convert(module, process_group, device_type)


def _convert(module: nn.Module, process_group, device_type: str) -> nn.Module:
    from core.norm import BatchNormAct2d
    out = module
    if isinstance(module, BatchNormAct2d):
        module.enable_sync(process_group)
    elif isinstance(module, _BatchNorm) and device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)  # as before, per BN
    elif isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group=process_group)
        with torch.no_grad():
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group, device_type))
    return out
