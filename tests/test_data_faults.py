"""Failure behaviour for real: killed workers, signals to the main process, exceptions, GC.

After each, no shared-memory segment of the loader may remain in /dev/shm and no worker may live.
"""
import gc
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from data_loader.loader import LoaderWorkerError, build_train_loader
from data_loader.shm_ring import leftover_segments
from data_loader.synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = dict(workers=2, seed=0, batch_size=1, crop=(16, 32), scale=(64, 32))

TRAINING_SCRIPT = r"""
import sys, time
from data_loader.loader import build_train_loader
root, mode = sys.argv[1], sys.argv[2]
loader = build_train_loader(root, workers=2, seed=0, batch_size=1, crop=(16, 32), scale=(64, 32))
batches = iter(loader)
next(batches)
print("READY", ",".join(loader.segment_names), ",".join(map(str, loader.worker_pids)), flush=True)
for step in range(10**9):
    next(batches)
    if mode == "raise" and step == 2:
        raise ValueError("the training step failed")
    time.sleep(0.01)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("faults")), num_train=4, num_val=0, size=(64, 32), seed=1)


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def segments_present(names):
    return [n for n in names if os.path.exists(os.path.join("/dev/shm", n))]


def communicate(proc, timeout):
    """proc.communicate(timeout), but a process (or a child holding its pipes) still there at the
    timeout fails the test with every one's Python stack (py-spy) and the process tree."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid] + [c.pid for c in _children(proc.pid)]
        dumps = []
        for pid in tree:
            dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            dumps.append(f"--- pid {pid}: {_cmdline(pid)}\n{dump.stdout}{dump.stderr}")
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        pytest.fail(f"the process did not end within {timeout} s; stacks:\n" + "\n".join(dumps))


def _children(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(pid):
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.Error:
        return "(gone)"


def start_training(root, mode="loop", own_session=False):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", TRAINING_SCRIPT, root, mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_session)
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        proc.kill()
        raise AssertionError(f"training script did not start: {line} {proc.communicate()[1]}")
    names, pids = line[1].split(","), [int(p) for p in line[2].split(",")]
    assert len(names) == 5 and all(n.startswith(f"dlt_{proc.pid}_") for n in names)
    assert segments_present(names) == names and all(alive(p) for p in pids)
    return proc, names, pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_main_process_releases_everything(root, sig):
    proc, names, pids = start_training(root)
    proc.send_signal(sig)
    _, err = communicate(proc, 20)
    assert proc.returncode == -sig, err
    # SIGINT unwinds through Python (the loader's finalizer); SIGTERM, left to its default action by
    # the loader (signals are the entry point's), kills at once and the workers clean up after it.
    assert wait_until(lambda: segments_present(names) == [] and leftover_segments(proc.pid) == [], 5)
    assert wait_until(lambda: not any(alive(p) for p in pids), 5)


def test_exception_in_the_training_loop_releases_everything(root):
    proc, names, pids = start_training(root, mode="raise")
    _, err = communicate(proc, 20)
    assert proc.returncode == 1 and "the training step failed" in err
    assert segments_present(names) == []
    assert wait_until(lambda: not any(alive(p) for p in pids), 5)


def test_sigkill_of_the_main_process_orphaned_workers_clean_up(root):
    proc, names, pids = start_training(root)
    proc.kill()
    communicate(proc, 10)
    assert wait_until(lambda: segments_present(names) == [], 5), segments_present(names)
    assert wait_until(lambda: not any(alive(p) for p in pids), 5)


def test_segments_of_a_process_group_killed_together_are_removed_by_the_next_loader(root):
    # SIGKILL to the whole group (a scheduler, a timeout): rank and workers die at once and nobody
    # is left to unlink; the next loader on the machine removes what dead owners left.
    proc, names, pids = start_training(root, own_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    communicate(proc, 10)
    assert wait_until(lambda: not any(alive(p) for p in pids), 5)
    time.sleep(1.0)  # longer than a worker's orphan check: no survivor cleans up
    assert segments_present(names) == names
    with build_train_loader(root, **OPTS) as loader:
        assert segments_present(names) == []
        assert segments_present(loader.segment_names) == loader.segment_names  # live owners' stay


def test_a_killed_worker_makes_the_iterator_raise_within_seconds(root):
    loader = build_train_loader(root, **OPTS)
    names = loader.segment_names
    batches = iter(loader)
    next(batches)
    os.kill(loader.worker_pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(LoaderWorkerError, match=r"worker 1 \(pid \d+\) died unexpectedly \(killed by signal SIGKILL\)"):
        for _ in range(100):
            next(batches)
    assert time.monotonic() - start < 5
    assert segments_present(names) == []
    assert not any(alive(p) for p in loader.worker_pids)


def test_workers_dead_before_the_next_request_give_the_clear_error(root):
    # Handing a task to a dead worker fails on its pipe first: that too must be LoaderWorkerError.
    loader = build_train_loader(root, **OPTS)
    batches = iter(loader)
    next(batches)
    for pid in loader.worker_pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(alive(p) for p in loader.worker_pids), 5)
    with pytest.raises(LoaderWorkerError, match="died unexpectedly"):
        for _ in range(100):
            next(batches)


def test_garbage_collection_of_the_loader_releases_everything(root):
    loader = build_train_loader(root, **OPTS)
    next(iter(loader))
    names, pids = loader.segment_names, loader.worker_pids
    assert segments_present(names) == names
    del loader
    gc.collect()
    assert segments_present(names) == []
    assert wait_until(lambda: not any(alive(p) for p in pids), 5)
