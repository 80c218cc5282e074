"""Faults a user meets, each a clear error before any work is lost or wasted: a second run in one
work dir, unreadable or mismatched checkpoints, a finished run resumed, labels beyond
--num-classes, a broken val split, a batch that cannot fit in memory, and a low-precision level on
a CPU without kernels for it. All through launch/run.py itself. (An mmseg 0.x file for --eval-only:
tests/test_launch_mmseg.py.)"""
import os
import re
import shutil
import signal

import pytest
import torch

from core.checkpoint import load_checkpoint
from core.cpu import cpu_bf16, cpu_flags, cpu_fp16
from core.memory import saved_activation_bytes
from core.mmseg_io import CheckpointError, read_checkpoint
from data_loader.cityscapes import CityscapesIndex
from data_loader.synthetic import generate
from test_launch_run import TINY, finish, run, start_until
from test_launch_mmseg import SMALL


def started_training(text):
    return " iter 1/" in text


def test_a_second_run_in_the_same_work_dir_is_refused_naming_the_first(tmp_path):
    first, seen = start_until(TINY + ["--iters", "5000", "--ckpt-interval", "4000", "--work-dir", str(tmp_path)],
                              " iter 2/5000")
    try:
        second = run(TINY + ["--iters", "3", "--work-dir", str(tmp_path)])
        assert second.returncode != 0
        assert f"is in use by another training run (pid {first.pid} on" in second.stderr, second.stderr[-2000:]
        assert not started_training(second.stdout)
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first, seen)
    assert first.returncode == 0
    # The lock goes with its holder: the next run may use the work dir (and resumes the first).
    third = run(TINY + ["--iters", "3", "--work-dir", str(tmp_path), "--resume", "auto", "--no-evaluate"])
    assert third.returncode == 0, third.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two iterations of the tiny model at output stride 8, checkpointed at iteration 2."""
    work = tmp_path_factory.mktemp("trained")
    proc = run(TINY + ["--iters", "2", "--ckpt-interval", "2", "--no-evaluate", "--work-dir", str(work)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "iter_2.pt"


def damaged_copies(ckpt, tmp_path):
    empty, truncated, text = tmp_path / "empty.pt", tmp_path / "truncated.pt", tmp_path / "notes.pt"
    empty.write_bytes(b"")
    data = ckpt.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    text.write_text("not a checkpoint\n")
    return {empty: "is empty (0 bytes)", truncated: "damaged or truncated torch.save archive",
            text: "is not a torch checkpoint"}


def test_unreadable_checkpoints_are_named_with_what_is_wrong(trained, tmp_path):
    for path, what in damaged_copies(trained, tmp_path).items():
        with pytest.raises(ValueError, match=re.escape(what)) as err:
            load_checkpoint(str(path))
        assert str(path) in str(err.value)
        with pytest.raises(CheckpointError, match=re.escape(what)):
            read_checkpoint(str(path))


def test_run_py_reports_unreadable_checkpoints_for_resume_and_eval_only(trained, tmp_path):
    copies = damaged_copies(trained, tmp_path)
    truncated = next(p for p, what in copies.items() if "truncated" in what)
    empty = next(p for p, what in copies.items() if "empty" in what)
    resume = run(TINY + ["--iters", "4", "--resume", str(truncated), "--work-dir", str(tmp_path / "r")])
    assert resume.returncode != 0 and f"{str(truncated)!r}: it is a damaged or truncated" in resume.stderr
    evaluate = run(["--eval-only", "--checkpoint", str(empty), "--work-dir", str(tmp_path / "e"), *SMALL])
    assert evaluate.returncode != 0 and "is empty (0 bytes)" in evaluate.stderr


def test_resume_with_another_architecture_names_what_differs(trained, tmp_path):
    proc = run(TINY + ["--iters", "4", "--output-stride", "16", "--resume", str(trained),
                       "--work-dir", str(tmp_path)])
    assert proc.returncode != 0
    assert "output_stride: checkpoint 8, this run 16" in proc.stderr, proc.stderr[-2000:]
    assert not started_training(proc.stdout)
    weights_only = tmp_path / "weights.pt"  # a model file is for --load-from, not for --resume
    torch.save({"state_dict": torch.load(trained, weights_only=True)["state_dict"]}, weights_only)
    proc = run(TINY + ["--iters", "4", "--resume", str(weights_only), "--work-dir", str(tmp_path / "w")])
    assert proc.returncode != 0 and "not a training checkpoint of this trainer (no meta, optimizer, loader)" in \
        proc.stderr and "--load-from" in proc.stderr


def test_resuming_a_finished_run_says_so(trained, tmp_path):
    proc = run(TINY + ["--iters", "2", "--resume", str(trained), "--work-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is at iteration 2 and --iters is 2: nothing left to train" in proc.stdout
    assert not started_training(proc.stdout)


@pytest.fixture
def dataset(tmp_path):
    return generate(str(tmp_path / "data"), num_train=4, num_val=2, size=(256, 128), seed=3)


def test_labels_beyond_num_classes_are_found_before_training(dataset, tmp_path):
    proc = run(TINY + ["--data", dataset, "--preset", "demo", "--num-classes", "5", "--iters", "2",
                       "--work-dir", str(tmp_path / "w")])
    assert proc.returncode != 0
    assert "_gtFine_labelTrainIds.png: label value" in proc.stderr and "--num-classes is 5" in proc.stderr
    assert not started_training(proc.stdout)


def test_a_broken_val_split_is_found_before_training(dataset, tmp_path):
    image, label = CityscapesIndex(dataset, "val").samples[0]
    os.remove(label)
    proc = run(TINY + ["--data", dataset, "--preset", "demo", "--iters", "2", "--work-dir", str(tmp_path / "w")])
    assert proc.returncode != 0
    assert f"{image}: no label image" in proc.stderr, proc.stderr[-2000:]
    assert not started_training(proc.stdout)
    shutil.rmtree(os.path.join(dataset, "gtFine", "val"))  # without evaluation the val split is not needed
    proc = run(TINY + ["--data", dataset, "--preset", "demo", "--iters", "1", "--no-evaluate",
                       "--work-dir", str(tmp_path / "w2")])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_batch_that_cannot_fit_is_refused_before_it_allocates(tmp_path):
    proc = run(TINY + ["--backbone", "r50", "--base-channels", "64", "--crop", "1024x2048", "--global-batch", "64",
                       "--iters", "1", "--work-dir", str(tmp_path)])
    assert proc.returncode != 0
    assert "batch 64/process at 1024x2048 needs about" in proc.stderr and "GiB is available" in proc.stderr
    assert not started_training(proc.stdout)


def test_saved_activation_estimate_matches_a_hand_count():
    # conv saves its input (the weight is a parameter, not counted); ReLU saves its output; the
    # 1x1 conv after it saves that same output again: one storage, counted once.
    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    saved, n_params = saved_activation_bytes(build, 2, (8, 8), channels_last=False)
    assert saved == 2 * 3 * 8 * 8 * 4 + 2 * 4 * 8 * 8 * 4
    assert n_params == 4 * 3 * 9 + 4 + 2 * 4 + 2


def test_cpu_precision_verdicts_from_flags():
    assert cpu_bf16({"avx2", "avx512f", "avx512_bf16"}, "AVX512")[0]
    assert cpu_bf16({"avx2", "amx_bf16"}, "AMX")[0]
    assert not cpu_bf16({"avx2", "fma"}, "AVX2")[0]
    assert not cpu_bf16({"avx512_bf16"}, "AVX2")[0]  # torch lowered to AVX2: its bf16 ops are slow
    assert cpu_fp16({"avx512_fp16"}, "AVX512")[0] and cpu_fp16({"amx_fp16"}, "AMX")[0]
    assert not cpu_fp16({"avx512_bf16", "avx512f"}, "AVX512")[0]


def test_a_low_precision_level_without_cpu_kernels_is_refused_unless_insisted(tmp_path):
    # ATEN_CPU_CAPABILITY=avx2 makes torch use its AVX2 kernels on any x86 CPU: no fast bf16 there.
    env = {"ATEN_CPU_CAPABILITY": "avx2"}
    proc = run(TINY + ["--opt-level", "O1", "--iters", "1", "--work-dir", str(tmp_path / "a")], env_extra=env)
    assert proc.returncode != 0
    assert "--opt-level O1 computes in bfloat16, but on this CPU" in proc.stderr
    assert "--allow-slow-precision" in proc.stderr and not started_training(proc.stdout)
    proc = run(TINY + ["--opt-level", "O1", "--iters", "1", "--no-evaluate", "--allow-slow-precision",
                       "--work-dir", str(tmp_path / "b")], env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not cpu_fp16(cpu_flags(), torch.backends.cpu.get_cpu_capability())[0]:
        proc = run(TINY + ["--opt-level", "O2", "--amp-dtype", "float16", "--iters", "1",
                           "--work-dir", str(tmp_path / "c")])
        assert proc.returncode != 0 and "computes in float16, but on this CPU" in proc.stderr
