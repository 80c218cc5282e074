"""launch/tune.py: trials are real launch/run.py runs of a tiny model; the table, JSON, chart and
best.yaml agree with the trials' own log.jsonl; a failing trial is reported and the sweep goes on;
the budget stops the sweep; best.yaml is accepted by run.py --config; bf16 levels are offered
only where the CPU has bf16 kernels."""
import json
import os
import re
import statistics

import pytest
import torch
import yaml
from PIL import Image

from core.config import field_names, parse_config
from core.cpu import cpu_bf16
from launch import tune, tune_report, tune_trial
from launch.tune_space import default_values
from scripts import clean_env, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Global batch 3 runs on one rank and cannot be split over two: run.py rejects the 2x1 trial.
TINY = ["--base-channels", "8", "--crop", "64x64", "--global-batch", "3", "--workers", "1", "--threads", "1",
        "--peak-tflops", "1"]
SHORT = ["--warmup", "1", "--steps", "3"]
CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Base, a 2-rank trial run.py rejects, and the pack trial (the pack built in OUT/pack)."""
    out = tmp_path_factory.mktemp("tune")
    proc = run_script(["launch/tune.py", *TINY + SHORT + ["--sweep", "procs-threads,pack,norm", "--try-procs-threads",
                                                        "2x1", "--try-norm", "bn", "--out", str(out)]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, json.loads((out / "tune.json").read_text())


def table_rows(md_text):
    lines = [ln for ln in md_text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_reports_agree_with_the_trials_logs(swept):
    out, proc, result = swept
    trials = result["trials"]
    assert [t["setting"] for t in trials] == ["base", "2x1 bs3/2", "pack"]
    for t in (t for t in trials if t["status"] == "ok"):
        with open(os.path.join(t["work_dir"], "log.jsonl")) as fh:
            steps = [r for r in map(json.loads, fh) if r["type"] == "train" and r["iter"] > 1]
        assert t["measured_iters"] == len(steps) == 3
        assert t["images_per_s"] == pytest.approx(statistics.median(r["img_per_s"] for r in steps))
        assert t["step_ms"] == pytest.approx(statistics.median(r["step_ms"] + r["data_ms"] for r in steps))
        share = sum(r["data_ms"] for r in steps) / sum(r["step_ms"] + r["data_ms"] for r in steps)
        assert t["data_share"] == pytest.approx(share)
        assert t["peak_rss_bytes"] >= max(r["mem_bytes"] for r in steps) * 0.9  # RSS peak vs RSS at log time
    md = (out / "tune.md").read_text()
    assert md.strip() in proc.stdout  # the printed table is the file
    rows = table_rows(md)
    ok = sorted((t for t in trials if t["status"] == "ok"), key=lambda t: -t["images_per_s"])
    assert [r["trial"] for r in rows] == [str(t["trial"]) for t in ok] + ["2"]  # ranked, then the failure
    base = trials[0]["images_per_s"]
    for row, t in zip(rows, ok):
        assert row["images/s"] == tune_report.rate(t["images_per_s"])
        assert row["vs base"] == f"{t['images_per_s'] / base:.2f}x"
        assert row["data-wait"] == f"{100 * t['data_share']:.1f}%"
    best = ok[0]
    assert result["best_trial"] == best["trial"]
    with open(os.path.join(best["work_dir"], "config.yaml")) as fh:
        resolved = yaml.safe_load(fh)
    written = yaml.safe_load((out / "best.yaml").read_text())
    assert set(written) == {"nproc", "threads", "pack", "norm"}  # the swept fields only
    assert written == {k: resolved[k] for k in written}
    with Image.open(out / "tune.png") as img:
        assert img.format == "PNG" and img.height > 40


def test_a_failing_trial_is_reported_and_the_sweep_goes_on(swept):
    out, proc, result = swept
    failed = result["trials"][1]
    assert failed["status"] == "failed"
    assert "--global-batch 3 does not split over 2 ranks" in failed["reason"]
    assert result["trials"][2]["status"] == "ok"  # the trial after it ran
    assert "FAILED: exit code" in proc.stdout and "does not split" in (out / "tune.md").read_text()


def test_the_pack_is_built_once_and_used(swept):
    out, _, result = swept
    pack_trial = result["trials"][2]
    assert os.path.isfile(out / "pack" / "train" / "index.json") and os.path.isfile(out / "pack" / "val" / "index.json")
    assert f"--pack {out / 'pack'}" in pack_trial["command"]
    assert "--pack" not in result["trials"][0]["command"]


def test_best_yaml_is_accepted_by_run_py(swept, tmp_path):
    out, _, result = swept
    written = yaml.safe_load((out / "best.yaml").read_text())
    proc = run_script(["launch/run.py", "--config", str(out / "best.yaml"), *result["run_flags"].split(),
                                        "--iters", "1", "--eval-max-images", "2", "--no-checkpoints",
                                        "--no-tensorboard", "--work-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {k: resolved[k] for k in written} == written
    assert any(name.startswith("eval_iter_1") for name in os.listdir(tmp_path))  # val read (from the pack, if best)


def test_the_budget_stops_the_sweep_early(tmp_path):
    out = tmp_path / "tune"
    proc = run_script(["launch/tune.py", *TINY + SHORT + ["--sweep", "workers,prefetch", "--try-workers", "0,2",
                                                        "--try-prefetch", "2,3", "--budget-min", "0.01",
                                                        "--out", str(out)]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "tune.json").read_text())
    assert len(result["trials"]) == 1  # the base runs; the next would end past 0.6 s
    assert result["not_tried"] == ["workers w0", "workers w2", "prefetch pf3"]
    assert "not tried (the budget ran out): workers w0; workers w2; prefetch pf3" in (out / "tune.md").read_text()
    assert (out / "best.yaml").is_file()


def test_the_grid_has_one_trial_per_distinct_setting():
    # threads 0 means cores / ranks, so 1x0 is the same trial as 1x<cores>.
    given, base, opts = tune.parse(TINY + ["--grid", "--sweep", "procs-threads,workers", "--try-procs-threads",
                                           f"1x{CORES},1x0,2x1", "--try-workers", "1,1,2"])
    plan = tune.Tuner(given, base, opts).grid_plan()
    assert [(c["nproc"], c["workers"]) for c in plan] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_trial_flags_resolve_to_the_base_plus_the_overrides():
    given, base, _ = tune.parse(TINY + ["--no-channels-last", "--ratio-range", "0.75x1.5", "--lr", "0.003",
                                        "--iters", "99", "--out", "x"])
    argv = tune_trial.trial_argv(given, {"workers": 2, "pack": None, "opt_level": "O1"}, 7, "/tmp/w")
    cfg = parse_config(argv)
    changed = {k for k in field_names() if getattr(cfg, k) != getattr(base, k)}
    assert changed == {"workers", "opt_level", "iters", "evaluate", "checkpoints", "log_interval", "tensorboard",
                       "work_dir"}
    assert (cfg.iters, cfg.work_dir, cfg.ratio_range, cfg.lr) == (7, "/tmp/w", (0.75, 1.5), 0.003)


@pytest.mark.parametrize("argv,message", [
    (["--try-procs-threads", "2y1"], "--try-procs-threads: '2y1' is not RANKSxTHREADS"),
    (["--try-precision", "O5"], "--try-precision: 'O5' is not an opt level"),
    (["--sweep", "procs-threads,speed"], "--sweep: ['speed']"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--eval-only"], "--eval-only: tune.py measures training steps"),
])
def test_bad_options_are_errors_naming_the_flag(argv, message, capsys, tmp_path):
    assert tune.main(argv + ["--out", str(tmp_path / "t")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # nothing ran


@pytest.mark.parametrize("returncode,stderr,status,reason", [
    # what torch's CPU allocator, CUDA and Python say when an allocation fails
    (1, "[rank0]: RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 "
        "bytes. Error code 12 (Cannot allocate memory)", "oom", "out of memory: RuntimeError: DefaultCPUAllocator"),
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom", "out of memory: "),
    (1, "Traceback (most recent call last):\nMemoryError", "oom", "out of memory: MemoryError"),
    # the OOM killer's SIGKILL: of run.py itself, or of a rank (launch/dist.py's summary line)
    (-9, "", "oom", "out of memory: killed by SIGKILL"),
    (1, "[launcher] rank 1 (pid 7) failed with exit code -9: Signal 9 (SIGKILL) received by PID 7\n"
        "[launcher] job failed (exit code -9)", "oom", "out of memory: killed by SIGKILL"),
    # otherwise the last error message, not a traceback's source line or the launcher's summary
    (1, "  raise ValueError(f'--x')\n[rank0]:[rank 0] failed: ValueError: --global-batch 3 does not split\n"
        "[launcher] job failed (exit code 1)", "failed", "exit code 1: ValueError: --global-batch 3 does not split"),
    (2, "usage: run.py [-h]\nrun.py: error: argument --workers: invalid int value: 'x'", "failed",
     "exit code 2: run.py: error: argument --workers"),
    (1, "[rank1]:terminate called without an active exception\n[rank1]:Fatal Python error: Aborted\n"
        "[launcher] rank 1 (pid 9) failed with exit code -6: Signal 6 (SIGABRT) received by PID 9", "failed",
     "exit code 1: crashed: terminate called without an active exception; rank 1 (pid 9) failed"),
])
def test_failure_reasons(returncode, stderr, status, reason):
    got_status, got_reason = tune_trial.failure_reason(returncode, stderr)
    assert got_status == status and got_reason.startswith(reason), got_reason


def test_bf16_gating_follows_the_cpu_flags():
    assert cpu_bf16({"avx2", "fma"}, "AVX2")[0] is False  # e.g. Zen 3: emulated bf16
    assert cpu_bf16({"avx512f", "avx512_bf16"}, "AVX512")[0] is True  # e.g. Zen 4
    assert cpu_bf16({"avx512f", "amx_bf16"}, "AVX512")[0] is True  # e.g. Sapphire Rapids
    ok, why = cpu_bf16({"avx512f", "avx512_bf16"}, "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not ok and "AVX2" in why
    assert cpu_bf16({"fp", "asimd", "bf16"}, "DEFAULT")[0] is True  # arm64 with bf16
    assert cpu_bf16({"fp", "asimd"}, "DEFAULT")[0] is False


def test_bf16_gating_on_this_machine():
    with open("/proc/cpuinfo") as fh:
        flags = set(next(ln for ln in fh if ln.startswith(("flags", "Features"))).split(":", 1)[1].split())
    capability = torch.backends.cpu.get_cpu_capability()
    expected = (bool(flags & {"avx512_bf16", "amx_bf16"}) and capability.startswith("AVX512")) or \
        {"asimd", "bf16"} <= flags
    _, base, _ = tune.parse(TINY)
    values, note = default_values("precision", base, "cpu", CORES)
    levels = [v["opt_level"] + "-" + v.get("amp_dtype", "") for v in values]
    if expected:
        assert levels == ["O0-", "O1-bfloat16", "O2-bfloat16"] and note == ""
    else:
        assert levels == ["O0-"] and re.search("bf16 opt levels left out: .+", note)


def test_a_slow_precision_asked_for_by_name_runs_as_insisted(tmp_path):
    # ATEN_CPU_CAPABILITY=avx2: no fast bf16 on any x86 CPU. run.py refuses O1 there unless insisted
    # on; a level the user names in --try-precision is insisted on, with a note saying it is slow.
    out = tmp_path / "tune"
    proc = run_script(["launch/tune.py", *TINY + ["--warmup", "1", "--steps", "1", "--sweep", "precision",
                                                  "--try-precision", "O0,O1", "--out", str(out)]],
                      env=clean_env({"ATEN_CPU_CAPABILITY": "avx2"}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "tune.json").read_text())
    assert [t["status"] for t in result["trials"]] == ["ok", "ok"], result["trials"]
    assert "--allow-slow-precision" in result["trials"][1]["command"]
    assert "precision: O1-bfloat16 runs as asked (--allow-slow-precision), but expect it 10-30x slower" in \
        (out / "tune.md").read_text()
