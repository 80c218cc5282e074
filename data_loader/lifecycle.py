"""Owning and releasing a loader's OS resources: worker processes, pipes, shared-memory segments.

Every path out ends in LoaderResources.shutdown(): loader.close(), garbage collection of the
loader (weakref.finalize), normal interpreter exit including an uncaught exception or Ctrl-C
(finalize's atexit hook), and an error raised by the loader.

Signals belong to the program's entry point, not to the loader (launch/run.py turns SIGTERM into
"finish the step and checkpoint"; a loader installing its own handler would race with it). A
process killed by a signal it does not handle, SIGKILL included, runs no code at all: then each
worker notices that its parent is gone (its pipe reaches EOF, or the parent's pid no longer names
a live process; checked every 0.5 s while idle), unlinks the ring's segments by name and exits.
The Python resource tracker (which registered the segments) also unlinks whatever is left when
its last client exits, and torch's elastic launcher wrapper (launch/dist.py) sweeps segments of
ranks killed together with their workers.
"""
from __future__ import annotations

import os
import shutil
import signal



class LoaderResources:
    def __init__(self, ring, processes, conns, pinned=(), stack_dir=None):
        self.owner_pid = os.getpid()
        self.ring = ring
        self.processes = list(processes)
        self.conns = list(conns)
        self.pinned = list(pinned)  # data pointers registered with cudaHostRegister
        self.stack_dir = stack_dir  # where workers dump their stacks on SIGUSR1
        self.closed = False

    def shutdown(self) -> None:
        if self.closed or os.getpid() != self.owner_pid:  # forked children never clean up for us
            return
        self.closed = True
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


def describe_exit(exitcode) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
