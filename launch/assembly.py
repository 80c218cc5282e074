"""The training program, assembled in one place from one TrainConfig.

launch/run.py trains with it, profiling/trace.py profiles it, launch/tune.py and
bench/train_step.py measure it: none of them builds a model, optimizer, schedule, loss or loader
of its own, so what they measure is what training runs (as detectron2's benchmark calls its
trainer's builders). Reads top to bottom: set_up_process, resolve_data, build_model,
build_loader, build_training (-> Training, whose step() is core.engine.train_one_step).
"""
from __future__ import annotations

import functools
import os
import random
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch

from core import distributed as cdist
from core.amp import Amp, resolve_dtype
from core.config import TrainConfig
from core.cpu import cpu_model, low_precision_here
from core.device import Device, get_device
from core.engine import StepResult, train_one_step
from core.losses import seg_loss
from core.mfu import count_train_step_flops
from core.optim import PolyLR, build_sgd
from launch import dist

STOP_GRACE_S = 30.0  # after a stop signal, how long a rank of a multi-process job still waits for its batch


def set_up_process(cfg: TrainConfig):
    """This process as a rank: (DistEnv, Device). Joins the process group when a launcher (ours,
    torchrun, srun) started several; picks the device and the CPU threads; seeds every RNG."""
    env = dist.detect_env() or dist.DistEnv()
    if cfg.cache_dir:  # ranks, loader workers and tools started from here all use it
        os.environ["DEEPLAB_CACHE"] = os.path.abspath(cfg.cache_dir)
    device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = get_device(device_name, env.local_rank)
    device.set_current()
    check_precision(cfg, device)
    torch.set_num_threads(dist.cpu_threads(cfg.threads, env.local_world_size))
    if env.distributed:
        dist.init_process_group(env, device.dist_backend, cfg.dist_timeout)
    seed_everything(cfg.seed + env.rank)
    return env, device


def check_precision(cfg: TrainConfig, device) -> None:
    """Refuse a low-precision opt level on a CPU without kernels for its dtype: torch would run
    bf16 convolutions on a reference path 10-30x slower than fp32 (fp16 about 27x), silently."""
    if device.type != "cpu" or cfg.opt_level == "O0" or cfg.allow_slow_precision:
        return
    dtype = str(resolve_dtype(cfg.amp_dtype, device.autocast_dtype)).replace("torch.", "")
    ok, why = low_precision_here(dtype)
    if not ok:
        raise ValueError(f"--opt-level {cfg.opt_level} computes in {dtype}, but on this CPU ({cpu_model()}) {why}: "
                         "training would run 10-30x slower than in fp32. Use --opt-level O0 (the default), or "
                         "--allow-slow-precision to run it anyway.")


def check_data(cfg: TrainConfig, data_root: str) -> None:
    """Find now what would otherwise fail late: a broken val split at the first evaluation (4000
    iterations in with the preset), labels beyond --num-classes inside the loss. Reads the val
    index and 8 train labels spread over the split (a pack was checked when it was written)."""
    if cfg.pack:
        return
    from data_loader.cityscapes import CityscapesIndex
    from data_loader.decode import read_label
    samples = CityscapesIndex(data_root, "train", check_sizes=False).samples  # the loader checks sizes itself
    if cfg.evaluate:
        CityscapesIndex(data_root, "val")  # DatasetError naming the file or folder
    for _, label in samples[::max(1, len(samples) // 8)][:8]:
        values = np.unique(read_label(label))
        values = values[values != cfg.ignore_index]
        if values.size and values.max() >= cfg.num_classes:
            raise ValueError(f"{label}: label value {int(values.max())}, but --num-classes is {cfg.num_classes} "
                             f"(labels must be below it or {cfg.ignore_index}, the ignore index; Cityscapes' "
                             "labelTrainIds need --num-classes 19)")


def check_memory(cfg: TrainConfig, env: dist.DistEnv, device: Device, batch: int, log: Callable[[str], None]) -> None:
    """Say before training when the configured batch cannot fit: the estimate (core/memory.py) of
    every process on this node against the memory available (CPU; accelerators report their own)."""
    if device.type != "cpu":
        return
    from core.amp import OPT_LEVELS
    from core.memory import available_bytes, estimate_train_memory
    from data_loader.loader import ring_slots
    from data_loader.shm_ring import SlotSpec
    no_weights = replace(cfg, pretrained=None, load_from=None)
    est = estimate_train_memory(functools.partial(build_model, no_weights), batch, cfg.crop, cfg.channels_last,
                                OPT_LEVELS[cfg.opt_level].master_weights,
                                SlotSpec(batch, *cfg.crop).nbytes * ring_slots(cfg.workers, cfg.prefetch))
    need, have = est.total * env.local_world_size, available_bytes()
    log(f"estimated memory per process: {est.describe()}; {env.local_world_size} on this node, "
        f"{have / 2 ** 30:.1f} GiB available")
    if need > have and cfg.memory_check:
        raise MemoryError(
            f"batch {batch}/process at {cfg.crop[0]}x{cfg.crop[1]} needs about {need / 2 ** 30:.1f} GiB on this node "
            f"({env.local_world_size} x {est.total / 2 ** 30:.1f} GiB), but only {have / 2 ** 30:.1f} GiB is "
            "available. Lower --batch-size/--global-batch or --crop, use --norm inplace-abn (less activation memory) "
            "or a bf16 --opt-level where the CPU has bf16 kernels; --no-memory-check starts anyway.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_data(cfg: TrainConfig, env: dist.DistEnv) -> str:
    if cfg.data is not None:
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data!r} is not a directory (expected a Cityscapes layout: "
                                    "leftImg8bit/ and gtFine/)")
        return cfg.data
    from data_loader.synthetic import default_dataset
    if env.local_rank == 0:  # generate once per node; the other ranks then find it in the cache
        default_dataset()
    cdist.barrier()
    return default_dataset()


def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    if cfg.batch_size:
        return cfg.batch_size
    if cfg.global_batch % world_size:
        raise ValueError(f"--global-batch {cfg.global_batch} does not split over {world_size} ranks; "
                         f"give --batch-size (per process) instead")
    return cfg.global_batch // world_size


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The fp32 model on the CPU, identical on every rank: initialised from cfg.seed in a forked
    RNG, so building it leaves each rank's own random stream (seed + rank) untouched."""
    from core import build_model as build
    from core.atrous import convert_atrous
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build(backbone=cfg.backbone, output_stride=cfg.output_stride, num_classes=cfg.num_classes,
                      aux_head=True, pretrained=cfg.pretrained, base_channels=cfg.base_channels, norm=cfg.norm)
    if cfg.winograd:  # first: the padding-aware conversion then takes the dilations above 4
        from core.winograd import convert_winograd
        convert_winograd(model, max_dilation=4)
    if cfg.atrous:  # same parameters and keys: checkpoints do not depend on either
        convert_atrous(model)
    return model


def loader_waits(cfg: TrainConfig, env: dist.DistEnv, stop=None) -> dict:
    """How long a rank waits for a batch, and what a stop signal does to that wait: one process
    stops waiting at once (no step has started, so it checkpoints where it is); a rank of a
    multi-process job gives the batch STOP_GRACE_S more seconds, because the others are inside
    the step's collectives and the stop is agreed at its end (past that, the worker is stuck)."""
    return dict(timeout=cfg.loader_timeout, start_timeout=cfg.loader_start_timeout,
                interrupt=(lambda: stop.requested) if stop is not None else None,
                interrupt_grace=STOP_GRACE_S if env.distributed else 0.0,
                log=lambda text: print(f"[rank {env.rank}] {text}", file=sys.stderr, flush=True))


def build_loader(cfg: TrainConfig, data_root: str, env: dist.DistEnv, batch_size: int, device: Device, stop=None):
    from data_loader.loader import build_train_loader
    return build_train_loader(data_root, "train", batch_size, crop=cfg.crop, scale=cfg.scale,
                              ratio_range=cfg.ratio_range, cat_max_ratio=cfg.cat_max_ratio,
                              workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                              pin_memory=device.type == "cuda", pack=cfg.pack, prefetch=cfg.prefetch,
                              **loader_waits(cfg, env, stop))


@dataclass
class Training:
    """Everything one training step needs, built once. `model` is the plain module (for
    checkpoints and evaluation), `ddp_model` what the step runs (DDP-wrapped when distributed)."""
    cfg: TrainConfig
    env: dist.DistEnv
    device: Device
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # what the step runs: DDP-wrapped when distributed, compiled with --compile
    eval_model: torch.nn.Module  # `model` itself, or its compiled form with --compile
    amp: Amp
    optimizer: torch.optim.Optimizer
    schedule: PolyLR
    loss_fn: Callable
    loader: object
    batch_size: int  # per process

    def step(self, batch, stop_requested: bool = False, timer: Optional[Callable[[str], None]] = None) -> StepResult:
        return train_one_step(self.ddp_model, batch, self.amp, self.optimizer, self.loss_fn,
                              self.device.torch_device, self.cfg.channels_last, stop_requested, timer)

    def flops_per_step(self) -> int:
        """FLOPs of one step of this process's model as plain convolutions compute it (counted on the
        meta device: no compute); flops_skipped_per_step says how much of it the step skips."""
        no_weights = replace(self.cfg, pretrained=None, load_from=None, atrous=False)
        return count_train_step_flops(functools.partial(build_model, no_weights), self.batch_size, self.cfg.crop)

    def flops_skipped_per_step(self) -> int:
        """FLOPs of flops_per_step() not computed: by the padding-aware atrous convolutions (they
        would read only zero padding; the ASPP bottleneck's constant image-pool channels likewise) and
        by Winograd (fewer products for the same result). Subtract them for the FLOPs the step really performs."""
        from core.atrous_plan import count_skipped_macs
        from core.heads import count_split_pool_flops
        from core.winograd import count_skipped_flops
        shape = (self.batch_size, 3, *self.cfg.crop)
        skipped = 0
        if self.cfg.atrous:
            skipped += int(count_skipped_macs(self.model, shape, self.amp.compute_dtype, self.device.type)[
                "train_step_flops_skipped"])
            skipped += count_split_pool_flops(self.model, shape)
        if self.cfg.winograd and not self.cfg.compile:  # a compiled graph keeps the direct conv
            skipped += count_skipped_flops(self.model, shape, self.amp.compute_dtype, self.device.type)
        return skipped

    def restore(self, state: dict, log: Callable[[str], None]) -> int:
        """Continue from a checkpoint written by build_training's pieces; returns its iteration.
        The RNG is restored by the caller, last, once nothing else will draw random numbers."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.amp.load_state_dict(state["amp"])
        self.schedule.load_state_dict(state["lr_schedule"])
        written = state["loader"]
        if len(written) != self.env.world_size:
            old_global = written[0]["batch_size"] * len(written)
            if old_global != self.batch_size * self.env.world_size:
                # The iteration count and the poly schedule count steps: a step of another size
                # would make them disagree with the samples seen.
                raise ValueError(f"the checkpoint was written by {len(written)} ranks x batch "
                                 f"{written[0]['batch_size']} = {old_global} images per step; resuming on "
                                 f"{self.env.world_size} ranks needs the same global batch (--global-batch "
                                 f"{old_global}, or --batch-size {old_global // self.env.world_size} per rank)")
            log(f"checkpoint was written by {len(written)} ranks, this run has {self.env.world_size}: weights, "
                "optimizer, schedule and the global data order continue; the RNG starts afresh")
        # The whole per-rank list: the loader takes its own entry on the same world size, and
        # otherwise continues the global sample order where the job stopped (data_loader/sampler.py).
        self.loader.load_state_dict(written)
        return int(state["meta"]["iteration"])

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def build_training(cfg: TrainConfig, env: dist.DistEnv, device: Device, data_root: str, stop=None,
                   weights: Optional[dict] = None, log: Callable[[str], None] = print) -> Training:
    """Model (weights from `weights`, else --load-from, else the initialisation), opt level,
    SGD, poly schedule, loss and loader, in the order that keeps every rank's RNG in step."""
    model = build_model(cfg)
    if weights is not None:
        model.load_state_dict(weights)
    elif cfg.load_from:
        from core.mmseg_io import load_model_weights
        for line in load_model_weights(model, cfg.load_from):
            log(line)
    if cfg.sync_bn and env.distributed:
        model = cdist.convert_sync_bn(model, device.type)
    model.to(device.torch_device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    amp = Amp(cfg.opt_level, device.type, resolve_dtype(cfg.amp_dtype, device.autocast_dtype), cfg.init_loss_scale)
    model = amp.prepare(model)
    if cfg.norm != "bn" and device.type == "cpu" and amp.compute_dtype != torch.float32:
        log(f"note: --norm {cfg.norm} at {cfg.opt_level} gets {str(amp.compute_dtype).replace('torch.', '')} activations, "
            "which take its torch path (the fused C++ kernel is fp32): measured slower than bn there and with no "
            "memory gain at O2 (README, Tuning); it saves memory at O0")
    optimizer = build_sgd(amp.optim_params, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = PolyLR(optimizer, cfg.iters, cfg.poly_power, cfg.min_lr)
    ddp_model = cdist.wrap_ddp(model, device.torch_device) if env.distributed else model
    eval_model = model
    if cfg.compile:  # DDP first, then compile: dynamo then splits the graph at DDP's buckets
        ddp_model, eval_model = compile_model(ddp_model), compile_model(model)
    loss_fn = functools.partial(seg_loss, aux_weight=cfg.aux_weight, ignore_index=cfg.ignore_index,
                                avg_non_ignore=cfg.loss_avg_non_ignore)
    batch_size = per_process_batch(cfg, env.world_size)
    loader = build_loader(cfg, data_root, env, batch_size, device, stop)
    return Training(cfg, env, device, model, ddp_model, eval_model, amp, optimizer, schedule, loss_fn, loader,
                    batch_size)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with static shapes: the crop, the batch and the evaluation slot never change,
    so each compiled graph (train mode, eval mode) is built once; dynamic=False makes a shape
    change a visible recompilation instead of a silently slower dynamic graph."""
    return torch.compile(model, dynamic=False)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (constant once every mode ran)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
