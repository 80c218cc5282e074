"""The rank-0 log: line fields, JSON lines, MFU arithmetic, and curves.png with both plot backends."""
import json

import numpy as np
import pytest
from PIL import Image

from core.logger import TrainLogger, _plot_with_pillow, plot_curves


def test_log_line_and_json_record(tmp_path, capsys):
    log = TrainLogger(str(tmp_path), enabled=True, total_iters=100, global_batch=8,
                      flops_per_step=2e12, peak_tflops=10.0, tensorboard=False)
    log.record_step(2.0, {"loss_decode": 1.5, "loss_aux": 1.25}, 0.01, step_ms=900.0, data_ms=100.0, skipped=False)
    log.record_step(float("nan"), {"loss_decode": float("nan"), "loss_aux": float("nan")}, 0.009,
                    step_ms=900.0, data_ms=100.0, skipped=True)
    rec = log.log_train(10, memory_bytes=3 * 2 ** 30)
    assert rec["loss"] == 2.0  # the skipped step's NaN does not poison the window mean
    assert rec["img_per_s"] == pytest.approx(8.0)  # 8 images per 1.0 s iteration
    assert rec["mfu"] == pytest.approx(2e12 / 1.0 / 10e12)
    assert rec["eta_s"] == pytest.approx(90.0) and rec["skipped"] == 1
    line = capsys.readouterr().out
    for text in ("iter 10/100", "loss 2.0000", "decode 1.5000", "aux 1.2500", "lr 9.000e-03", "step 900.0 ms",
                 "data 100.0 ms", "8.00 img/s", "MFU 20.0%", "mem 3.00 GiB", "eta 0:01:30", "skipped 1"):
        assert text in line, text
    log.log_eval(10, {"mIoU": 40.0, "mAcc": 50.0, "aAcc": 90.0}, "table", 1.0)
    path = log.finish()
    records = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["type"] for r in records] == ["train", "eval"] and records[1]["mIoU"] == 40.0
    assert "iter 10/100" in (tmp_path / "train.log").read_text()
    assert Image.open(path).size[0] > 100


def test_other_ranks_write_nothing(tmp_path):
    log = TrainLogger(str(tmp_path / "w"), enabled=False, total_iters=1, global_batch=1)
    log.record_step(1.0, {}, 0.1, 1.0, 1.0, False)
    assert log.log_train(1, 0) is None and log.finish() is None
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("plot", [plot_curves, _plot_with_pillow])
def test_curves_png_has_both_panels(tmp_path, plot):
    path = plot(str(tmp_path / "c.png"), [(i, 3.0 / i) for i in range(1, 50)], [(25, 20.0), (50, 35.0)])
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w, _ = img.shape
    # each half of the figure has a drawn curve: pixels far from white and from grey/black
    for half in (img[:, : w // 2], img[:, w // 2:]):
        colourful = (half.max(axis=2) - half.min(axis=2)) > 60
        assert colourful.sum() > 20
