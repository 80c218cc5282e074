"""Confusion matrix accumulation, cross-rank reduction, and mmseg's IoU metrics.

Definitions follow mmseg's IoUMetric: per class IoU = TP / (GT + Pred - TP) and Acc = TP / GT,
NaN when the denominator is 0 (a class absent from both ground truth and predictions), mIoU
and mAcc are NaN-means over classes, aAcc = sum TP / sum GT. Reported in percent.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from core.distributed import all_reduce_sum_, is_distributed


class ConfusionMatrix:
    """Running [K, K] int64 matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, label) -> None:
        """pred, label: integer arrays/CPU tensors of the same shape (e.g. [H, W])."""
        from kernels import ops  # the C++ kernel (or its reference); imported late: tests of the
        # pure metric maths do not need the extension.
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().cpu().numpy()
        if isinstance(label, torch.Tensor):
            label = label.detach().cpu().numpy()
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        self.matrix += ops.confusion_matrix(np.ascontiguousarray(pred), np.ascontiguousarray(label),
                                            self.num_classes, ignore_index=self.ignore_index)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum the matrices of every rank (no-op without a process group). `device`: where the
        group's backend reduces (core.distributed.collective_device)."""
        if not is_distributed():
            return
        t = torch.from_numpy(self.matrix).to(device or torch.device("cpu"))
        all_reduce_sum_(t)
        self.matrix = t.cpu().numpy()


def compute_metrics(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict:
    """mmseg IoU metrics from a confusion matrix, as a JSON-friendly dict (percent, NaN -> None)."""
    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix must be square, got {m.shape}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        acc = tp / gt
        aacc = tp.sum() / gt.sum() if gt.sum() > 0 else float("nan")
    per_class = [{"class": n, "IoU": _pct(i), "Acc": _pct(a)} for n, i, a in zip(names, iou, acc)]
    return {
        "aAcc": _pct(aacc),
        "mIoU": _pct(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "mAcc": _pct(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "per_class": per_class,
        "pixels": int(gt.sum()),
    }


def format_table(metrics: Dict) -> str:
    """Per-class table plus the summary line, like mmseg's log."""
    rows: List[str] = []
    width = max([len("Class")] + [len(r["class"]) for r in metrics["per_class"]])
    rows.append(f"+{'-' * (width + 2)}+--------+--------+")
    rows.append(f"| {'Class':<{width}} |  IoU   |  Acc   |")
    rows.append(rows[0])
    for r in metrics["per_class"]:
        rows.append(f"| {r['class']:<{width}} | {_cell(r['IoU'])} | {_cell(r['Acc'])} |")
    rows.append(rows[0])
    rows.append(f"aAcc: {_cell(metrics['aAcc']).strip()}  mIoU: {_cell(metrics['mIoU']).strip()}  "
                f"mAcc: {_cell(metrics['mAcc']).strip()}  ({metrics['pixels']} labelled pixels)")
    return "\n".join(rows)


def save_json(metrics: Dict, path: str, **extra) -> None:
    with open(path, "w") as fh:
        json.dump({**extra, **metrics}, fh, indent=2)


def _pct(x: float) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else round(100.0 * x, 4)


def _cell(x: Optional[float]) -> str:
    return f"{'nan':>6}" if x is None else f"{x:6.2f}"
