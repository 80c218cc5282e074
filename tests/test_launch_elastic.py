"""Multi-process runs on torch's elastic agent, with the project's guarantees: restarts that resume,
several nodes meeting at a c10d rendezvous, per-rank logs, and no shared memory left behind when
ranks are killed together with their loader workers."""
import os
import re
import signal
import subprocess
import sys
import time

import psutil

from test_launch_run import RUN, ROOT, TINY, finish, run, start_until, train_records
from scripts import free_port


def test_a_failed_rank_is_restarted_and_the_job_resumes_from_its_checkpoint(tmp_path):
    args = TINY + ["--iters", "6", "--ckpt-interval", "2", "--nproc", "2", "--max-restarts", "1",
                   "--work-dir", str(tmp_path)]
    # Rank 1 fails in the first attempt only; in the second, rank 0 joins 3 s late, so rank 1 looks
    # up its address first: an address the first attempt left in a store that outlived it would be
    # found and refused (torch's shared rendezvous store, pytorch/pytorch#135712).
    proc = run(args, env_extra={"DEEPLAB_TEST_FAIL_AT": "1:3", "DEEPLAB_TEST_RESTART_DELAY": "0:3"}, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "injected failure on rank 1 at iteration 3" in proc.stderr
    assert f"resumed from {tmp_path / 'iter_2.pt'} at iteration 2" in proc.stdout
    train, _ = train_records(str(tmp_path))
    assert set(range(3, 7)) <= set(train)  # the restarted attempt trained iterations 3..6
    logs = next((tmp_path / "logs").iterdir())
    assert sorted(os.listdir(logs)) == ["attempt_0", "attempt_1"]
    for attempt in ("attempt_0", "attempt_1"):  # per-rank log files of each attempt
        assert re.search(r"iter \d/6 ", (logs / attempt / "0" / "stdout.log").read_text())  # rank 0 logs iterations
        assert (logs / attempt / "1" / "stderr.log").is_file()
    assert "injected failure on rank 1" in (logs / "attempt_0" / "1" / "stderr.log").read_text()


def test_two_nodes_meet_at_a_c10d_rendezvous(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    common = TINY + ["--iters", "3", "--nnodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--rdzv-id", f"test-{port}", "--ckpt-interval", "1000"]
    nodes = [subprocess.Popen([sys.executable, RUN, *common, "--work-dir", str(tmp_path / f"node{i}")], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for i in range(2)]
    outs = []
    try:
        for node in nodes:
            outs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    text = "".join(outs)
    assert "world 2 (env)" in text and "batch 1/rank" in text  # one job of two ranks, one per "node"
    # exactly one node holds global rank 0, which logs and checkpoints
    assert sum(os.path.isfile(tmp_path / f"node{i}" / "iter_3.pt") for i in range(2)) == 1


def test_a_second_signal_kills_ranks_and_workers_and_their_shared_memory_is_removed(tmp_path):
    args = TINY + ["--iters", "5000", "--ckpt-interval", "4000", "--nproc", "2", "--workers", "2",
                   "--work-dir", str(tmp_path)]
    proc, seen = start_until(args, " iter 2/5000")
    ranks = [c for c in psutil.Process(proc.pid).children() if RUN in c.cmdline()]
    assert len(ranks) == 2
    pids = [r.pid for r in ranks]
    assert all(_segments(pid) for pid in pids)  # each rank's loader has its slots in /dev/shm
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the impatient second Ctrl-C: no checkpoint, kill everything now
    start = time.monotonic()
    text = finish(proc, seen, timeout=60)
    assert time.monotonic() - start < 30, text[-2000:]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not any(_segments(pid) for pid in pids), text[-2000:]


def _segments(pid):
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dlt_{pid}_")]


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_the_global_data_order_continues(tmp_path):
    common = TINY + ["--ckpt-interval", "2", "--keep-ckpts", "10"]
    full = run(common + ["--iters", "4", "--nproc", "2", "--work-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    # Same global batch (2 images per step): 2 ranks x 1 -> 1 rank x 2.
    resumed = run(common + ["--iters", "4", "--global-batch", "2", "--work-dir", str(tmp_path / "one"),
                            "--resume", str(tmp_path / "full" / "iter_2.pt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 ranks, this run has 1" in resumed.stdout and "global data order continue" in resumed.stdout
    import torch
    a = torch.load(tmp_path / "full" / "iter_4.pt", weights_only=True)["loader"]
    b = torch.load(tmp_path / "one" / "iter_4.pt", weights_only=True)["loader"]
    assert [s["global_position"] for s in a] == [8, 8] and [s["global_position"] for s in b] == [8]
    bad = run(common + ["--iters", "4", "--global-batch", "3", "--work-dir", str(tmp_path / "bad"),
                        "--resume", str(tmp_path / "full" / "iter_2.pt")])
    assert bad.returncode != 0 and "needs the same global batch" in bad.stderr
