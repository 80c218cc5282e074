"""One trial of launch/tune.py: a real `launch/run.py` subprocess, and what its log.jsonl says.

A trial is the user's base flags + the trial's overrides + the flags that make a run a short,
measurable one (FORCED). It runs in a session of its own, so a timeout can stop its whole process
tree (the elastic agent, the ranks, which lead sessions of their own, and their loader workers),
and it is reaped with wait4(), whose rusage gives the peak RSS of the largest process of that tree
(the launcher reaps its ranks, the ranks their workers). Also here: the machine facts the default
sweep depends on (CPU flags, whether bf16 has kernels).
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "launch", "run.py")
# Fields every trial sets itself: the user's values for them are replaced (a tuning run does not
# evaluate, checkpoint or write TensorBoard, and logs every iteration so each step is measured).
FORCED = ("iters", "evaluate", "checkpoints", "log_interval", "tensorboard", "work_dir")
# A run.py started by the tuner must not believe it is a rank of the tuner's own job.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID")


# ---- command lines ------------------------------------------------------------------------------

def flag_tokens(name: str, value) -> List[str]:
    """A TrainConfig field and value as run.py flags (the inverse of core.config's parser)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if isinstance(value, (tuple, list)):
        return [flag, "x".join(str(v) for v in value)]
    if value is None:  # only pair fields can say none on the command line (e.g. --eval-scale none)
        return [flag, "none"]
    return [flag, str(value)]


def given_flags(given: Dict[str, object], drop: Sequence[str] = ()) -> List[str]:
    """The trainer flags the user gave, as tokens again, without the fields in `drop`."""
    argv: List[str] = []
    for name, value in given.items():
        if name not in drop:
            argv += flag_tokens(name, value)
    return argv


def trial_argv(given: Dict[str, object], overrides: Dict[str, object], iters: int, work_dir: str) -> List[str]:
    """run.py's argv: the base flags the user gave, each overridden field replaced by its trial
    value (an override of None drops the flag, e.g. --pack for the PNG trial), then FORCED."""
    argv = given_flags(given, drop=(*FORCED, *overrides))
    for name, value in overrides.items():
        if value is not None:
            argv += flag_tokens(name, value)
    return argv + ["--iters", str(iters), "--no-evaluate", "--no-checkpoints", "--log-interval", "1",
                   "--no-tensorboard", "--work-dir", work_dir]


# ---- running one ----------------------------------------------------------------------------------

@dataclass
class Finished:
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # largest process of the trial's tree (ru_maxrss), 0 if unknown
    timed_out: bool


def run_process(args: Sequence[str], work_dir: str, timeout_s: Optional[float], cwd: Optional[str] = None) -> Finished:
    """`python args...` with stdout/stderr in work_dir/{stdout,stderr}.txt; its whole tree is
    stopped when it runs past timeout_s. An exception here (Ctrl-C) stops the tree too."""
    os.makedirs(work_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.monotonic()
    with open(os.path.join(work_dir, "stdout.txt"), "w") as out, open(os.path.join(work_dir, "stderr.txt"), "w") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True)
    timed_out = False
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                timed_out = True
                stop_tree(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    except BaseException:
        stop_tree(proc.pid, grace_s=2.0)
        os.wait4(proc.pid, 0)
        proc.returncode = -9  # reaped here, so Popen must not wait for it again
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    return Finished(proc.returncode, time.monotonic() - t0, int(rss), timed_out)


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM to the trial (run.py stops at the end of its step; our launcher forwards it to the
    ranks and frees their shared memory), then SIGKILL to every process of the tree still there.
    The tree is listed first: once the launcher is gone its ranks are no longer its children."""
    import psutil
    tree = _tree(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(tree):
        tree |= _tree(pid)
        time.sleep(0.2)
    for p in sorted(tree, key=lambda q: q.pid != pid):  # the launcher first: it would restart ranks
        try:
            p.kill()
        except psutil.Error:
            pass
    from data_loader.shm_ring import leftover_segments, unlink_by_name
    for p in tree:  # segments are named after their owner's pid; a SIGKILLed owner leaves them
        unlink_by_name(leftover_segments(p.pid))


def _tree(pid: int) -> Set:
    import psutil
    try:
        root = psutil.Process(pid)
        return {root, *root.children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(procs) -> bool:
    import psutil
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            pass
    return False


# ---- what a trial measured, or why it failed ---------------------------------------------------

class NoMeasurement(RuntimeError):
    pass


def read_metrics(log_path: str, warmup: int) -> Dict[str, float]:
    """Medians over the records after the warmup (one record per iteration: --log-interval 1)."""
    try:
        with open(log_path) as fh:
            recs = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise NoMeasurement(f"no {log_path}") from None
    steps = [r for r in recs if r.get("type") == "train" and r["iter"] > warmup]
    if not steps:
        raise NoMeasurement(f"{log_path} has no training record after the {warmup} warmup iterations")
    iter_ms = [r["step_ms"] + r["data_ms"] for r in steps]
    median = statistics.median(iter_ms)
    # Interquartile range over the median: how much one trial's own steps disagree; differences
    # between trials smaller than this are noise (the machine may be shared).
    quart = statistics.quantiles(iter_ms, n=4) if len(iter_ms) >= 2 else [median, median, median]
    graphs = {r["compiled_graphs"] for r in steps if "compiled_graphs" in r}
    return {
        "measured_iters": len(steps),
        "images_per_s": statistics.median(r["img_per_s"] for r in steps),
        "step_ms": median,
        "data_ms": statistics.median(r["data_ms"] for r in steps),
        "data_share": sum(r["data_ms"] for r in steps) / sum(iter_ms) if sum(iter_ms) > 0 else 0.0,
        "spread": (quart[2] - quart[0]) / median if median > 0 else 0.0,
        "log_mem_bytes": max(r["mem_bytes"] for r in steps),
        "mfu": statistics.median(r["mfu"] for r in steps),
        "recompiled": len(graphs) > 1,  # torch.compile built new graphs while being measured
    }


_MEMORY = re.compile(r"MemoryError|out of memory|can't allocate memory|cannot allocate memory", re.I)
_LAUNCHER_KILLED = re.compile(r"job failed \(exit code -9\)")  # launch/dist.py's summary line
# "ValueError: message" wherever it stands: after rank prefixes, or inside the repr of the error
# record our launcher prints (cut where the repr goes on).
_EXCEPTION = re.compile(r"\b(\w+(?:Error|Exception|Interrupt)):\s*(.*?)(?:', '|\\n|$)")
_ARGPARSE = re.compile(r"^\S+: error: .*")  # "run.py: error: argument --x: ..."
# A process that died without a Python exception: the C++ or interpreter message, the signal.
_FATAL = re.compile(r"terminate called|Fatal Python error|Segmentation fault|Signal \d+ \(SIG\w+\)")


def failure_reason(returncode: int, stderr: str) -> Tuple[str, str]:
    """(status, reason) of a trial that exited non-zero: 'oom' for out of memory (an allocation
    failed, or a process was SIGKILLed, which is what the kernel's OOM killer does), else 'failed'
    with the last error message."""
    lines = [_message(ln) for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln and not ln.startswith(("raise ", "File "))]  # traceback source lines
    memory = [ln for ln in lines if _MEMORY.search(ln)]
    if memory:
        return "oom", "out of memory: " + _short(memory[-1])
    if returncode == -signal.SIGKILL or any(_LAUNCHER_KILLED.search(ln) for ln in lines):
        return "oom", "out of memory: killed by SIGKILL (the kernel's OOM killer, most likely)"
    errors = [ln for ln in lines if _EXCEPTION.match(ln) or _ARGPARSE.match(ln)]
    fatal = list(dict.fromkeys(ln for ln in lines if _FATAL.search(ln)))
    if errors:
        last = errors[-1]
    elif fatal:
        last = "crashed: " + "; ".join(fatal[:1] + fatal[-1:] if len(fatal) > 1 else fatal)
    else:
        last = lines[-1] if lines else "(no output on stderr)"
    return "failed", f"exit code {returncode}: {_short(last)}"


def _message(line: str) -> str:
    """A stderr line without rank prefixes ('[rank1]:[rank 1] failed: '), reduced to its
    'SomeError: message' where it has one."""
    line = re.sub(r"^(\s*\[[^\]]*\]:?)+\s*", "", line).strip()
    exc = _EXCEPTION.search(line)
    if exc and not line.startswith("raise "):
        return f"{exc.group(1)}: {exc.group(2)}"
    return line


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tail(path: str, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


# ---- the machine --------------------------------------------------------------------------------

