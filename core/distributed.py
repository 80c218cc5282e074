"""In-rank distributed helpers: what a rank asks of an initialised process group, in one place.

Every helper is a no-op (or the identity) when no process group is initialised or it has one
rank, so the same code runs in one process and in many. Setting the group up, finding out who a
process is (torchrun, SLURM, the elastic agent) and launching ranks belong to launch/dist.py;
core/ only uses a group that exists.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """An initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def collective_device(device: torch.device) -> Optional[torch.device]:
    """Where a tensor must live for the group's backend: gloo reduces CPU tensors, nccl/hccl
    device tensors. None means "the CPU" (also without a group)."""
    if not is_distributed() or dist.get_backend() == "gloo":
        return None
    return device


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def gather_to_main(obj: Any) -> Optional[List[Any]]:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); [obj] without a process group."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def convert_sync_bn(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """torch.nn.SyncBatchNorm on accelerators, core.sync_bn.CpuSyncBatchNorm (gloo) on the CPU."""
    from core.sync_bn import convert_sync_batchnorm
    return convert_sync_batchnorm(model, device_type)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    device_ids = [device.index] if device.type != "cpu" and device.index is not None else None
    # broadcast_buffers=False: BN buffers are either synced (SyncBN) or per-rank like mmseg's
    # default; broadcasting them every forward would cost a collective per step.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
