"""Loss normalisation (mmseg's vs torch's) and the IoU metrics, against hand computations."""
import json
import math

import numpy as np
import pytest
import torch

from core.losses import pixel_ce, seg_loss
from core.metrics import ConfusionMatrix, compute_metrics, format_table, save_json


def _hand_ce(logits, label, ignore=255):
    """Per-pixel -log softmax(logits)[label], written out with python floats."""
    b, k, h, w = logits.shape
    losses, valid = [], 0
    for n in range(b):
        for y in range(h):
            for x in range(w):
                t = int(label[n, y, x])
                if t == ignore:
                    losses.append(0.0)
                    continue
                z = [float(logits[n, c, y, x]) for c in range(k)]
                m = max(z)
                lse = m + math.log(sum(math.exp(v - m) for v in z))
                losses.append(lse - z[t])
                valid += 1
    return sum(losses), len(losses), valid


@pytest.fixture
def small_problem():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    label = torch.randint(0, 4, (2, 3, 5), generator=g).to(torch.uint8)
    label[0, 0, :3] = 255
    label[1, 2, 4] = 255
    return logits, label


def test_mmseg_normalisation_divides_by_all_pixels(small_problem):
    logits, label = small_problem
    total, pixels, valid = _hand_ce(logits, label)
    assert valid < pixels
    got = pixel_ce(logits, label, avg_non_ignore=False)
    assert got.item() == pytest.approx(total / pixels, rel=1e-6)


def test_avg_non_ignore_divides_by_valid_pixels_like_torch(small_problem):
    logits, label = small_problem
    total, pixels, valid = _hand_ce(logits, label)
    got = pixel_ce(logits, label, avg_non_ignore=True)
    assert got.item() == pytest.approx(total / valid, rel=1e-6)
    ref = torch.nn.functional.cross_entropy(logits, label.long(), ignore_index=255)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_loss_is_fp32_and_upsamples_to_label_size():
    logits = torch.randn(1, 3, 4, 4).to(torch.bfloat16)
    label = torch.randint(0, 3, (1, 8, 8), dtype=torch.uint8)
    loss = pixel_ce(logits, label)
    assert loss.dtype == torch.float32
    up = torch.nn.functional.interpolate(logits.float(), size=(8, 8), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(pixel_ce(up, label).item(), rel=1e-6)


def test_aux_head_weighted_by_0_4(small_problem):
    logits, label = small_problem
    aux = logits.flip(1)
    total, parts = seg_loss({"out": logits, "aux": aux}, label, aux_weight=0.4)
    assert total.item() == pytest.approx(parts["loss_decode"].item() + 0.4 * parts["loss_aux"].item(), rel=1e-6)
    only, parts = seg_loss({"out": logits}, label)
    assert set(parts) == {"loss_decode"} and only.item() == pytest.approx(parts["loss_decode"].item())


def test_all_ignored_batch_gives_zero_not_nan():
    label = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    assert pixel_ce(torch.randn(1, 3, 2, 2), label, avg_non_ignore=True).item() == 0.0


def test_metrics_from_a_known_confusion_matrix():
    # rows = ground truth, columns = prediction; class 2 never occurs nor is predicted.
    m = np.array([[5, 1, 0],
                  [2, 2, 0],
                  [0, 0, 0]])
    r = compute_metrics(m, ["a", "b", "c"])
    iou_a, iou_b = 5 / (6 + 7 - 5), 2 / (4 + 3 - 2)
    assert r["per_class"][0]["IoU"] == pytest.approx(100 * iou_a, abs=1e-3)
    assert r["per_class"][1]["IoU"] == pytest.approx(100 * iou_b, abs=1e-3)
    assert r["per_class"][2]["IoU"] is None  # NaN: excluded from the mean, as mmseg's nanmean
    assert r["mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 2, abs=1e-3)
    assert r["mAcc"] == pytest.approx(100 * (5 / 6 + 2 / 4) / 2, abs=1e-3)
    assert r["aAcc"] == pytest.approx(100 * 7 / 10, abs=1e-3)
    table = format_table(r)
    assert "| a " in table and "nan" in table and "mIoU: 51.25" in table


def test_confusion_matrix_accumulates_with_the_kernel_and_skips_ignore(tmp_path):
    pred = np.array([[0, 1], [1, 1]], np.uint8)
    label = np.array([[0, 1], [0, 255]], np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    cm.update(pred, label)
    assert cm.matrix.tolist() == [[2, 2], [0, 2]]
    cm.all_reduce()  # no process group: unchanged
    assert cm.matrix.sum() == 6
    with pytest.raises(ValueError, match="shape"):
        cm.update(pred[:1], label)
    out = tmp_path / "m.json"
    save_json(compute_metrics(cm.matrix), str(out), iter=3)
    assert json.loads(out.read_text())["iter"] == 3
