"""What runs in a loader worker: sample sources, the per-sample fill jobs, and the worker loop.

A worker receives (batch id, slot, sample tasks) on its pipe, decodes and augments every sample
straight into the slot's shared memory and answers (ok, metas) or (error, message). It exits on
a None message, and on its own when the parent process is gone (the pipe breaks, or the parent's
pid no longer names a live process): then it unlinks the ring's segments itself, because a
SIGKILLed parent cannot. The parent is the rank that owns the loader, not necessarily the
process that forked us (with the forkserver start method that is the fork server).

SIGUSR1 makes a worker write the Python stack of all its threads to its stack file
(faulthandler, which runs at the C level, so it answers even when the worker is blocked inside
a C library): that is how the loader shows where a stuck worker is.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import traceback

import cv2
import numpy as np

from .cityscapes import DatasetError, VALID_TRAIN_IDS
from .decode import read_image_rgb, read_image_rgb_top, read_label
from .sampler import SampleTask, augmentation_rng
from .shm_ring import SlotRing, SlotSpec, process_gone, unlink_by_name
from .transforms import TrainTransform, TrainTransformConfig, ValTransform

PARENT_POLL_SECONDS = 0.5


class PngSource:
    """Decodes the PNG pair of sample i, checking sizes and label values (errors name the file)."""

    def __init__(self, samples):
        self.samples = list(samples)
        self._checked: set = set()  # labels whose values were validated in this process

    def __len__(self) -> int:
        return len(self.samples)

    def paths(self, i: int) -> tuple[str, str]:
        return self.samples[i]

    def load_label(self, i: int) -> np.ndarray:
        from kernels import ops

        label_path = self.samples[i][1]
        label = read_label(label_path)
        if i not in self._checked:  # once per file and process: ~1 ms of a 2048x1024 label
            hist = ops.label_histogram(label, ignore_index=255)  # 255 is valid; its bin is zeroed
            bad = np.flatnonzero((hist > 0) & ~VALID_TRAIN_IDS)
            if bad.size:
                raise DatasetError(f"{label_path}: label values {bad.tolist()[:8]} are not valid Cityscapes "
                                   f"trainIds (expected 0..18 or 255)")
            self._checked.add(i)
        return label

    def load_image(self, i: int, label_shape: tuple, rows: int | None = None) -> np.ndarray:
        """RGB image of sample i; with `rows`, only its top rows are guaranteed to be decoded."""
        image_path, label_path = self.samples[i]
        image = read_image_rgb(image_path) if rows is None else read_image_rgb_top(image_path, rows)
        if image.shape[:2] != tuple(label_shape):
            raise DatasetError(f"{label_path}: size {label_shape[1]}x{label_shape[0]} differs from its image "
                               f"{image_path} ({image.shape[1]}x{image.shape[0]})")
        return image

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        label = self.load_label(i)
        return self.load_image(i, label.shape), label


class TrainFiller:
    """Training job: seeded augmentation of (index, epoch) into one batch entry."""

    def __init__(self, cfg: TrainTransformConfig, seed: int, num_threads: int | None = 1):
        self.cfg, self.seed, self.num_threads = cfg, seed, num_threads
        self._transform = None

    def __call__(self, source, task: SampleTask, out_image: np.ndarray, out_label: np.ndarray) -> dict:
        if self._transform is None:
            self._transform = TrainTransform(self.cfg, self.num_threads)
        label = source.load_label(task.index)
        plan = self._transform.plan(label, augmentation_rng(self.seed, task.epoch, task.index))
        image = source.load_image(task.index, label.shape, rows=self._transform.rows_needed(plan))
        meta = self._transform.render(image, plan, out_image, out_label)
        return {"index": task.index, "epoch": task.epoch, "valid_hw": meta["valid_hw"], "flip": meta["flip"],
                "crop": meta["crop"], "ratio": meta["ratio"]}


class ValFiller:
    def __init__(self, scale=None, num_threads: int | None = 1):
        self.transform = ValTransform(scale, num_threads)

    def __call__(self, source, task: SampleTask, out_image: np.ndarray, out_label: np.ndarray) -> dict:
        image, label = source.load(task.index)
        meta = self.transform(image, label, out_image, out_label)
        return {"index": task.index, "image_path": source.paths(task.index)[0], **meta}


def fill_batch(source, filler, tasks, image: np.ndarray, label: np.ndarray) -> list[dict]:
    """Fill one slot; any failure becomes DatasetError naming the sample's files."""
    metas = []
    for b, task in enumerate(tasks):
        try:
            metas.append(filler(source, task, image[b], label[b]))
        except DatasetError:
            raise
        except Exception as e:
            image_path, label_path = source.paths(task.index)
            raise DatasetError(f"{image_path} / {label_path}: {type(e).__name__}: {e}") from e
    return metas


def _orphaned(parent_pid: int, ring_names) -> None:
    unlink_by_name(ring_names)
    os._exit(0)


def _enable_stack_dumps(stack_path: str | None):
    """SIGUSR1 -> all threads' Python stacks appended to stack_path. Returns the open file (kept
    open for the process's life: faulthandler writes to its descriptor from a signal handler)."""
    if not stack_path:
        return None
    fh = open(stack_path, "a", encoding="utf-8")
    faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True, chain=False)
    return fh


def worker_main(conn, spec: SlotSpec, ring_names: list[str], ring: SlotRing | None, source, filler,
                parent_pid: int, stack_path: str | None = None) -> None:
    """Worker process entry point. `ring` is the parent's (inherited by fork) or None (attach by name)."""
    stack_file = _enable_stack_dumps(stack_path)  # first: a hang in any line below can then be shown
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which shuts us down
    # SIGTERM sent to the whole process group (a scheduler's preemption) must not kill us under a
    # rank that is finishing its step and checkpointing: the parent shuts us down (or we notice
    # it died); SIGKILL still ends us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if ring is None:
        ring = SlotRing(spec, len(ring_names), names=ring_names)
    while True:
        try:
            if not conn.poll(PARENT_POLL_SECONDS):
                if process_gone(parent_pid):
                    _orphaned(parent_pid, ring_names)
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            _orphaned(parent_pid, ring_names)
        if msg is None:
            break
        batch_id, slot, tasks = msg
        image, label = ring.views[slot]
        try:
            reply = ("ok", batch_id, slot, fill_batch(source, filler, tasks, image, label))
        except Exception as e:
            reply = ("error", batch_id, slot, type(e).__name__, str(e), traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            _orphaned(parent_pid, ring_names)
    conn.close()
    if stack_file is not None:
        faulthandler.unregister(signal.SIGUSR1)
        stack_file.close()
