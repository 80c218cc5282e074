"""Everything distributed, in one place: who am I (own launcher, torchrun or SLURM), process-group
set-up with a timeout, CPU thread split, DDP/SyncBN wrapping, the small collectives the trainer
needs, stop-on-signal handling, and the local launcher that spawns and watches the ranks.

How a process learns its rank, in order:
  1. RANK / WORLD_SIZE / LOCAL_RANK (/ LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in the
     environment: set by our own launcher below and by torchrun.
  2. SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with SLURM_NTASKS > 1 (one srun task per
     process); the master is MASTER_ADDR or the first host of SLURM_JOB_NODELIST, the port
     MASTER_PORT or one derived from SLURM_JOB_ID.
  3. Otherwise a single process, or, with --nproc > 1 / --nnodes > 1, the launcher role.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import torch
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
        dist.destroy_process_group()


def cpu_threads(requested: int, local_world_size: int) -> int:
    """Intra-op threads per process: the request, or this node's cores split between its ranks."""
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


# ---- model wrapping --------------------------------------------------------------------------

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


# ---- small collectives (no-ops in a single process) ------------------------------------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
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


# ---- the local launcher ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local_workers(script: str, argv: Sequence[str], nproc: int, nnodes: int, node_rank: int,
                         master_addr: str, master_port: int, threads: int, kill_grace: float) -> int:
    """Start this node's `nproc` ranks of `script argv`, watch them, return the job's exit code.

    When a rank exits non-zero the others are sent SIGTERM, then SIGKILL after `kill_grace`
    seconds, and the launcher returns that rank's code. SIGINT/SIGTERM to the launcher is passed
    on to every rank as one SIGTERM (each rank runs in its own session, so a terminal's Ctrl-C
    reaches only the launcher and no rank sees two signals).
    """
    if master_port == 0:
        if nnodes > 1:
            master_port = 29500
        else:
            master_port = free_port()
    world = nnodes * nproc
    per_proc_threads = cpu_threads(threads, nproc)
    procs: List[subprocess.Popen] = []
    for local_rank in range(nproc):
        rank = node_rank * nproc + local_rank
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank), MASTER_ADDR=master_addr,
                   MASTER_PORT=str(master_port), OMP_NUM_THREADS=str(per_proc_threads))
        procs.append(subprocess.Popen([sys.executable, script, *argv], env=env, start_new_session=True))
    print(f"[launcher] started ranks {node_rank * nproc}..{node_rank * nproc + nproc - 1} of {world} "
          f"(pids {', '.join(str(p.pid) for p in procs)}), master {master_addr}:{master_port}, "
          f"{per_proc_threads} threads each", flush=True)

    forwarded = {"done": False}

    def forward(signum, frame):
        if forwarded["done"]:
            _signal_all(procs, signal.SIGKILL)
            return
        forwarded["done"] = True
        print(f"[launcher] {signal.Signals(signum).name}: asking every rank to checkpoint and stop", flush=True)
        _signal_all(procs, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed_code = 0
    kill_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if failed_code == 0:
                for local_rank, code in enumerate(codes):
                    if code not in (None, 0):
                        failed_code = code if code > 0 else 128 - code
                        alive = [i for i, c in enumerate(codes) if c is None]
                        print(f"[launcher] rank {node_rank * nproc + local_rank} exited with code {code}; "
                              f"stopping the other ranks {alive} (SIGTERM, SIGKILL after {kill_grace:g}s)",
                              file=sys.stderr, flush=True)
                        _signal_all(procs, signal.SIGTERM)
                        kill_at = time.monotonic() + kill_grace
                        break
            if all(c is not None for c in codes):
                break
            if kill_at is not None and time.monotonic() > kill_at:
                _signal_all(procs, signal.SIGKILL)
                kill_at = None
            time.sleep(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        # Also reaches leftovers (e.g. loader workers) of ranks that already died: a process
        # group id is not reused while the group has members.
        _signal_all(procs, signal.SIGKILL, include_finished=True)
    if failed_code:
        print(f"[launcher] job failed (exit code {failed_code})", file=sys.stderr, flush=True)
    return failed_code


def _signal_all(procs: Sequence[subprocess.Popen], sig: int, include_finished: bool = False) -> None:
    for p in procs:
        if include_finished or p.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(p.pid, sig)  # the rank and its data-loader workers
                else:
                    # A graceful stop goes to the rank alone: it finishes its step, checkpoints and
                    # shuts its loader workers down itself (they would die mid-step otherwise).
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


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
