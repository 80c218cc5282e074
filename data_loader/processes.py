"""Starting loader worker processes from a known state, and asking a stuck one where it is.

Why not fork: a forked child gets a copy of the parent's memory but only the calling thread.
Any library thread pool alive in the parent (OpenCV's after a large cv2 call, OpenMP's after a
torch op, a logging or TensorBoard writer thread) may hold a lock at that instant, and the child
then waits forever for an owner that does not exist in it: the first `cv2.setNumThreads(1)` of a
worker forked after the synthetic set was generated with OpenCV hung exactly like that (10 of 10
loaders in tests/test_data_faults.py's warm-pool case on the old fork default).

The default is therefore the `forkserver` start method (`spawn` where the OS has no fork
server): a clean server process is started once per rank (fork+exec, safe whatever threads are
live), imports the worker's modules once (FORKSERVER_PRELOAD; importing torch, numpy and OpenCV
starts no thread pools, so the server stays single-threaded), and every worker is forked from
it. A worker therefore starts in milliseconds after the first, with nothing of the rank's
thread state. `fork` is still accepted when asked for explicitly (bench/loader.py measures it),
never chosen by default.

Workers run only this package's code, so multiprocessing is kept from re-importing the caller's
`__main__` in each of them (what spawn and forkserver do by default): a script without an
`if __name__ == "__main__":` guard, or one slow to import, is not run again per worker. The
price: what a worker receives (the sample source and filler) must be defined in importable
modules, not in `__main__`.

Stuck workers: each worker registers faulthandler on SIGUSR1 with its own stack file
(data_loader.worker), so `dump_stack` can show the Python stack of every thread of a worker even
while it is blocked inside a C library.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time

from .worker import worker_main

# Imported once by the fork server, so forked workers start with them loaded.
FORKSERVER_PRELOAD = ["data_loader.worker"]


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def get_context(start_method: str | None):
    method = start_method or default_start_method()
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"start_method={method!r}: this platform offers {multiprocessing.get_all_start_methods()}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when the server starts (first use in this process); harmless afterwards.
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def start_workers(resources, ring, spec, source, filler, count: int, start_method: str | None) -> None:
    """Start `count` workers; their processes and pipes are appended to `resources` as they start,
    so a failure midway still leaves everything started so far to resources.shutdown()."""
    ctx = get_context(start_method)
    inherit = ctx.get_start_method() == "fork"
    parent_pid = os.getpid()
    resources.stack_dir = tempfile.mkdtemp(prefix=f"dlt-stacks-{parent_pid}-")
    for i in range(count):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_main, daemon=True, name=f"loader-worker-{i}", args=(
            child_conn, spec, ring.names, ring if inherit else None, source, filler, parent_pid,
            stack_path(resources, i)))
        with _main_module_hidden():
            proc.start()
        child_conn.close()
        resources.processes.append(proc)
        resources.conns.append(parent_conn)


@contextlib.contextmanager
def _main_module_hidden():
    # multiprocessing.spawn.get_preparation_data reads __main__'s __spec__ and __file__ to decide
    # what the child re-imports; without them it re-imports nothing.
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def stack_path(resources, worker: int) -> str:
    return os.path.join(resources.stack_dir, f"worker{worker}.txt")


def dump_stack(resources, worker: int, wait_s: float = 2.0) -> str:
    """The Python stacks of worker `worker`'s threads, as faulthandler writes them (or why not)."""
    proc = resources.processes[worker]
    path = stack_path(resources, worker)
    try:
        before = os.path.getsize(path)
    except OSError:
        return "(no stack: the worker never registered its stack dump, so it is stuck before its first line ran)"
    try:
        os.kill(proc.pid, signal.SIGUSR1)
    except ProcessLookupError:
        return "(no stack: the worker has exited)"
    deadline = time.monotonic() + wait_s
    size = before
    while time.monotonic() < deadline:  # faulthandler writes in a few small chunks
        time.sleep(0.05)
        now = os.path.getsize(path)
        if now > before and now == size:
            break
        size = now
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(before)
        text = f.read().strip()
    return text or f"(no stack: the worker did not answer SIGUSR1 within {wait_s:g} s)"
