"""Setting ranks up and launching them: who am I (torch's elastic agent / torchrun, SLURM), the
process group with a timeout, the CPU thread split, stop-on-signal, and the launcher, which is
torch's elastic agent (torch.distributed.launcher) driven with this project's guarantees.
In-rank helpers (collectives, DDP/SyncBN wrapping) are core/distributed.py's.

How a process learns its rank, in order:
  1. RANK / WORLD_SIZE / LOCAL_RANK (/ LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in the
     environment: set by the elastic agent (our launcher below) and by torchrun.
  2. SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with SLURM_NTASKS > 1 (one srun task per
     process); the master is MASTER_ADDR or the first host of SLURM_JOB_NODELIST, the port
     MASTER_PORT or one derived from SLURM_JOB_ID.
  3. Otherwise a single process, or, with --nproc > 1 / --nnodes > 1, the launcher role.
"""
from __future__ import annotations

import gc
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Optional, Sequence

import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | env (our launcher / torchrun) | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_env(environ=None) -> Optional[DistEnv]:
    """The rank layout given by a launcher (ours, torchrun, SLURM), or None when there is none."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        return DistEnv(rank=_int_env(env, "RANK"), world_size=world,
                       local_rank=_int_env(env, "LOCAL_RANK", 0),
                       local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", world),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int_env(env, "MASTER_PORT", 29500), source="env")
    if "SLURM_PROCID" in env and _int_env(env, "SLURM_NTASKS", 1) > 1:
        ntasks = _int_env(env, "SLURM_NTASKS")
        nnodes = max(1, _int_env(env, "SLURM_NNODES", 1))
        local_world = _slurm_tasks_on_node(env.get("SLURM_TASKS_PER_NODE"), ntasks // nnodes)
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST")
                                                           or env.get("SLURM_NODELIST", ""))
        port = _int_env(env, "MASTER_PORT", 0) or 20000 + _int_env(env, "SLURM_JOB_ID", 0) % 20000
        return DistEnv(rank=_int_env(env, "SLURM_PROCID"), world_size=ntasks,
                       local_rank=_int_env(env, "SLURM_LOCALID", 0), local_world_size=local_world,
                       master_addr=addr or "127.0.0.1", master_port=port, source="slurm")
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    nodelist = nodelist.strip()
    if not nodelist:
        return ""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def init_process_group(env: DistEnv, backend: str, timeout_s: float) -> None:
    """env:// rendezvous with a bounded collective timeout (no rank waits forever on a dead peer)."""
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    if backend == "nccl":
        # Make NCCL collectives honour the timeout by erroring out instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer holds the process group; if a reference cycle keeps it alive, the gloo group
        # would be destroyed during interpreter shutdown instead, where a rank once aborted with
        # "terminate called without an active exception" after finishing its work. Free it now.
        gc.collect()
        dist.destroy_process_group()


def cpu_threads(requested: int, local_world_size: int) -> int:
    """Intra-op threads per process: the request, or this node's cores split between its ranks."""
    if requested > 0:
        return requested
    from core.cpu import usable_cores
    return max(1, usable_cores() // max(1, local_world_size))


# ---- stopping on SIGINT / SIGTERM -------------------------------------------------------------

class StopFlag:
    """Set by SIGINT/SIGTERM. The trainer all-reduces it each step so every rank stops at the
    same iteration; a second signal aborts at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"[rank {os.environ.get('RANK', '0')}] {self.signal_name} received: finishing this step, "
              "then saving a checkpoint and exiting", flush=True)


# ---- the launcher: torch's elastic agent ----------------------------------------------------------

def launch_elastic(script: str, argv: Sequence[str], cfg) -> int:
    """Run this node's cfg.nproc ranks of `script argv` under torch's elastic agent; the job's exit code.

    What the agent gives: rendezvous of several nodes (c10d or static), restarts of the whole
    job (--max-restarts; a restarted rank continues with --resume auto, see run.main), per-rank
    log files under <work_dir>/logs (also shown here, prefixed by the rank), and a report naming
    the rank that failed first with its error (the rank's exception, recorded by @record).
    What this wrapper keeps from the project's own launcher:
      * SIGINT/SIGTERM to the launcher reach every rank as ONE SIGTERM to the rank alone (not its
        process group: its loader workers must outlive the step), so each finishes its step, the
        ranks agree to stop at the same iteration, rank 0 checkpoints, and everyone exits 0; the
        job then ends 0 as well. A second signal kills the ranks and their workers at once.
        (The agent's own handling would SIGTERM whole process groups and report a failure.)
      * when a rank fails, the agent stops the others (SIGTERM, SIGKILL after --kill-grace s);
      * no shared memory is left behind: segments of ranks that died without cleaning up (their
        workers killed with them) are unlinked here by their owner's pid.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = cpu_threads(cfg.threads, cfg.nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranks inherit it (torch reads it at import)
    # The agent's shared rendezvous store outlives a restart, and with it the keys the previous
    # attempt's ranks wrote (gloo/NCCL peer addresses): a restarted rank can read a dead peer's
    # address and fail with "connection refused" (pytorch/pytorch#135712). Torch's own opt-out:
    # rank 0 hosts a fresh store on a fresh port in every attempt.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if cfg.nnodes == 1:  # torchrun --standalone: a private store on a free local port
        backend, endpoint, configs, run_id = "c10d", "localhost:0", {}, f"deeplab-{os.getpid()}"
    else:
        port = cfg.master_port or 29500
        backend, endpoint, run_id = cfg.rdzv_backend, f"{cfg.master_addr}:{port}", cfg.rdzv_id
        configs = {"rank": cfg.node_rank} if backend == "static" else {}
    min_nodes = (cfg.min_nnodes or cfg.nnodes) if backend == "c10d" else cfg.nnodes
    config = LaunchConfig(
        min_nodes=min_nodes, max_nodes=cfg.nnodes, nproc_per_node=cfg.nproc, run_id=run_id,
        rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=configs, max_restarts=cfg.max_restarts,
        monitor_interval=0.5, shutdown_timeout=int(cfg.kill_grace), log_line_prefix_template="[rank${rank}]:",
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(cfg.work_dir, "logs"), tee=Std.ALL),
        signals_to_handle="SIGHUP,SIGQUIT")  # SIGTERM/SIGINT are ours (see above)
    ranks = _RankWatcher(script)
    old = {s: signal.signal(s, ranks.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"[launcher] node {cfg.node_rank if backend == 'static' else '(assigned at rendezvous)'} of "
          f"{cfg.nnodes}: {cfg.nproc} ranks with {threads} threads each, rendezvous {backend} at {endpoint}, "
          f"up to {cfg.max_restarts} restarts, per-rank logs in {os.path.join(cfg.work_dir, 'logs')}", flush=True)
    try:
        elastic_launch(config, sys.executable)(script, *argv)
        return 0
    except ChildFailedError as exc:
        for rank, failure in sorted(exc.failures.items()):
            # @record's error file gives a dict ({"message": ..., "extraInfo": ...}); else a string
            message = (failure.message.get("message", str(failure.message)) if isinstance(failure.message, dict)
                       else str(failure.message))
            print(f"[launcher] rank {rank} (pid {failure.pid}) failed with exit code {failure.exitcode}: "
                  f"{message.strip().splitlines()[-1] if message.strip() else '(no error recorded)'}",
                  file=sys.stderr, flush=True)
        code = exc.get_first_failure()[1].exitcode
        print(f"[launcher] job failed (exit code {code})", file=sys.stderr, flush=True)
        return code if isinstance(code, int) and code > 0 else 1
    finally:
        ranks.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
        ranks.release_shared_memory()


class _RankWatcher:
    """The rank processes the agent started (our direct children running `script`): seen by a
    background poll, so signals can be forwarded and their shared memory swept afterwards."""

    def __init__(self, script: str, every_s: float = 0.5):
        import threading
        self.script, self.pids, self.signals = script, set(), 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            self.pids |= self.alive()

    def alive(self) -> set:
        import psutil
        found = set()
        for child in psutil.Process().children():
            try:
                if self.script in child.cmdline():
                    found.add(child.pid)
            except psutil.Error:
                pass
        return found

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        ranks = self.alive()
        self.pids |= ranks
        if self.signals == 1:
            print(f"[launcher] {signal.Signals(signum).name}: asking every rank to finish its step, checkpoint "
                  f"and stop (again to kill them now)", flush=True)
        for pid in ranks:
            try:
                if self.signals == 1:
                    os.kill(pid, signal.SIGTERM)
                else:
                    os.killpg(pid, signal.SIGKILL)  # each rank leads its own session: with its workers
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def release_shared_memory(self) -> None:
        from data_loader.shm_ring import leftover_segments, unlink_by_name
        for pid in self.pids:
            left = leftover_segments(pid)
            if left:
                unlink_by_name(left)
                print(f"[launcher] removed {len(left)} shared-memory segments rank pid {pid} left behind",
                      file=sys.stderr, flush=True)


def _int_env(env: Dict[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is required here but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {value!r}") from None


def _slurm_tasks_on_node(tasks_per_node: Optional[str], fallback: int) -> int:
    # SLURM_TASKS_PER_NODE looks like '4(x2),3'; the first count is this layout's common case.
    if tasks_per_node:
        m = re.match(r"(\d+)", tasks_per_node)
        if m:
            return int(m.group(1))
    return max(1, fallback)
