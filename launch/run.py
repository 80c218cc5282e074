#!/usr/bin/env python
"""Train or evaluate DeepLabV3. `python launch/run.py` alone is the embedded demo.

    python launch/run.py                                          # demo: r18 on the synthetic set, CPU
    python launch/run.py --data /data/cityscapes --nproc 8 --opt-level O2
    python launch/run.py --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 --nproc 8 ...
    torchrun --nproc-per-node 8 launch/run.py --data ...           # also runs as-is under torchrun / srun
    python launch/run.py --eval-only --checkpoint work_dirs/.../iter_40000.pt

Reads top to bottom: build_model, build_loader, train_one_step (core/engine.py), evaluate,
train(cfg), main(cfg); the launcher role (spawning --nproc ranks) is the last function.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Optional

# Run as a script from a checkout: make the repository importable even without `pip install -e .`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core import checkpoint as ckpt_io  # noqa: E402
from core.amp import Amp, describe, resolve_dtype  # noqa: E402
from core.config import TrainConfig, parse_config, save_yaml, to_dict, to_yaml  # noqa: E402
from core.device import get_device  # noqa: E402
from core.engine import evaluate, train_one_step  # noqa: E402
from core.logger import TrainLogger  # noqa: E402
from core.losses import seg_loss  # noqa: E402
from core.metrics import compute_metrics, format_table, save_json  # noqa: E402
from core.mfu import PEAK_CACHE_NAME, count_train_step_flops, measure_peak_tflops  # noqa: E402
from core.optim import PolyLR, build_sgd  # noqa: E402
from data_loader.loader import LoaderInterrupted  # noqa: E402
from data_loader.synthetic import cache_root  # noqa: E402
from launch import dist  # noqa: E402

# Test hook: DEEPLAB_TEST_FAIL_AT="RANK:ITER" makes that rank raise after that iteration, so tests
# can check that one failing rank brings the whole job down (see tests/test_launch_run.py).
FAIL_AT_ENV = "DEEPLAB_TEST_FAIL_AT"
ARCH_FIELDS = ("backbone", "output_stride", "num_classes", "base_channels")
STOP_GRACE_S = 30.0  # after a stop signal, how long a rank of a multi-process job still waits for its batch


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The fp32 model on the CPU, identical on every rank: initialised from cfg.seed in a forked
    RNG, so building it leaves each rank's own random stream (seed + rank) untouched."""
    from core import build_model as build
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build(backbone=cfg.backbone, output_stride=cfg.output_stride, num_classes=cfg.num_classes,
                     aux_head=True, pretrained=cfg.pretrained, base_channels=cfg.base_channels)


def loader_waits(cfg: TrainConfig, env: dist.DistEnv, stop: Optional[dist.StopFlag]) -> dict:
    """How long a rank waits for a batch, and what a stop signal does to that wait: one process
    stops waiting at once (no step has started, so it checkpoints where it is); a rank of a
    multi-process job gives the batch STOP_GRACE_S more seconds, because the others are inside
    the step's collectives and the stop is agreed at its end (past that, the worker is stuck)."""
    return dict(timeout=cfg.loader_timeout, start_timeout=cfg.loader_start_timeout,
                interrupt=(lambda: stop.requested) if stop is not None else None,
                interrupt_grace=STOP_GRACE_S if env.distributed else 0.0,
                log=lambda text: print(f"[rank {env.rank}] {text}", file=sys.stderr, flush=True))


def build_loader(cfg: TrainConfig, data_root: str, env: dist.DistEnv, batch_size: int, device,
                 stop: Optional[dist.StopFlag] = None):
    from data_loader.loader import build_train_loader
    return build_train_loader(data_root, "train", batch_size, crop=cfg.crop, scale=cfg.scale,
                              ratio_range=cfg.ratio_range, cat_max_ratio=cfg.cat_max_ratio,
                              workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                              pin_memory=device.type == "cuda", pack=cfg.pack, **loader_waits(cfg, env, stop))


def run_evaluation(cfg: TrainConfig, model, amp: Amp, device, env: dist.DistEnv, data_root: str,
                   stop: Optional[dist.StopFlag] = None):
    """Confusion matrix over the val split (sharded over ranks, summed) -> metrics dict."""
    from data_loader.cityscapes import CLASSES
    from data_loader.loader import build_val_loader
    loader = build_val_loader(data_root, "val", workers=min(cfg.workers, 2), rank=env.rank,
                              world_size=env.world_size, scale=cfg.eval_scale, pack=cfg.pack,
                              **loader_waits(cfg, env, stop))
    try:
        matrix = evaluate(model, loader, device.torch_device, amp, cfg.num_classes, cfg.ignore_index,
                          mode=cfg.eval_mode, tile=cfg.eval_tile or cfg.crop, stride=cfg.eval_stride,
                          channels_last=cfg.channels_last, max_images=cfg.eval_max_images)
    finally:
        _close(loader)
    names = CLASSES if cfg.num_classes == len(CLASSES) else None
    return compute_metrics(matrix, names)


def checkpoint_state(cfg, iteration, model, amp, optimizer, schedule, loader, counters, device):
    """Everything needed to continue exactly; only tensors/numbers/strings (weights_only-safe).
    Collective: every rank contributes its RNG and loader position."""
    per_rank = dist.gather_to_main({"rng": ckpt_io.capture_rng(device.module), "loader": loader.state_dict()})
    if per_rank is None:
        return None
    return {
        "meta": {"iteration": iteration, "config": to_dict(cfg), "world_size": len(per_rank), "format": 1},
        "state_dict": amp.model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "amp": amp.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "rng": [r["rng"] for r in per_rank],
        "loader": [r["loader"] for r in per_rank],
        "counters": dict(counters),
    }


def save_checkpoint(cfg, env, log, iteration, model, amp, optimizer, schedule, loader, counters, device) -> None:
    """Collective (every rank calls it); rank 0 writes iter_<iteration>.pt atomically."""
    snapshot = checkpoint_state(cfg, iteration, model, amp, optimizer, schedule, loader, counters, device)
    if env.is_main:
        path = ckpt_io.checkpoint_path(cfg.work_dir, iteration)
        ckpt_io.save_atomic(snapshot, path)
        ckpt_io.prune_checkpoints(cfg.work_dir, cfg.keep_ckpts)
        log.info(f"saved {path}")


def train(cfg: TrainConfig, env: dist.DistEnv, device, data_root: str, stop: dist.StopFlag) -> int:
    batch_size = per_process_batch(cfg, env.world_size)
    log = TrainLogger(cfg.work_dir, env.is_main, cfg.iters, batch_size * env.world_size,
                      tensorboard=cfg.tensorboard)
    log.info("resolved config:\n" + to_yaml(cfg).rstrip())
    if env.is_main:
        save_yaml(cfg, os.path.join(cfg.work_dir, "config.yaml"))
    resume_path = dist.broadcast_from_main(ckpt_io.resolve_resume(cfg.resume, cfg.work_dir) if env.is_main else None)
    state = ckpt_io.load_checkpoint(resume_path) if resume_path else None

    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state["state_dict"])
    if cfg.sync_bn and env.distributed:
        model = dist.convert_sync_bn(model, device.type)
    model.to(device.torch_device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    amp = Amp(cfg.opt_level, device.type, resolve_dtype(cfg.amp_dtype, device.autocast_dtype), cfg.init_loss_scale)
    model = amp.prepare(model)
    optimizer = build_sgd(amp.optim_params, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = PolyLR(optimizer, cfg.iters, cfg.poly_power, cfg.min_lr)
    ddp_model = dist.wrap_ddp(model, device.torch_device) if env.distributed else model
    loss_fn = functools.partial(seg_loss, aux_weight=cfg.aux_weight, ignore_index=cfg.ignore_index,
                                avg_non_ignore=cfg.loss_avg_non_ignore)
    loader = build_loader(cfg, data_root, env, batch_size, device, stop)

    start_iter, counters = 0, {"skipped_total": 0, "skipped_in_row": 0}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        amp.load_state_dict(state["amp"])
        schedule.load_state_dict(state["lr_schedule"])
        start_iter, counters = int(state["meta"]["iteration"]), dict(state["counters"])
        same_world = len(state["rng"]) == env.world_size
        if same_world:
            loader.load_state_dict(state["loader"][env.rank])
        else:
            log.info(f"checkpoint was written by {len(state['rng'])} ranks, this run has {env.world_size}: "
                     "weights, optimizer and schedule restored; data order and RNG start afresh")
        log.info(f"resumed from {resume_path} at iteration {start_iter}")

    if env.is_main:  # FLOPs and peak only feed rank 0's log line
        no_weights = dataclasses.replace(cfg, pretrained=None)  # the count runs on the meta device
        log.flops_per_step = count_train_step_flops(functools.partial(build_model, no_weights), batch_size, cfg.crop)
        log.peak_tflops = cfg.peak_tflops or measure_peak_tflops(
            device.torch_device, amp.compute_dtype, os.path.join(cache_root(cfg.cache_dir), PEAK_CACHE_NAME),
            force=cfg.measure_peak, log=log.info)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"world {env.world_size} ({env.source}), device {device.torch_device}, "
             f"{torch.get_num_threads()} threads/rank, batch {batch_size}/rank, {describe(cfg.opt_level, amp.low_dtype)}, "
             f"{n_params / 1e6:.2f}M params, {log.flops_per_step / 1e12:.3f} TFLOP/step/rank, "
             f"peak {log.peak_tflops:.2f} TFLOP/s/rank, data {data_root}")

    if state is not None:
        if same_world:  # last, so nothing above can consume random numbers after the restore
            ckpt_io.restore_rng(state["rng"][env.rank], device.module)
        del state
    fail_at = _injected_failure(env.rank)
    loader_iter = iter(loader)
    iteration = start_iter
    try:
        while iteration < cfg.iters:
            lr = schedule.set_iteration(iteration)
            t0 = time.perf_counter()
            try:
                batch = next(loader_iter)
            except LoaderInterrupted:  # one process only (see loader_waits): no step has started
                save_checkpoint(cfg, env, log, iteration, model, amp, optimizer, schedule, loader, counters, device)
                log.info(f"stopped by {stop.signal_name} while waiting for a batch at iteration {iteration}; "
                         f"continue with --resume auto --work-dir {cfg.work_dir}")
                return 0
            t1 = time.perf_counter()
            result = train_one_step(ddp_model, batch.image, batch.label, amp, optimizer, loss_fn,
                                    device.torch_device, cfg.channels_last, stop.requested)
            t2 = time.perf_counter()
            iteration += 1
            if fail_at is not None and iteration == fail_at:
                raise RuntimeError(f"injected failure on rank {env.rank} at iteration {iteration} ({FAIL_AT_ENV})")
            counters["skipped_total"] += int(result.skipped)
            counters["skipped_in_row"] = counters["skipped_in_row"] + 1 if result.skipped else 0
            if counters["skipped_in_row"] >= cfg.max_nonfinite:
                raise RuntimeError(f"{counters['skipped_in_row']} consecutive steps had a non-finite loss or "
                                   f"gradient (up to iteration {iteration}); stopping. Try a lower --lr, "
                                   f"--opt-level O0, or check the data.")
            log.record_step(result.loss, result.parts, lr, 1000 * (t2 - t1), 1000 * (t1 - t0), result.skipped)
            finished = iteration == cfg.iters
            if iteration % cfg.log_interval == 0 or finished or result.stop:
                log.log_train(iteration, device.max_memory_bytes())
            if iteration % cfg.ckpt_interval == 0 or finished or result.stop:
                save_checkpoint(cfg, env, log, iteration, model, amp, optimizer, schedule, loader, counters, device)
            if result.stop:
                log.info(f"stopped by {stop.signal_name or 'a signal on another rank'} at iteration {iteration}; "
                         f"continue with --resume auto --work-dir {cfg.work_dir}")
                return 0
            if (cfg.eval_interval and iteration % cfg.eval_interval == 0) or finished:
                t = time.perf_counter()
                try:
                    metrics = run_evaluation(cfg, model, amp, device, env, data_root, stop)
                except LoaderInterrupted:  # the checkpoint of this iteration is written above or next
                    log.info(f"evaluation at iteration {iteration} interrupted by {stop.signal_name}")
                    continue
                log.log_eval(iteration, metrics, format_table(metrics), time.perf_counter() - t)
                if env.is_main:
                    save_json(metrics, os.path.join(cfg.work_dir, f"eval_iter_{iteration}.json"), iter=iteration)
        if counters["skipped_total"]:
            log.info(f"{counters['skipped_total']} steps were skipped for non-finite loss/gradients")
        return 0
    finally:
        _close(loader)
        log.finish()


def eval_only(cfg: TrainConfig, env: dist.DistEnv, device, data_root: str) -> int:
    path = cfg.checkpoint or ckpt_io.latest_checkpoint(cfg.work_dir)
    if path is None:
        raise FileNotFoundError(f"--eval-only needs --checkpoint FILE (no iter_*.pt in {cfg.work_dir})")
    state = ckpt_io.load_checkpoint(path)
    # The architecture is the checkpoint's (when it says), so evaluating needs no model flags.
    stored = state.get("meta", {}).get("config", {}) if isinstance(state.get("meta"), dict) else {}
    arch = {k: stored[k] for k in ARCH_FIELDS if k in stored and stored[k] != getattr(cfg, k)}
    if arch and env.is_main:
        print(f"using the checkpoint's model settings {arch}", flush=True)
    model = build_model(dataclasses.replace(cfg, pretrained=None, **arch))  # every weight comes from the file
    model.load_state_dict(state.get("state_dict", state))
    model.to(device.torch_device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    amp = Amp(cfg.opt_level, device.type, resolve_dtype(cfg.amp_dtype, device.autocast_dtype))
    model = amp.prepare(model)
    t = time.perf_counter()
    metrics = run_evaluation(cfg, model, amp, device, env, data_root)
    if env.is_main:
        print(f"{path} ({time.perf_counter() - t:.1f} s):\n{format_table(metrics)}", flush=True)
        os.makedirs(cfg.work_dir, exist_ok=True)
        out = os.path.join(cfg.work_dir, "eval_" + os.path.splitext(os.path.basename(path))[0] + ".json")
        save_json(metrics, out, checkpoint=os.path.abspath(path))
        print(f"metrics written to {out}", flush=True)
    return 0


def main(cfg: TrainConfig) -> int:
    """One rank: join the process group (if any), pick the device and threads, train or evaluate."""
    env = dist.detect_env() or dist.DistEnv()
    if cfg.cache_dir:  # ranks, loader workers and tools started from here all use it
        os.environ["DEEPLAB_CACHE"] = os.path.abspath(cfg.cache_dir)
    # Installed first, before any loader exists: a signal during set-up is then a stop request
    # too, and loaders (which only install a handler over the default action) leave it alone.
    stop = dist.StopFlag().install() if not cfg.eval_only else None
    device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = get_device(device_name, env.local_rank)
    device.set_current()
    torch.set_num_threads(dist.cpu_threads(cfg.threads, env.local_world_size))
    if env.distributed:
        dist.init_process_group(env, device.dist_backend, cfg.dist_timeout)
    try:
        seed_everything(cfg.seed + env.rank)
        data_root = resolve_data(cfg, env)
        if cfg.eval_only:
            return eval_only(cfg, env, device, data_root)
        return train(cfg, env, device, data_root, stop)
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            print(f"[rank {env.rank}] failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy()


# ---- helpers ---------------------------------------------------------------------------------------

def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    if cfg.batch_size:
        return cfg.batch_size
    if cfg.global_batch % world_size:
        raise ValueError(f"--global-batch {cfg.global_batch} does not split over {world_size} ranks; "
                         f"give --batch-size (per process) instead")
    return cfg.global_batch // world_size


def resolve_data(cfg: TrainConfig, env: dist.DistEnv) -> str:
    if cfg.data is not None:
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data!r} is not a directory (expected a Cityscapes layout: "
                                    "leftImg8bit/ and gtFine/)")
        return cfg.data
    from data_loader.synthetic import default_dataset
    if env.local_rank == 0:  # generate once per node; the other ranks then find it in the cache
        default_dataset()
    dist.barrier()
    return default_dataset()


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _injected_failure(rank: int):
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return None
    fail_rank, _, fail_iter = spec.partition(":")
    return int(fail_iter) if int(fail_rank) == rank else None


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def cli(argv) -> int:
    """Worker when a launcher (ours, torchrun, srun) set the rank; otherwise run in this process
    (one rank) or become the launcher for --nproc ranks on this node."""
    cfg = parse_config(argv)
    if dist.detect_env() is not None or (cfg.nproc == 1 and cfg.nnodes == 1):
        return main(cfg)
    return dist.launch_local_workers(os.path.abspath(__file__), list(argv), cfg.nproc, cfg.nnodes, cfg.node_rank,
                                     cfg.master_addr, cfg.master_port, cfg.threads, cfg.kill_grace)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
