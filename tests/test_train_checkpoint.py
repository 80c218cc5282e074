"""Checkpoint IO: atomic writes that survive a kill mid-write, newest-K retention, resume lookup,
weights_only loading, and RNG state round trips."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from core import checkpoint as ck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_save_is_loadable_with_weights_only_and_lists_newest_first(tmp_path):
    for it in (10, 2, 30):
        ck.save_atomic({"meta": {"iteration": it, "config": {"crop": [64, 64], "resume": None}},
                        "state_dict": {"w": torch.full((3,), float(it))}, "rng": ck.capture_rng()},
                       ck.checkpoint_path(str(tmp_path), it))
    assert [it for it, _ in ck.list_checkpoints(str(tmp_path))] == [2, 10, 30]
    latest = ck.latest_checkpoint(str(tmp_path))
    assert latest.endswith("iter_30.pt")
    state = ck.load_checkpoint(latest)  # torch.load(weights_only=True) inside
    assert state["meta"]["iteration"] == 30 and state["state_dict"]["w"][0] == 30.0
    assert ck.resolve_resume("auto", str(tmp_path)) == latest
    assert ck.resolve_resume(None, str(tmp_path)) is None
    assert ck.resolve_resume("auto", str(tmp_path / "empty")) is None
    with pytest.raises(FileNotFoundError, match="--resume"):
        ck.resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path))


def test_prune_keeps_the_newest_k(tmp_path):
    for it in range(1, 6):
        ck.save_atomic({"i": it}, ck.checkpoint_path(str(tmp_path), it))
    ck.prune_checkpoints(str(tmp_path), keep=2)
    assert [it for it, _ in ck.list_checkpoints(str(tmp_path))] == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["iter_4.pt", "iter_5.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = ck.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    path = str(tmp_path / "iter_1.pt")
    ck.save_atomic({"rng": state}, path)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.restore_rng(ck.load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2] and got[3] == expected[3]


_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from core.checkpoint import save_atomic
    print("writing", flush=True)
    save_atomic({{"w": torch.ones(50 * 2 ** 20)}}, {path!r})   # 200 MB: long enough to be killed in
""")


def test_kill_during_write_leaves_previous_checkpoint_and_no_partial_file(tmp_path):
    work = str(tmp_path)
    ck.save_atomic({"w": torch.arange(4.0)}, ck.checkpoint_path(work, 1))
    target = ck.checkpoint_path(work, 2)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=ROOT, path=target)], stdout=subprocess.PIPE)
    tmp_prefix = f".tmp-{proc.pid}-"
    deadline = time.monotonic() + 60
    killed_mid_write = False
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [f for f in os.listdir(work) if f.startswith(tmp_prefix)]
        if partial and os.path.getsize(os.path.join(work, partial[0])) > 0:
            proc.send_signal(signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert killed_mid_write, "the writer finished before it could be killed"
    leftovers = [f for f in os.listdir(work) if f.startswith(tmp_prefix)]
    assert leftovers, "the kill should have left the temp file behind"
    assert os.path.getsize(os.path.join(work, leftovers[0])) < 200 * 2 ** 20
    assert not os.path.exists(target)  # never a partial iter_2.pt
    latest = ck.latest_checkpoint(work)
    assert latest == ck.checkpoint_path(work, 1)
    assert torch.equal(ck.load_checkpoint(latest)["w"], torch.arange(4.0))
    ck.prune_checkpoints(work, keep=3)  # the dead writer's temp file is cleaned up
    assert sorted(os.listdir(work)) == ["iter_1.pt"]
