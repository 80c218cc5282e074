"""Rank discovery (our launcher, torchrun, SLURM), CPU thread split, and a real torchrun run."""
import os
import signal
import subprocess
import sys

import pytest

from launch.dist import DistEnv, cpu_threads, detect_env, first_slurm_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_launcher_means_no_env():
    assert detect_env({}) is None
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # sbatch shell: we launch


def test_torchrun_style_environment():
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, master_addr="node0",
                          master_port=1234, source="env")
    assert env.distributed and not env.is_main


def test_slurm_environment():
    env = detect_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NNODES": "2",
                      "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 3, 4)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 4242 and env.source == "slurm"
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (env.master_addr, env.master_port) == ("head", 29400)


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[03-05,07],cpu1", "gpu03"), ("a[1,2]", "a1"), ("x-01,x-02", "x-01"), ("", ""),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_bad_environment_values_are_named():
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        detect_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_cpu_threads_split_cores_between_local_ranks():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0, 1) == cores
    assert cpu_threads(0, 2 * cores) == 1
    assert cpu_threads(3, 8) == 3


def test_runs_as_is_under_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "launch", "run.py"), "--iters", "3", "--base-channels", "8", "--crop", "64x64",
           "--threads", "1", "--workers", "0", "--global-batch", "2", "--eval-max-images", "2",
           "--no-tensorboard", "--work-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave torchrun's workers behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "world 2 (env)" in out and "batch 1/rank" in out
    assert os.path.isfile(tmp_path / "iter_3.pt")
