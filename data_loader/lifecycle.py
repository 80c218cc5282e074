"""Owning and releasing a loader's OS resources: worker processes, pipes, shared-memory segments.

Every path out ends in LoaderResources.shutdown(): loader.close(), garbage collection of the
loader (weakref.finalize), normal interpreter exit including an uncaught exception or Ctrl-C
(finalize's atexit hook), an error raised by the loader, and SIGTERM: if SIGTERM still has its
default action when the first loader starts, a handler is installed that shuts down every live
loader and then re-raises SIGTERM with the default action (so the process still dies "by
SIGTERM"). A launcher that installs its own SIGTERM handler must exit through normal Python
shutdown (sys.exit / an exception) or call loader.close() itself.

SIGKILL of the main process runs no code: each worker polls os.getppid() (every 0.5 s) and, once
its parent is gone, unlinks the ring's segments by name and exits; the Python resource tracker
(which registered the segments) also unlinks whatever is left when its last client exits.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading

_LIVE: set = set()  # LoaderResources not shut down yet, for the SIGTERM handler
_handler_installed = False


class LoaderResources:
    def __init__(self, ring, processes, conns, pinned=(), stack_dir=None):
        self.owner_pid = os.getpid()
        self.ring = ring
        self.processes = list(processes)
        self.conns = list(conns)
        self.pinned = list(pinned)  # data pointers registered with cudaHostRegister
        self.stack_dir = stack_dir  # where workers dump their stacks on SIGUSR1
        self.closed = False
        _LIVE.add(self)

    def shutdown(self) -> None:
        if self.closed or os.getpid() != self.owner_pid:  # forked children never clean up for us
            return
        self.closed = True
        _LIVE.discard(self)
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.processes:
            proc.join(timeout=0.5)
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        if self.pinned:
            import torch

            for ptr in self.pinned:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            self.pinned = []
        if self.ring is not None:
            self.ring.close()
        if self.stack_dir is not None:
            shutil.rmtree(self.stack_dir, ignore_errors=True)


def _on_sigterm(signum, frame) -> None:
    for resources in list(_LIVE):
        resources.shutdown()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install_sigterm_handler() -> None:
    """Install the cleanup-then-die SIGTERM handler once, only over the default action."""
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    _handler_installed = True


def describe_exit(exitcode) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
