"""Loader workers under py-spy: one flame graph SVG per worker process, over the traced steps.

torch.profiler sees only the rank's own process; the decoding and augmentation run in the
loader's worker processes, which py-spy samples from outside (it reads their memory with ptrace;
it needs no change to the workers). Each worker gets its own `py-spy record --pid PID`:
`--subprocesses` on the rank would not find them, because the workers are children of the
loader's fork server, not of the rank (data_loader/processes.py). A recording is started before
the traced steps (we wait until py-spy reports that it samples) and stopped with SIGINT after
them, which makes py-spy write its SVG and exit, so the graph covers exactly the traced steps
(a fixed --duration could not know how long they take). `--nonblocking` samples without pausing
the worker, so the recording does not slow the loader it measures.

Without ptrace permission (a container without CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=3)
py-spy exits at once with an error: that is reported with py-spy's own message and the rest of
the trace goes on.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 60.0


def find_py_spy() -> Optional[str]:
    """py-spy next to this Python (a venv's bin/), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


class PySpyRecorder:
    """start() before the steps, stop() after them; results() says what each recording gave."""

    def __init__(self, pids: Sequence[int], out_dir: str, rate: int = 100, prefix: str = "loader_worker"):
        self.pids = list(pids)
        self.out_dir = out_dir
        self.rate = rate
        self.prefix = prefix
        self._procs: List[Optional[subprocess.Popen]] = []
        self._records: List[Dict] = []

    def start(self) -> List[Dict]:
        exe = find_py_spy()
        if exe is None:
            self._records = [{"pid": None, "ok": False,
                              "message": "--py-spy: the py-spy executable was not found (pip install py-spy)"}]
            return self._records
        if not self.pids:
            self._records = [{"pid": None, "ok": False,
                              "message": "--py-spy: the loader has no worker processes (--workers 0): nothing to "
                                         "record; the loading runs inside the rank and shows in ops.md/trace.json"}]
            return self._records
        for i, pid in enumerate(self.pids):
            svg = os.path.join(self.out_dir, f"{self.prefix}{i}.svg")
            log = os.path.join(self.out_dir, f"{self.prefix}{i}.py-spy.log")
            if os.path.exists(svg):
                os.remove(svg)  # a stale graph of an earlier run must not pass for this one
            with open(log, "w") as fh:
                # Own session: a Ctrl-C meant for trace.py must not stop the recordings early;
                # we stop them ourselves in stop().
                proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "flamegraph", "-o", svg,
                                         "--rate", str(self.rate), "--nonblocking"],
                                        stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            self._procs.append(proc)
            self._records.append({"pid": pid, "svg": svg, "log": log, "ok": False, "message": ""})
        deadline = time.monotonic() + START_TIMEOUT_S
        for proc, rec in zip(self._procs, self._records):
            while proc.poll() is None and "Sampling process" not in _read(rec["log"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is not None:
                rec["message"] = _failure(rec["pid"], _read(rec["log"]))
        return self._records

    def stop(self) -> List[Dict]:
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes the SVG and exits
        for proc, rec in zip(self._procs, self._records):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rec["message"] = rec["message"] or (f"py-spy on pid {rec['pid']} did not exit "
                                                    f"{STOP_TIMEOUT_S:.0f} s after SIGINT")
            text = _read(rec["log"])
            samples = re.search(r"Samples: (\d+)", text)
            rec["samples"] = int(samples.group(1)) if samples else 0
            rec["ok"] = os.path.isfile(rec["svg"]) and not rec["message"]
            if not rec["ok"] and not rec["message"]:
                rec["message"] = _failure(rec["pid"], text)
        self._procs = []
        return self._records

    def results(self) -> List[Dict]:
        return self._records


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _failure(pid, text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = " | ".join(lines[-3:]) or "no output"
    hint = ""
    if re.search(r"permission|ptrace|operation not permitted", text, re.IGNORECASE):
        hint = (" (py-spy needs ptrace permission: run as root, or give the container CAP_SYS_PTRACE, or set "
                "kernel.yama.ptrace_scope=0)")
    return f"py-spy could not record loader worker pid {pid}: {detail}{hint}"
