#!/usr/bin/env python
"""Train or evaluate DeepLabV3. `python launch/run.py` alone is the embedded demo.

    python launch/run.py                                          # demo: r18 on the synthetic set, CPU
    python launch/run.py --data /data/cityscapes --nproc 8 --opt-level O2
    python launch/run.py --nnodes 2 --master-addr HOST --master-port 29500 --nproc 8 ...   # on every node
    torchrun --nproc-per-node 8 launch/run.py --data ...           # also runs as-is under torchrun / srun
    python launch/run.py --eval-only --checkpoint work_dirs/.../iter_40000.pt

Reads top to bottom: the pieces are assembled in launch/assembly.py (build_model, build_loader,
build_training; the step is core/engine.py's train_one_step); here: run_evaluation, checkpoints,
train(cfg), eval_only(cfg), main(cfg) for one rank, and cli(), which becomes torch's elastic
launcher (launch/dist.py) when --nproc / --nnodes ask for several ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

# Run as a script from a checkout: make the repository importable even without `pip install -e .`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from core import checkpoint as ckpt_io  # noqa: E402
from core import distributed as cdist  # noqa: E402
from core.amp import Amp, describe, resolve_dtype  # noqa: E402
from core.config import TrainConfig, parse_config, save_yaml, to_dict, to_yaml  # noqa: E402
from core.engine import evaluate  # noqa: E402
from core.logger import TrainLogger  # noqa: E402
from core.metrics import compute_metrics, format_table, save_json  # noqa: E402
from core.mfu import PEAK_CACHE_NAME, measure_peak_tflops  # noqa: E402
from data_loader.loader import LoaderInterrupted  # noqa: E402
from data_loader.synthetic import cache_root  # noqa: E402
from launch import dist  # noqa: E402
from launch.assembly import (build_model, build_training, check_data, check_memory, compile_model,  # noqa: E402
                             compiled_graphs, loader_waits, per_process_batch, resolve_data, set_up_process)

# Test hook: DEEPLAB_TEST_FAIL_AT="RANK:ITER" makes that rank raise after that iteration, in the
# job's first attempt only, so tests can check that one failing rank brings the whole job down and
# that --max-restarts brings it back (tests/test_launch_run.py, tests/test_launch_elastic.py).
FAIL_AT_ENV = "DEEPLAB_TEST_FAIL_AT"
# Test hook: DEEPLAB_TEST_RESTART_DELAY="RANK:SECONDS" makes that rank of a restarted attempt wait
# before joining the process group, so the other ranks look up its address first (a stale address
# left by the previous attempt would then be found: tests/test_launch_elastic.py).
RESTART_DELAY_ENV = "DEEPLAB_TEST_RESTART_DELAY"
ARCH_FIELDS = ("backbone", "output_stride", "num_classes", "base_channels", "norm")  # what the weights belong to


def run_evaluation(cfg: TrainConfig, model, amp: Amp, device, env: dist.DistEnv, data_root: str, stop=None):
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
        loader.close()
    names = CLASSES if cfg.num_classes == len(CLASSES) else None
    return compute_metrics(matrix, names)


def checkpoint_state(training, iteration: int, counters: dict):
    """Everything needed to continue exactly; only tensors/numbers/strings (weights_only-safe).
    Collective: every rank contributes its RNG and loader position."""
    from core.mmseg_io import dataset_meta
    t = training
    per_rank = cdist.gather_to_main({"rng": ckpt_io.capture_rng(t.device.module), "loader": t.loader.state_dict()})
    if per_rank is None:
        return None
    return {
        # dataset_meta (mmseg 1.x) and CLASSES/PALETTE (0.x): mmseg's own tools read the classes from it.
        "meta": {"iteration": iteration, "config": to_dict(t.cfg), "world_size": len(per_rank), "format": 1,
                 **dataset_meta(t.cfg.num_classes)},
        "state_dict": t.amp.model_state_dict(t.model),
        "optimizer": t.optimizer.state_dict(),
        "amp": t.amp.state_dict(),
        "lr_schedule": t.schedule.state_dict(),
        "rng": [r["rng"] for r in per_rank],
        "loader": [r["loader"] for r in per_rank],
        "counters": dict(counters),
    }


def save_checkpoint(training, log: TrainLogger, iteration: int, counters: dict) -> None:
    """Collective (every rank calls it); rank 0 writes iter_<iteration>.pt atomically."""
    cfg = training.cfg
    snapshot = checkpoint_state(training, iteration, counters)
    if training.env.is_main and cfg.checkpoints:
        path = ckpt_io.checkpoint_path(cfg.work_dir, iteration)
        ckpt_io.save_atomic(snapshot, path)
        ckpt_io.prune_checkpoints(cfg.work_dir, cfg.keep_ckpts)
        log.info(f"saved {path}")


def train(cfg: TrainConfig, env: dist.DistEnv, device, data_root: str, stop: dist.StopFlag) -> int:
    # One run per work dir: a second one would interleave the logs and prune the first's checkpoints.
    with ckpt_io.WorkDirLock(cfg.work_dir) if env.is_main else contextlib.nullcontext():
        return _train(cfg, env, device, data_root, stop)


def _train(cfg: TrainConfig, env: dist.DistEnv, device, data_root: str, stop: dist.StopFlag) -> int:
    from core.pretrained import pretrained_notice
    log = TrainLogger(cfg.work_dir, env.is_main, cfg.iters, per_process_batch(cfg, env.world_size) * env.world_size,
                      tensorboard=cfg.tensorboard)
    log.info("resolved config:\n" + to_yaml(cfg).rstrip())
    if env.is_main:
        save_yaml(cfg, os.path.join(cfg.work_dir, "config.yaml"))
    resume_path = cdist.broadcast_from_main(ckpt_io.resolve_resume(cfg.resume, cfg.work_dir) if env.is_main else None)
    notice = pretrained_notice(cfg, resuming=resume_path is not None)
    if notice:
        log.info(notice)
    check_data(cfg, data_root)
    check_memory(cfg, env, device, per_process_batch(cfg, env.world_size), log.info)
    state = ckpt_io.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        check_resumable(cfg, state, resume_path)
        done = int(state["meta"]["iteration"])
        if done >= cfg.iters:
            log.info(f"{resume_path} is at iteration {done} and --iters is {cfg.iters}: nothing left to train "
                     "(raise --iters to train further; --eval-only --checkpoint evaluates it)")
            return 0
    training = build_training(cfg, env, device, data_root, stop, weights=state["state_dict"] if state else None,
                              log=log.info)
    start_iter, counters = 0, {"skipped_total": 0, "skipped_in_row": 0}
    if state is not None:
        start_iter = training.restore(state, log.info)
        counters = dict(state["counters"])
        log.info(f"resumed from {resume_path} at iteration {start_iter}")
    if env.is_main:  # FLOPs and peak only feed rank 0's log line
        plain_flops, skipped = training.flops_per_step(), training.flops_skipped_per_step()
        log.flops_per_step = plain_flops - skipped  # MFU counts the work really done
        if skipped:
            log.info(f"the model's {plain_flops / 1e12:.3f} TFLOP/step (direct convolutions) include "
                     f"{skipped / 1e12:.3f} that are not computed (padding-aware atrous convolutions skip zero "
                     f"padding, the ASPP bottleneck its constant image-pool map, Winograd needs fewer products); "
                     f"MFU counts the rest")
        log.peak_tflops = cfg.peak_tflops or measure_peak_tflops(
            device.torch_device, training.amp.compute_dtype, os.path.join(cache_root(cfg.cache_dir), PEAK_CACHE_NAME),
            force=cfg.measure_peak, log=log.info)
    n_params = sum(p.numel() for p in training.model.parameters())
    log.info(f"world {env.world_size} ({env.source}), device {device.torch_device}, "
             f"{torch.get_num_threads()} threads/rank, batch {training.batch_size}/rank, "
             f"{describe(cfg.opt_level, training.amp.low_dtype)}, {n_params / 1e6:.2f}M params, "
             f"{log.flops_per_step / 1e12:.3f} TFLOP/step/rank, peak {log.peak_tflops:.2f} TFLOP/s/rank, "
             f"data {data_root}")
    if state is not None:
        if len(state["rng"]) == env.world_size:  # last: nothing above may draw random numbers after it
            ckpt_io.restore_rng(state["rng"][env.rank], device.module)
        del state

    fail_at = _injected_failure(env.rank)
    loader_iter = iter(training.loader)
    iteration = start_iter
    try:
        while iteration < cfg.iters:
            lr = training.schedule.set_iteration(iteration)
            t0 = time.perf_counter()
            try:
                batch = next(loader_iter)
            except LoaderInterrupted:  # one process only (see loader_waits): no step has started
                save_checkpoint(training, log, iteration, counters)
                log.info(f"stopped by {stop.signal_name} while waiting for a batch at iteration {iteration}; "
                         f"continue with --resume auto --work-dir {cfg.work_dir}")
                return 0
            t1 = time.perf_counter()
            result = training.step(batch, stop.requested)
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
            log.record_step(result.loss, result.parts, lr, 1000 * (t2 - t1), 1000 * (t1 - t0), result.skipped,
                            graphs=compiled_graphs() if cfg.compile else None)
            finished = iteration == cfg.iters
            if iteration % cfg.log_interval == 0 or finished or result.stop:
                log.log_train(iteration, device.max_memory_bytes())
            if iteration % cfg.ckpt_interval == 0 or finished or result.stop:
                save_checkpoint(training, log, iteration, counters)
            if result.stop:
                log.info(f"stopped by {stop.signal_name or 'a signal on another rank'} at iteration {iteration}; "
                         f"continue with --resume auto --work-dir {cfg.work_dir}")
                return 0
            if cfg.evaluate and ((cfg.eval_interval and iteration % cfg.eval_interval == 0) or finished):
                t = time.perf_counter()
                try:
                    metrics = run_evaluation(cfg, training.eval_model, training.amp, device, env, data_root, stop)
                except LoaderInterrupted:  # the checkpoint of this iteration is written above or next
                    log.info(f"evaluation at iteration {iteration} interrupted by {stop.signal_name}")
                    continue
                log.log_eval(iteration, metrics, format_table(metrics), time.perf_counter() - t,
                             graphs=compiled_graphs() if cfg.compile else None)
                if env.is_main:
                    save_json(metrics, os.path.join(cfg.work_dir, f"eval_iter_{iteration}.json"), iter=iteration)
        if counters["skipped_total"]:
            log.info(f"{counters['skipped_total']} steps were skipped for non-finite loss/gradients")
        return 0
    finally:
        training.close()
        log.finish()


def eval_only(cfg: TrainConfig, env: dist.DistEnv, device, data_root: str) -> int:
    """Evaluate a checkpoint: ours, or an mmseg 0.x / 1.x DeepLabV3 file (read without running it)."""
    from core.mmseg_io import read_checkpoint
    path = cfg.checkpoint or ckpt_io.latest_checkpoint(cfg.work_dir)
    if path is None:
        raise FileNotFoundError(f"--eval-only needs --checkpoint FILE (no iter_*.pt in {cfg.work_dir})")
    ckpt = read_checkpoint(path)
    # The architecture is the checkpoint's, so evaluating needs no model flags; what else its
    # config says about the model (e.g. the norm) is used too when the file is one of ours.
    stored = {k: v for k, v in ckpt.config.items() if k in ARCH_FIELDS} if ckpt.source == "deeplab-trainer" else {}
    arch = {k: v for k, v in {**stored, **ckpt.settings}.items() if v != getattr(cfg, k)}
    if env.is_main:
        print(f"{path}: {ckpt.describe()}" + (f"; using its model settings {arch}" if arch else ""), flush=True)
        for note in ckpt.notes:
            print(f"  note: {note}", flush=True)
    cfg = dataclasses.replace(cfg, pretrained=None, load_from=None, **arch)  # every weight comes from the file
    model = build_model(cfg)
    if not ckpt.aux_head:  # evaluation never runs the aux head; mmseg files often come without it
        model.auxiliary_head = None
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device.torch_device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    amp = Amp(cfg.opt_level, device.type, resolve_dtype(cfg.amp_dtype, device.autocast_dtype))
    model = amp.prepare(model)
    t = time.perf_counter()
    metrics = run_evaluation(cfg, compile_model(model) if cfg.compile else model, amp, device, env, data_root)
    if env.is_main:
        print(f"{path} ({time.perf_counter() - t:.1f} s):\n{format_table(metrics)}", flush=True)
        os.makedirs(cfg.work_dir, exist_ok=True)
        out = os.path.join(cfg.work_dir, "eval_" + os.path.splitext(os.path.basename(path))[0] + ".json")
        save_json(metrics, out, checkpoint=os.path.abspath(path))
        print(f"metrics written to {out}", flush=True)
    return 0


def main(cfg: TrainConfig) -> int:
    """One rank: join the process group (if any), pick the device and threads, train or evaluate."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and cfg.resume is None and not cfg.eval_only:
        cfg = dataclasses.replace(cfg, resume="auto")  # a restarted job continues where it stopped
    # The entry point owns the signals, installed before anything else exists: a stop during
    # set-up is a stop request too, and no loader ever installs a handler of its own.
    stop = dist.StopFlag().install() if not cfg.eval_only else None
    _injected_restart_delay()
    env, device = set_up_process(cfg)
    try:
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


def check_resumable(cfg: TrainConfig, state: dict, path: str) -> None:
    """A training checkpoint continues only the model it holds: name every architecture setting
    that differs (weights of another architecture would fail with torch's key list, or, for the
    output stride, load silently into a different network)."""
    missing = [k for k in ("state_dict", "meta", "optimizer", "loader") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"--resume {path}: not a training checkpoint of this trainer (no {', '.join(missing)}); "
                         "to start from its weights use --load-from")
    stored = state["meta"].get("config", {})
    differ = [f"{name}: checkpoint {stored[name]!r}, this run {getattr(cfg, name)!r}"
              for name in ARCH_FIELDS if name in stored and stored[name] != getattr(cfg, name)]
    if differ:
        raise ValueError(f"--resume {path}: the checkpoint was trained with another architecture ("
                         + "; ".join(differ) + "). Resume with its settings, or start a new run from its weights "
                         "with --load-from.")


def _injected_failure(rank: int):
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return None
    fail_rank, _, fail_iter = spec.partition(":")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    return int(fail_iter) if int(fail_rank) == rank and first_attempt else None


def _injected_restart_delay() -> None:
    rank, _, seconds = os.environ.get(RESTART_DELAY_ENV, "").partition(":")
    if rank and rank == os.environ.get("RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        time.sleep(float(seconds))


@record  # a failing rank's exception reaches the elastic launcher, which names it in its report
def cli(argv) -> int:
    """A rank when a launcher (torch's elastic agent, torchrun, srun) set RANK/WORLD_SIZE; one
    process when one is asked for; otherwise the launcher of --nproc ranks on this node."""
    try:
        cfg = parse_config(argv)
    except (ValueError, FileNotFoundError) as exc:  # a bad value or file: the message, not a traceback
        print(f"launch/run.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if dist.detect_env() is not None or (cfg.nproc == 1 and cfg.nnodes == 1):
        return main(cfg)
    return dist.launch_elastic(os.path.abspath(__file__), list(argv), cfg)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
