"""profiling/: module hooks leave numerics alone; trace.py writes its tables, trace and plots."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from core import build_model
from profiling.hooks import ModuleTimer, StepTimes, modules_at_depth
from profiling.report import bar_chart_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_module_timer_does_not_change_outputs_and_counts_calls():
    torch.manual_seed(0)
    model = build_model("r18", 8, 5, base_channels=8).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)["out"]
        timer = ModuleTimer(model, depth=2)
        got = model(x)["out"]
        model(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    rows = {r["module"]: r for r in timer.table(steps=2)}
    assert "backbone.layer4" in rows and "decode_head.aspp_modules.3" in rows
    assert rows["backbone.layer4"]["calls_per_step"] == 1
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    frozen = dict(timer.totals_ms)
    timer.remove()
    with torch.no_grad():
        model(x)
    assert dict(timer.totals_ms) == frozen  # no hook fires after remove()


def test_modules_at_depth_expands_module_lists():
    names = set(modules_at_depth(build_model("r18", base_channels=8), 2))
    assert {"backbone.stem", "backbone.layer1", "decode_head.image_pool", "decode_head.aspp_modules.0"} <= names
    assert "decode_head.aspp_modules" not in names and "backbone" not in names


def test_step_times_summary():
    t = StepTimes()
    for w, c in [(1.0, 9.0), (3.0, 7.0)]:
        t.add(w, c)
    s = t.summary()
    assert s["steps"] == 2 and s["data_wait_ms"]["mean"] == 2.0 and s["compute_ms"]["max"] == 9.0
    assert s["data_wait_share"] == pytest.approx(0.2)


def test_bar_chart_png(tmp_path):
    path = tmp_path / "c.png"
    bar_chart_png(str(path), ["a", "b"], [2.0, 1.0], "title")
    img = Image.open(path)
    assert img.size[0] == 900 and img.size[1] > 40
    with pytest.raises(ValueError, match="labels"):
        bar_chart_png(str(path), ["a"], [1.0, 2.0], "t")


def test_trace_cli_end_to_end(tmp_path):
    out = tmp_path / "trace"
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPLAB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "profiling", "trace.py"), "--steps", "2",
                           "--warmup", "1", "--crop", "64x64", "--batch-size", "2", "--workers", "0",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ["ops.json", "ops.md", "modules.json", "steps.json", "trace.json", "ops.png", "modules.png"]:
        assert (out / name).is_file(), name
    ops = json.loads((out / "ops.json").read_text())
    assert any("conv" in r["op"] for r in ops)
    steps = json.loads((out / "steps.json").read_text())
    assert len(steps["compute_ms"]) == 2 and steps["summary"]["compute_ms"]["mean"] > 0
    trace = json.loads((out / "trace.json").read_text())
    assert any(ev.get("name") == "step_1" for ev in trace["traceEvents"])
    assert "images/s" in proc.stdout


def test_trace_rejects_bad_crop(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "profiling", "trace.py"), "--crop", "64by64",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--crop must look like HxW" in proc.stderr


def test_tune_sweeps_and_ranks(tmp_path):
    out = tmp_path / "tune"
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPLAB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tune.py"), "--crop", "64x64",
                           "--steps", "1", "--warmup", "0", "--workers", "0", "--threads", "1",
                           "--opt-levels", "O0,O1", "--channels-last", "on", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "tune.json").read_text())
    assert [r["opt_level"] for r in result["runs"]] == ["O0", "O1"]
    assert result["runs"][0]["vs_baseline"] == 1.0
    assert result["best"]["images_per_s"] == max(r["images_per_s"] for r in result["runs"])
    assert (out / "tune.png").is_file() and "best:" in proc.stdout


def test_tune_rejects_bad_values():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tune.py"), "--opt-levels", "O7"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--opt-levels takes O0..O3" in proc.stderr
