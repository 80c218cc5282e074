"""A ring of fixed-shape batch slots in POSIX shared memory (multiprocessing.shared_memory).

Each slot is one segment holding image uint8 [B,H,W,3] followed by label uint8 [B,H,W].
Segments are named SHM_PREFIX + "<owner pid>_<ring id>_<slot>" so leftovers are attributable
(`leftover_segments(pid)`) and a worker that outlives its parent can unlink them by name.
"""
from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory

import numpy as np

SHM_PREFIX = "dlt_"
SHM_DIR = "/dev/shm"


def segment_prefix(pid: int) -> str:
    return f"{SHM_PREFIX}{pid}_"


def leftover_segments(pid: int | None = None) -> list[str]:
    """Names of this project's segments in /dev/shm (of one owner pid, or all)."""
    prefix = segment_prefix(pid) if pid is not None else SHM_PREFIX
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_by_name(names) -> None:
    """Remove segments by name, ignoring ones already gone (used by orphaned workers)."""
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
        except OSError:
            try:  # not Linux-style /dev/shm: go through the POSIX call
                seg = shared_memory.SharedMemory(name=name)
                seg.close()
                seg.unlink()
            except FileNotFoundError:
                pass


def process_gone(pid: int) -> bool:
    """True when `pid` no longer names a running process (gone, or a zombie not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except (OSError, IndexError):  # no procfs (macOS): assume alive
        return False


def remove_dead_owners_segments() -> list[str]:
    """Unlink the segments whose owner pid is gone; returns their names. A rank killed together
    with its workers (SIGKILL to the whole process group, e.g. by a scheduler or a timeout) leaves
    nobody to unlink its ring; the next ring created on the machine removes it. Assumes /dev/shm is
    not shared with processes of another pid namespace (a container's own /dev/shm is not)."""
    dead = [n for n in leftover_segments() if _owner(n) is not None and process_gone(_owner(n))]
    unlink_by_name(dead)
    return dead


def _owner(name: str) -> int | None:
    pid = name[len(SHM_PREFIX):].split("_", 1)[0]
    return int(pid) if pid.isdigit() else None


class SlotSpec:
    """Shapes of one slot: batch, height, width (image has 3 channels, label none)."""

    def __init__(self, batch: int, height: int, width: int):
        self.batch, self.height, self.width = int(batch), int(height), int(width)
        self.image_shape = (self.batch, self.height, self.width, 3)
        self.label_shape = (self.batch, self.height, self.width)
        self.image_bytes = int(np.prod(self.image_shape))
        self.nbytes = self.image_bytes + int(np.prod(self.label_shape))

    def views(self, buf) -> tuple[np.ndarray, np.ndarray]:
        image = np.ndarray(self.image_shape, np.uint8, buffer=buf, offset=0)
        label = np.ndarray(self.label_shape, np.uint8, buffer=buf, offset=self.image_bytes)
        return image, label


class SlotRing:
    """Creates (owner) or attaches to (spawned worker) the ring's segments and exposes numpy views."""

    def __init__(self, spec: SlotSpec, num_slots: int, names: list[str] | None = None):
        self.spec = spec
        self.owner = names is None
        if self.owner:
            remove_dead_owners_segments()
            token = secrets.token_hex(3)
            names = [f"{segment_prefix(os.getpid())}{token}_{i}" for i in range(num_slots)]
        self.names = list(names)
        self.segments: list[shared_memory.SharedMemory] = []
        try:
            for name in self.names:
                if self.owner:
                    self.segments.append(shared_memory.SharedMemory(name=name, create=True, size=spec.nbytes))
                else:
                    self.segments.append(shared_memory.SharedMemory(name=name))
        except BaseException:
            self.close()
            raise
        self.views = [spec.views(seg.buf) for seg in self.segments]

    def close(self) -> None:
        """Drop our views and mappings; the owner also unlinks every segment name."""
        self.views = []
        for seg in self.segments:
            try:
                seg.close()
            except BufferError:
                # A caller still holds a tensor on the slot: forget the buffer (the mapping lives
                # until that tensor is freed) so SharedMemory.__del__ does not try again and warn.
                seg._buf = seg._mmap = None
                if getattr(seg, "_fd", -1) >= 0:
                    os.close(seg._fd)
                    seg._fd = -1
            if self.owner:
                try:
                    seg.unlink()
                except FileNotFoundError:
                    pass
        self.segments = []
        if self.owner:
            unlink_by_name(self.names)  # segments never opened because creation failed midway
