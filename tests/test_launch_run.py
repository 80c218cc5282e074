"""launch/run.py end to end as real subprocesses on the synthetic set (tiny model, CPU):
it learns, resumes exactly, evaluates a checkpoint, stops cleanly on SIGTERM, and fails fast
and loudly when a rank dies or the loss keeps going non-finite."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from scripts import clean_env, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "launch", "run.py")
TINY = ["--base-channels", "8", "--crop", "64x64", "--threads", "1", "--workers", "1", "--global-batch", "2",
        "--eval-interval", "0", "--log-interval", "1", "--no-tensorboard"]
# Learning run: 60 iterations of r18/16 at 128x256, batch 4, lr 0.05: ~10 s on one core. It reaches
# mIoU 18.2 here; predicting the majority class everywhere gives 3.2 (the untrained model's score).
LEARN = ["--base-channels", "16", "--crop", "128x256", "--threads", "1", "--workers", "1", "--global-batch", "4",
         "--lr", "0.05", "--iters", "60", "--ckpt-interval", "30", "--eval-interval", "0", "--log-interval", "1",
         "--no-tensorboard"]
MIOU_FLOOR = 12.0


def run(args, env_extra=None, timeout=240):
    """run.py in its own session; on timeout the whole process group is killed (no orphaned ranks)."""
    return run_script([RUN, *args], timeout=timeout, env=clean_env(env_extra), what=f"run.py {' '.join(args)}")


def start_until(args, marker):
    """run.py started in its own session, returned once its output shows `marker`."""
    proc = subprocess.Popen([sys.executable, RUN, *args], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    return proc, seen


def finish(proc, seen, timeout=120):
    """All output of a started run.py once it exits; killed (whole session) if it does not."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return "".join(seen) + out


def train_records(work_dir):
    with open(os.path.join(work_dir, "log.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return {r["iter"]: r for r in recs if r["type"] == "train"}, [r for r in recs if r["type"] == "eval"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("learn"))
    proc = run(LEARN + ["--work-dir", work])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def test_training_on_the_synthetic_set_learns(learned):
    work, proc = learned
    train, evals = train_records(work)
    assert sorted(train) == list(range(1, 61))
    assert evals and evals[-1]["iter"] == 60
    miou = evals[-1]["mIoU"]
    print(f"mIoU after 60 iterations: {miou:.2f}")
    assert miou > MIOU_FLOOR
    # what the run leaves behind: resolved config, curves, per-class table and JSON
    assert os.path.isfile(os.path.join(work, "config.yaml"))
    assert os.path.getsize(os.path.join(work, "curves.png")) > 1000
    metrics = json.load(open(os.path.join(work, "eval_iter_60.json")))
    assert len(metrics["per_class"]) == 19 and metrics["per_class"][0]["class"] == "road"
    assert "| road" in proc.stdout and "mIoU:" in proc.stdout
    line = next(l for l in proc.stdout.splitlines() if "iter 60/60" in l)
    for field in ("loss", "lr", "step", "data", "img/s", "MFU", "mem", "eta"):
        assert field in line
    rec = train[60]
    assert rec["mfu"] > 0 and rec["img_per_s"] > 0 and rec["mem_bytes"] > 0


def test_checkpoint_holds_everything_and_loads_weights_only(learned):
    work, _ = learned
    state = torch.load(os.path.join(work, "iter_30.pt"), weights_only=True)
    assert set(state) >= {"meta", "state_dict", "optimizer", "amp", "lr_schedule", "rng", "loader", "counters"}
    assert state["meta"]["iteration"] == 30 and state["meta"]["config"]["crop"] == [128, 256]
    assert any(k.startswith("decode_head.") for k in state["state_dict"])
    assert state["loader"][0]["next_batch"] == 30
    assert state["lr_schedule"]["iteration"] == 29  # the lr of the last step taken


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(learned, tmp_path):
    work, _ = learned
    proc = run(LEARN + ["--work-dir", str(tmp_path), "--resume", os.path.join(work, "iter_30.pt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, full_eval = train_records(work)
    resumed, resumed_eval = train_records(str(tmp_path))
    assert sorted(resumed) == list(range(31, 61))
    for it in range(31, 61):
        assert resumed[it]["loss"] == full[it]["loss"], it  # bit-identical, fp32 on CPU
    assert resumed_eval[-1]["mIoU"] == full_eval[-1]["mIoU"]


def test_eval_only_reproduces_the_final_evaluation(learned, tmp_path):
    work, _ = learned
    # no model flags: the architecture (r18 at base width 16) comes from the checkpoint
    proc = run(["--eval-only", "--checkpoint", os.path.join(work, "iter_60.pt"), "--work-dir", str(tmp_path),
                "--threads", "1", "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, evals = train_records(work)
    metrics = json.load(open(tmp_path / "eval_iter_60.json"))
    assert metrics["mIoU"] == evals[-1]["mIoU"]
    assert "| road" in proc.stdout
    slide = run(LEARN + ["--eval-only", "--checkpoint", os.path.join(work, "iter_60.pt"),
                         "--work-dir", str(tmp_path / "slide"), "--eval-mode", "slide",
                         "--eval-tile", "128x256", "--eval-stride", "96x192"])
    assert slide.returncode == 0, slide.stderr[-3000:]
    slide_miou = json.load(open(tmp_path / "slide" / "eval_iter_60.json"))["mIoU"]
    assert slide_miou > MIOU_FLOOR  # tiles of the training size work as well as the whole image


def test_sigterm_makes_every_rank_checkpoint_the_same_iteration_and_exit_cleanly(tmp_path):
    # O2 + SyncBN on purpose: the same run also covers bf16 DDP with fp32 masters and CPU SyncBN.
    args = TINY + ["--iters", "5000", "--ckpt-interval", "4000", "--nproc", "2", "--opt-level", "O2", "--sync-bn",
                   "--work-dir", str(tmp_path)]
    proc, seen = start_until(args, " iter 3/5000")  # training runs
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, seen)
    assert proc.returncode == 0, text[-3000:]
    ckpts = [f for f in os.listdir(tmp_path) if f.startswith("iter_")]
    assert len(ckpts) == 1, ckpts
    it = int(ckpts[0][5:-3])
    assert 3 <= it < 5000
    state = torch.load(tmp_path / ckpts[0], weights_only=True)
    assert state["meta"]["world_size"] == 2 and len(state["rng"]) == 2
    assert [s["next_batch"] for s in state["loader"]] == [it, it]  # both ranks stopped at the same step
    assert f"stopped by SIGTERM at iteration {it}" in text
    # `--resume auto` picks that checkpoint up and carries on from the next iteration.
    again = run(TINY + ["--iters", str(it + 2), "--ckpt-interval", "4000", "--nproc", "2", "--opt-level", "O2",
                        "--sync-bn", "--work-dir", str(tmp_path), "--resume", "auto"], timeout=180)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"resumed from {tmp_path / ckpts[0]} at iteration {it}" in again.stdout
    train, _ = train_records(str(tmp_path))
    assert {it + 1, it + 2} <= set(train)


def test_a_failing_rank_brings_the_job_down_with_a_nonzero_exit(tmp_path):
    start = time.monotonic()
    proc = run(TINY + ["--iters", "5000", "--nproc", "2", "--work-dir", str(tmp_path)],
               env_extra={"DEEPLAB_TEST_FAIL_AT": "1:3"}, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1 at iteration 3" in proc.stderr
    # torch's elastic agent reports the rank that failed first, with its exception (recorded by @record)
    assert re.search(r"\[launcher\] rank 1 \(pid \d+\) failed with exit code 1: .*injected failure on rank 1",
                     proc.stderr), proc.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f}s: a surviving rank hung"


def test_too_many_non_finite_steps_stop_the_run(tmp_path):
    proc = run(TINY + ["--iters", "30", "--lr", "1e30", "--max-nonfinite", "3", "--work-dir", str(tmp_path)])
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in proc.stderr


def test_sigterm_to_the_whole_process_group_still_stops_cleanly(tmp_path):
    # What a scheduler's preemption does (srun, a container stop): the rank AND its loader workers
    # get SIGTERM. The workers must outlive the step so the rank can finish it and checkpoint.
    args = TINY + ["--iters", "5000", "--ckpt-interval", "4000", "--workers", "2", "--work-dir", str(tmp_path)]
    proc, seen = start_until(args, " iter 3/5000")
    try:
        # The worst order a group signal can arrive in: the workers get it a few steps before the rank.
        workers = psutil.Process(proc.pid).children()
        assert len(workers) >= 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None and all(w.is_running() for w in workers)
        os.killpg(proc.pid, signal.SIGTERM)
    finally:
        text = finish(proc, seen)
    assert proc.returncode == 0, text[-3000:]
    assert "stopped by SIGTERM" in text
    assert [f for f in os.listdir(tmp_path) if f.startswith("iter_")]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dlt_{proc.pid}_")]


def test_training_from_a_pack_matches_training_from_png(tmp_path):
    from data_loader.synthetic import default_dataset
    root = default_dataset()
    pack = tmp_path / "pack"
    made = subprocess.run([sys.executable, "-m", "data_loader.pack", root, "--out", str(pack), "--nproc", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert made.returncode == 0, made.stderr[-2000:]
    args = TINY + ["--iters", "3", "--ckpt-interval", "1000"]
    png = run(args + ["--work-dir", str(tmp_path / "png")])
    packed = run(args + ["--work-dir", str(tmp_path / "packed"), "--pack", str(pack)])
    assert png.returncode == 0 and packed.returncode == 0, png.stderr[-2000:] + packed.stderr[-2000:]
    losses = [{k: v["loss"] for k, v in train_records(str(tmp_path / d))[0].items()} for d in ("png", "packed")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    stale = run(args + ["--work-dir", str(tmp_path / "stale"), "--pack", str(tmp_path / "nopack")])
    assert stale.returncode != 0 and "nopack" in stale.stderr


def test_sigterm_while_the_rank_waits_for_a_stuck_worker_ends_the_wait_and_checkpoints(tmp_path):
    # The stall is real: the labels become FIFOs with no writer, so the worker blocks in open().
    # Before, the rank printed "finishing this step" and waited for the loader's timeout.
    from data_loader.cityscapes import CityscapesIndex
    from data_loader.synthetic import generate
    root = generate(str(tmp_path / "data"), num_train=4, num_val=1, size=(128, 64), seed=4)
    args = TINY + ["--preset", "demo", "--data", root, "--crop", "32x64", "--scale", "128x64", "--iters", "1000",
                   "--ckpt-interval", "1000", "--loader-timeout", "600", "--work-dir", str(tmp_path / "work")]
    proc, seen = start_until(args, " iter 2/1000")
    try:
        labels = [label for _, label in CityscapesIndex(root, "train").samples]
        originals = {}
        for label in labels:
            originals[label] = open(label, "rb").read()
            os.unlink(label)
            os.mkfifo(label)
        time.sleep(3)  # the prefetched batches are used up: the rank now waits for the stuck worker
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        text = finish(proc, seen, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for label, data in originals.items():
            os.unlink(label)
            open(label, "wb").write(data)
    assert proc.returncode == 0, text[-3000:]
    assert elapsed < 20, f"the rank took {elapsed:.0f} s to stop"
    it = int(re.search(r"stopped by SIGTERM while waiting for a batch at iteration (\d+)", text).group(1))
    state = torch.load(tmp_path / "work" / f"iter_{it}.pt", weights_only=True)
    assert state["meta"]["iteration"] == it and state["loader"][0]["next_batch"] == it
    again = run(args[:-2] + ["--work-dir", str(tmp_path / "work"), "--iters", str(it + 2), "--resume", "auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at iteration {it}" in again.stdout and f"iter {it + 2}/{it + 2}" in again.stdout


def test_compiled_training_and_evaluation_compile_once_and_match_eager(tmp_path):
    # Static shapes everywhere: the train step compiles at step 1, the evaluation at its first
    # call, and nothing recompiles after that (a recompilation would raise the graph count).
    args = TINY + ["--iters", "4", "--eval-interval", "2", "--eval-max-images", "2", "--ckpt-interval", "1000"]
    compiled = run(args + ["--compile", "--work-dir", str(tmp_path / "c")], timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    recs = [json.loads(line) for line in open(tmp_path / "c" / "log.jsonl")]
    graphs = [(r["type"], r["iter"], r["compiled_graphs"]) for r in recs]
    train_graphs = [g for t, _, g in graphs if t == "train"]
    eval_graphs = [g for t, _, g in graphs if t == "eval"]
    assert len(train_graphs) == 4 and len(eval_graphs) == 2, graphs
    assert train_graphs[0] == train_graphs[1] >= 1  # train mode compiled once, at step 1
    assert eval_graphs[0] > train_graphs[1]  # eval mode compiled at the first evaluation ...
    assert train_graphs[2] == train_graphs[3] == eval_graphs[1] == eval_graphs[0], graphs  # ... and never again
    eager = run(args + ["--work-dir", str(tmp_path / "e")])
    assert eager.returncode == 0, eager.stderr[-3000:]
    c_loss = [r["loss"] for r in recs if r["type"] == "train"]
    e_loss = [r["loss"] for k, r in sorted(train_records(str(tmp_path / "e"))[0].items())]
    assert c_loss == pytest.approx(e_loss, rel=1e-3)  # inductor may reorder float sums, nothing more


def test_a_memory_saving_norm_trains_and_eval_only_rebuilds_it_from_the_checkpoint(tmp_path):
    args = TINY + ["--iters", "2", "--norm", "inplace-abn-residual", "--eval-max-images", "2",
                   "--eval-interval", "2", "--work-dir", str(tmp_path)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, evals = train_records(str(tmp_path))
    again = run(["--eval-only", "--checkpoint", str(tmp_path / "iter_2.pt"), "--work-dir", str(tmp_path / "e"),
                 "--threads", "1", "--workers", "1", "--eval-max-images", "2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "'norm': 'inplace-abn-residual'" in again.stdout  # the activation is part of the architecture
    assert json.load(open(tmp_path / "e" / "eval_iter_2.json"))["mIoU"] == evals[-1]["mIoU"]
