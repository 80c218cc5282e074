"""Training checkpoints: atomic writes, newest-K retention, `--resume auto`, RNG state as tensors.

A checkpoint is a plain dict of tensors / numbers / strings / lists / dicts, so it loads with
torch.load(weights_only=True) (no pickled classes: RNG states are stored as tensors, the config
as a dict). Files are `iter_<N>.pt` in the work dir; a write goes to a hidden temp file in the
same directory, is fsync'ed, then os.replace'd over the final name, so a crash mid-write leaves
the previous checkpoints intact and never a partial `iter_*.pt`.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

_NAME = re.compile(r"^iter_(\d+)\.pt$")
_TMP_PREFIX = ".tmp-"


def checkpoint_path(work_dir: str, iteration: int) -> str:
    return os.path.join(work_dir, f"iter_{iteration}.pt")


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then atomically rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # Make the rename itself durable (the directory entry), where the OS allows it.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def list_checkpoints(work_dir: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every complete checkpoint in work_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(work_dir, "iter_*.pt")):
        m = _NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(work_dir: str) -> Optional[str]:
    found = list_checkpoints(work_dir)
    return found[-1][1] if found else None


def prune_checkpoints(work_dir: str, keep: int) -> List[str]:
    """Delete all but the newest `keep` checkpoints, and temp files left by killed writers."""
    removed = []
    for _, path in list_checkpoints(work_dir)[:-keep] if keep > 0 else []:
        os.remove(path)
        removed.append(path)
    for tmp in glob.glob(os.path.join(work_dir, _TMP_PREFIX + "*")):
        pid = _tmp_owner(tmp)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            os.remove(tmp)
            removed.append(tmp)
    return removed


class WorkDirLock:
    """Exclusive use of a work dir by one training run, held while it trains: an flock on
    <work_dir>/.lock (released by the kernel however the holder ends, SIGKILL included), whose
    content names the holder for the error a second run gets."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, ".lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "WorkDirLock":
        import fcntl
        import socket
        import time
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"--work-dir {os.path.dirname(self.path)} is in use by another training run "
                               f"({holder}); two runs in one work dir would mix their logs and prune each "
                               "other's checkpoints. Wait for it, stop it, or choose another --work-dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a new holder)
            self.fd = None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by save_atomic; errors name the file and what is wrong with it."""
    from core.safe_pickle import unreadable
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(unreadable(path, exc)) from exc


def resolve_resume(resume: Optional[str], work_dir: str) -> Optional[str]:
    """--resume auto -> newest checkpoint in work_dir (None when there is none); else the path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(work_dir)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: checkpoint {resume!r} does not exist (use 'auto' to pick the "
                                f"newest in --work-dir)")
    return resume


# ---- random number generator state, as tensors ---------------------------------------------

def capture_rng(accelerator=None) -> Dict[str, Any]:
    """torch / numpy / python (and accelerator) RNG states in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if accelerator is not None:
        state["accelerator"] = [s.cpu() for s in accelerator.get_rng_state_all()]
    return state


def restore_rng(state: Dict[str, Any], accelerator=None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if accelerator is not None and "accelerator" in state:
        accelerator.set_rng_state_all(state["accelerator"])


def _tmp_owner(path: str) -> Optional[int]:
    m = re.match(re.escape(_TMP_PREFIX) + r"(\d+)-", os.path.basename(path))
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
