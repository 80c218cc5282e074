"""The shared-memory loader: worker processes fill a ring of fixed-shape uint8 batch slots.

    loader = build_train_loader(root, batch_size=2, workers=2, seed=0)
    for step, batch in zip(range(iters), loader):   # infinite
        image = batch.image  # torch.uint8 [B,H,W,3] BGR, a zero-copy view of shared memory
        ...
    loader.close()

Batch k is assigned to worker k % workers, so batches arrive in order and their content depends
only on (seed, rank, world_size, k), never on the number of workers (workers=0 runs the same
code in-process). A slot is handed back when the next batch is requested or on
batch.release(): copy what you need (e.g. to the device) before asking for the next batch.

Workers start from a clean fork server, never as forks of this process (data_loader.processes
says why). Waiting is bounded: a worker that gives no batch for `timeout` seconds
(`start_timeout` for the first batch, which includes starting the workers) is declared stuck,
and the error names it, the samples it was given and its Python stack. While the first batch is
awaited a line says so every few seconds. `interrupt()` (e.g. "a stop signal arrived") ends a
wait: at once with LoaderInterrupted, or after `interrupt_grace` seconds if the batch has not
come by then (a rank of a multi-process job must still finish its step with the others).
"""
from __future__ import annotations

import sys
import time
import warnings
import weakref
from collections import deque
from multiprocessing.connection import wait
from typing import Callable

import torch

from .batch import Batch, collate_meta
from .cityscapes import CityscapesIndex, DatasetError
from .lifecycle import LoaderResources, describe_exit
from .processes import dump_stack, start_workers
from .sampler import GLOBAL_ORDER, SampleTask, ShardedStream, resume_batch, val_shard, with_global_position
from .shm_ring import SlotRing, SlotSpec
from .transforms import TrainTransformConfig
from .worker import PngSource, TrainFiller, ValFiller, fill_batch

POLL_SECONDS = 0.2  # how often a wait checks for dead workers, interrupts and deadlines
FIRST_BATCH_NOTICE_AFTER = 5.0  # seconds before "waiting for the first batch" is printed ...
FIRST_BATCH_NOTICE_EVERY = 30.0  # ... and then how often
DEFAULT_TIMEOUT = 120.0  # no batch for this long: the worker is stuck (much less than a collective's 600 s)
DEFAULT_START_TIMEOUT = 300.0  # the same for the first batch, which includes starting the workers


class LoaderWorkerError(RuntimeError):
    """A worker process died or stopped answering; the loader has been shut down."""


class LoaderInterrupted(Exception):
    """interrupt() became true while waiting for a batch. The loader is intact: the same batch
    is what the next `next()` returns, and state_dict() still points at it."""


def ring_slots(workers: int, prefetch: int) -> int:
    """Batch slots a loader holds: `prefetch` in flight per worker plus the one the step reads
    (one local buffer without workers)."""
    return workers * prefetch + 1 if workers else 1


class ShmLoader:
    """Iterates batches plan(0), plan(1), ... (num_batches of them, or forever if None)."""

    def __init__(self, source, filler, plan, spec: SlotSpec, num_batches: int | None, workers: int = 2,
                 prefetch: int = 2, pin_memory: bool = False, start_method: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, state_keys: dict | None = None,
                 start_timeout: float | None = DEFAULT_START_TIMEOUT, interrupt: Callable[[], bool] | None = None,
                 interrupt_grace: float = 0.0, log: Callable[[str], None] | None = None):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers={workers}, prefetch={prefetch}: expected workers >= 0 and prefetch >= 1")
        for name, value in (("timeout", timeout), ("start_timeout", start_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value}: expected seconds > 0, or None for no limit")
        self.source, self.filler, self.plan, self.spec = source, filler, plan, spec
        self.num_batches, self.workers, self.timeout = num_batches, workers, timeout
        self.start_timeout, self.interrupt, self.interrupt_grace = start_timeout, interrupt, interrupt_grace
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._received_any = False
        self.state_keys = dict(state_keys or {})
        self._next = 0  # next batch index handed out
        self._submitted = 0
        self._inflight: deque = deque()  # (batch index, slot, worker) in submission order
        self._held = None
        self._closed = False
        self.pinned = False
        if workers == 0:
            self._local = spec.views(bytearray(spec.nbytes))
            self._resources = None
            self._tensors = [tuple(torch.from_numpy(a) for a in self._local)]
            return
        ring = SlotRing(spec, ring_slots(workers, prefetch))
        self._resources = LoaderResources(ring, [], [])
        self._finalizer = weakref.finalize(self, self._resources.shutdown)
        self._started = time.monotonic()
        try:
            start_workers(self._resources, ring, spec, source, filler, workers, start_method)
        except BaseException:
            self.close()
            raise
        self._free = deque(range(len(ring.names)))
        self._tensors = [tuple(torch.from_numpy(a) for a in views) for views in ring.views]
        if pin_memory and torch.cuda.is_available():
            self._pin(ring)

    def _pin(self, ring: SlotRing) -> None:
        # Page-lock the slots in place (cudaHostRegister): the tensors stay zero-copy views and
        # host-to-device copies from them can run asynchronously.
        cudart = torch.cuda.cudart()
        try:
            for image, _ in self._tensors:
                ptr = image.data_ptr()
                torch.cuda.check_error(cudart.cudaHostRegister(ptr, self.spec.nbytes, 0))
                self._resources.pinned.append(ptr)
        except Exception as e:  # pinning is an optimisation: say so loudly, keep the data flowing
            warnings.warn(f"pin_memory=True: cudaHostRegister of the loader's shared memory failed ({e}); "
                          f"host-to-device copies will be synchronous")
            return
        self.pinned = True

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self):
        if self.num_batches is not None and self._next != 0:
            self._seek(0)  # a finite loader starts over on every `for` loop
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this loader is infinite (iteration-based training); it has no length")
        return self.num_batches

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the loader is closed")
        self._release_held()
        if self.num_batches is not None and self._next >= self.num_batches:
            raise StopIteration
        k = self._next
        try:
            if self.workers == 0:
                image, label = self._local
                metas = fill_batch(self.source, self.filler, self.plan(k), image, label)
                slot = 0
            else:
                self._submit()
                index, slot, worker = self._inflight[0]
                reply = self._receive(worker, index)
                self._inflight.popleft()  # only now: an interrupted wait leaves the pipeline intact
                if reply[0] != "ok":
                    self._raise_worker_error(reply)
                metas = reply[3]
        except (StopIteration, LoaderInterrupted):
            raise
        except BaseException:
            self.close()  # a half-received pipeline cannot be resumed; never leak the segments
            raise
        self._next += 1
        image_t, label_t = self._tensors[slot]
        batch = Batch(image_t, label_t, collate_meta(k, metas))
        if self.workers > 0:
            batch._release = lambda s=slot: self._free.append(s)
        self._held = batch
        return batch

    def _release_held(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def _submit(self) -> None:
        conns = self._resources.conns
        while self._free and (self.num_batches is None or self._submitted < self.num_batches):
            slot = self._free.popleft()
            worker = self._submitted % self.workers
            try:
                conns[worker].send((self._submitted, slot, self.plan(self._submitted)))
            except (BrokenPipeError, ConnectionResetError):
                self._raise_dead(worker)  # the clear error, not the pipe's
            self._inflight.append((self._submitted, slot, worker))
            self._submitted += 1

    def _receive(self, worker: int, index: int):
        conn = self._resources.conns[worker]
        procs = self._resources.processes
        first = not self._received_any
        limit = self.start_timeout if first else self.timeout
        start = self._started if first else time.monotonic()
        deadline = None if limit is None else start + limit
        notice = start + FIRST_BATCH_NOTICE_AFTER if first else None
        interrupted = False
        while True:
            ready = wait([conn] + [p.sentinel for p in procs], timeout=POLL_SECONDS)
            if conn in ready:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    self._raise_dead(worker)
                self._received_any = True
                return reply
            for i, proc in enumerate(procs):
                if proc.exitcode is not None:
                    self._raise_dead(i)
            now = time.monotonic()
            if not interrupted and self.interrupt is not None and self.interrupt():
                if self.interrupt_grace <= 0:
                    raise LoaderInterrupted(f"interrupted while waiting for batch {index} (worker {worker})")
                interrupted = True
                grace_end = now + self.interrupt_grace
                deadline = grace_end if deadline is None else min(deadline, grace_end)
            if notice is not None and now >= notice:
                limit_txt = f"; a worker is declared stuck after {limit:g} s" if limit else ""
                self._log(f"[loader] waiting for the first batch from {self.workers} worker process(es): "
                          f"{now - start:.0f} s so far{limit_txt}")
                notice += FIRST_BATCH_NOTICE_EVERY
            if deadline is not None and now > deadline:
                self._raise_stuck(worker, index, now - start, first, interrupted)

    def _raise_stuck(self, worker: int, index: int, waited: float, first: bool, interrupted: bool):
        proc = self._resources.processes[worker]
        stack = dump_stack(self._resources, worker)
        try:
            files = "; ".join(" / ".join(self.source.paths(t.index)) for t in self.plan(index))
        except Exception as e:  # the report must not fail on a broken source
            files = f"(unknown: {e})"
        why = (f"a stop was requested and the batch did not come within {self.interrupt_grace:g} s" if interrupted
               else f"timeout {self.timeout if not first else self.start_timeout:g} s"
                    f"{' for the first batch, worker start-up included' if first else ''}")
        self.close()
        raise LoaderWorkerError(
            f"data loader worker {worker} (pid {proc.pid}) gave no batch for {waited:.0f} s ({why}); it was "
            f"filling batch {index} from {files}. The loader has been shut down and its shared memory "
            f"released. Where the worker was (Python stack of each of its threads, most recent call first):\n"
            f"{stack}")

    def _raise_dead(self, worker: int):
        proc = self._resources.processes[worker]
        proc.join(timeout=1.0)
        how = describe_exit(proc.exitcode)
        self.close()
        raise LoaderWorkerError(f"data loader worker {worker} (pid {proc.pid}) died unexpectedly ({how}); "
                                f"the loader has been shut down and its shared memory released")

    def _raise_worker_error(self, reply):
        _, index, _, kind, message, tb = reply
        self.close()
        if kind == "PackError":
            from .pack import PackError

            raise PackError(message)
        if kind == "DatasetError":
            raise DatasetError(message)
        raise RuntimeError(f"data loader worker failed on batch {index}: {message}\nworker traceback:\n{tb}")

    # -- position -------------------------------------------------------------------------------

    def _seek(self, k: int) -> None:
        self._release_held()
        while self._inflight:  # finish and discard what the workers are doing
            index, slot, worker = self._inflight[0]
            reply = self._receive(worker, index)
            self._inflight.popleft()
            self._free.append(slot)
            if reply[0] != "ok":
                self._raise_worker_error(reply)
        self._next = self._submitted = k

    def state_dict(self) -> dict:
        """The position after the batches handed out so far (plus what must match on resume)."""
        return with_global_position({"next_batch": self._next, **self.state_keys})

    def load_state_dict(self, state) -> None:
        """Continue from `state`. The training loader also takes the checkpoint's list of per-rank
        states, and states of another world size / per-rank batch (sampler.resume_batch)."""
        if self.state_keys.get("order") == GLOBAL_ORDER:
            k = resume_batch(state, self.state_keys)
        else:
            for key, value in self.state_keys.items():
                if state.get(key) != value:
                    raise ValueError(f"loader state {key}={state.get(key)!r} does not match this loader's {value!r}")
            k = state["next_batch"]
        if not isinstance(k, int) or k < 0 or (self.num_batches is not None and k > self.num_batches):
            raise ValueError(f"loader state next_batch={k!r}: expected an int in [0, {self.num_batches}]")
        if self.workers > 0:
            self._seek(k)
        else:
            self._held, self._next = None, k

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers and unlink every shared-memory segment (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._held = None
        self._tensors = []  # our views on the slots, so the mappings can be closed cleanly
        if self._resources is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [] if self._resources is None else [p.pid for p in self._resources.processes]

    @property
    def segment_names(self) -> list[str]:
        return [] if self._resources is None or self._resources.ring is None else list(self._resources.ring.names)


def _train_source(root: str, split: str, pack: str | None):
    if pack is not None:
        from .pack import PackReader

        return PackReader(pack, split, root)
    return PngSource(CityscapesIndex(root, split).samples)


def build_train_loader(root: str, split: str = "train", batch_size: int = 2, crop=(512, 1024), scale=(2048, 1024),
                       ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75, workers: int = 2, seed: int = 0,
                       rank: int = 0, world_size: int = 1, pin_memory: bool = False, pack: str | None = None,
                       flip_prob: float = 0.5, photometric: bool = True, prefetch: int = 2,
                       **wait_options) -> ShmLoader:
    """Infinite loader of augmented training batches: Batch.image uint8 [B,crop_h,crop_w,3] BGR.

    wait_options go to ShmLoader: start_method, timeout, start_timeout, interrupt, interrupt_grace, log.
    """
    cfg = TrainTransformConfig(crop_size=tuple(crop), scale=tuple(scale), ratio_range=tuple(ratio_range),
                               cat_max_ratio=cat_max_ratio, flip_prob=flip_prob, photometric=photometric)
    source = _train_source(root, split, pack)
    stream = ShardedStream(len(source), batch_size, seed, rank, world_size)
    filler = TrainFiller(cfg, seed, num_threads=1 if workers > 0 else None)
    spec = SlotSpec(batch_size, cfg.crop_size[0], cfg.crop_size[1])
    keys = {"seed": seed, "rank": rank, "world_size": world_size, "batch_size": batch_size, "num_samples": len(source),
            "order": GLOBAL_ORDER}
    return ShmLoader(source, filler, stream.batch, spec, None, workers, prefetch, pin_memory, state_keys=keys,
                     **wait_options)


def build_val_loader(root: str, split: str = "val", workers: int = 2, rank: int = 0, world_size: int = 1,
                     scale=None, pack: str | None = None, pin_memory: bool = False, **wait_options) -> ShmLoader:
    """Finite loader, batch size 1, this rank's share of the split in order (no padding).

    Slots have the largest image / label size of the split; meta['valid_hw'] is the image's size
    (resized keep-ratio to `scale` if given) and meta['ori_hw'] the label's original size.
    """
    if pack is not None:
        from .pack import PackReader

        source = PackReader(pack, split, root)
        sizes = [source.shape(i) for i in range(len(source))]
    else:
        index = CityscapesIndex(root, split)
        source, sizes = PngSource(index.samples), index.sizes
    indices = val_shard(len(source), rank, world_size)
    filler = ValFiller(scale, num_threads=1 if workers > 0 else None)
    mine = [sizes[i] for i in indices] or sizes[:1]
    image_hw = [filler.transform.image_size(h, w) for h, w in mine]
    height = max(max(h for h, _ in image_hw), max(h for h, _ in mine))
    width = max(max(w for _, w in image_hw), max(w for _, w in mine))
    spec = SlotSpec(1, height, width)
    keys = {"rank": rank, "world_size": world_size, "num_samples": len(source)}
    plan = lambda k: [SampleTask(indices[k], -1)]  # noqa: E731
    return ShmLoader(source, filler, plan, spec, len(indices), workers, 2, pin_memory, state_keys=keys, **wait_options)
