"""Rank-0 training log: the periodic log line, a JSON-lines file, curve PNGs, optional TensorBoard.

Files in the work dir: train.log (the printed lines), log.jsonl (one JSON object per log line /
evaluation), curves.png (loss and mIoU against iteration, written at the end), and TensorBoard
events under tb/ when the tensorboard package is installed. Other ranks get a logger that
writes nothing.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Dict, List, Optional


class TrainLogger:
    def __init__(self, work_dir: str, enabled: bool, total_iters: int, global_batch: int,
                 flops_per_step: float = 0.0, peak_tflops: float = 0.0, tensorboard: bool = True):
        self.enabled = enabled
        self.work_dir = work_dir
        self.total_iters = total_iters
        self.global_batch = global_batch
        self.flops_per_step = flops_per_step  # per process
        self.peak_tflops = peak_tflops        # per process
        self.train_points: List[tuple] = []   # (iter, loss)
        self.eval_points: List[tuple] = []    # (iter, mIoU)
        self._window: List[Dict] = []
        self._tb = None
        if enabled:
            os.makedirs(work_dir, exist_ok=True)
            self._text = open(os.path.join(work_dir, "train.log"), "a")
            self._jsonl = open(os.path.join(work_dir, "log.jsonl"), "a")
            if tensorboard:
                self._tb = _tensorboard_writer(os.path.join(work_dir, "tb"))

    # ---- text ---------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        for line in msg.splitlines() or [""]:
            print(f"{stamp} {line}", flush=True)
            self._text.write(f"{stamp} {line}\n")
        self._text.flush()

    # ---- training ----------------------------------------------------------------------------
    def record_step(self, loss: float, parts: Dict[str, float], lr: float, step_ms: float, data_ms: float,
                    skipped: bool, graphs: Optional[int] = None) -> None:
        """graphs: with --compile, graphs compiled so far (a recompilation shows as a change)."""
        self._window.append(dict(loss=loss, parts=parts, lr=lr, step_ms=step_ms, data_ms=data_ms,
                                 skipped=skipped, graphs=graphs))

    def log_train(self, iteration: int, memory_bytes: int) -> Optional[Dict]:
        """Summarise the steps recorded since the last call; returns the JSON record."""
        window, self._window = self._window, []
        if not self.enabled or not window:
            return None
        n = len(window)
        good = [w for w in window if not w["skipped"]] or window
        loss = sum(w["loss"] for w in good) / len(good)
        parts = {k: sum(w["parts"].get(k, 0.0) for w in good) / len(good) for k in good[0]["parts"]}
        step_ms = sum(w["step_ms"] for w in window) / n
        data_ms = sum(w["data_ms"] for w in window) / n
        iter_s = (step_ms + data_ms) / 1000.0
        img_s = self.global_batch / iter_s if iter_s > 0 else 0.0
        mfu = (self.flops_per_step / iter_s / (self.peak_tflops * 1e12)
               if iter_s > 0 and self.peak_tflops > 0 else 0.0)
        eta_s = iter_s * (self.total_iters - iteration)
        rec = {"type": "train", "iter": iteration, "loss": loss, **parts, "lr": window[-1]["lr"],
               "step_ms": step_ms, "data_ms": data_ms, "img_per_s": img_s, "mfu": mfu,
               "mem_bytes": memory_bytes, "eta_s": eta_s, "skipped": sum(w["skipped"] for w in window)}
        if window[-1]["graphs"] is not None:
            rec["compiled_graphs"] = window[-1]["graphs"]
        part_txt = " ".join(f"{k.replace('loss_', '')} {v:.4f}" for k, v in parts.items())
        self.info(f"iter {iteration}/{self.total_iters}  loss {loss:.4f} ({part_txt})  lr {rec['lr']:.3e}  "
                  f"step {step_ms:.1f} ms  data {data_ms:.1f} ms  {img_s:.2f} img/s  MFU {100 * mfu:.1f}%  "
                  f"mem {memory_bytes / 2 ** 30:.2f} GiB  eta {_hms(eta_s)}"
                  + (f"  skipped {rec['skipped']}" if rec["skipped"] else ""))
        self._write(rec)
        self.train_points.append((iteration, loss))
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, iteration)
            for k, v in parts.items():
                self._tb.add_scalar(f"train/{k}", v, iteration)
            self._tb.add_scalar("train/lr", rec["lr"], iteration)
            self._tb.add_scalar("perf/img_per_s", img_s, iteration)
            self._tb.add_scalar("perf/mfu", mfu, iteration)
        return rec

    # ---- evaluation --------------------------------------------------------------------------
    def log_eval(self, iteration: int, metrics: Dict, table: str, seconds: float, graphs: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self.info(f"evaluation at iter {iteration} ({seconds:.1f} s):\n{table}")
        rec = {"type": "eval", "iter": iteration, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"],
               "aAcc": metrics["aAcc"], "seconds": seconds}
        if graphs is not None:
            rec["compiled_graphs"] = graphs
        self._write(rec)
        if metrics["mIoU"] is not None:
            self.eval_points.append((iteration, metrics["mIoU"]))
            if self._tb is not None:
                self._tb.add_scalar("val/mIoU", metrics["mIoU"], iteration)

    def finish(self) -> Optional[str]:
        """Write curves.png; returns its path."""
        if not self.enabled:
            return None
        path = None
        if self.train_points or self.eval_points:
            path = plot_curves(os.path.join(self.work_dir, "curves.png"), self.train_points, self.eval_points)
            self.info(f"curves: {path}")
        if self._tb is not None:
            self._tb.close()
        self._text.close()
        self._jsonl.close()
        self.enabled = False
        return path

    def _write(self, rec: Dict) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        rec["time"] = time.time()
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()


def _tensorboard_writer(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError:
        return None
    return SummaryWriter(path)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


# ---- curves.png ----------------------------------------------------------------------------------

def plot_curves(path: str, train_points: List[tuple], eval_points: List[tuple]) -> str:
    """Loss (left) and mIoU (right) against iteration. matplotlib when installed, else Pillow."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pillow(path, train_points, eval_points)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, points, title, color in ((axes[0], train_points, "train loss", "tab:blue"),
                                     (axes[1], eval_points, "val mIoU (%)", "tab:green")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=color, marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_with_pillow(path: str, train_points: List[tuple], eval_points: List[tuple]) -> str:
    from PIL import Image, ImageDraw
    panel_w, h, pad = 480, 360, 40
    img = Image.new("RGB", (2 * panel_w, h), "white")
    draw = ImageDraw.Draw(img)
    for i, (points, title, color) in enumerate(((train_points, "train loss", (31, 119, 180)),
                                                (eval_points, "val mIoU (%)", (44, 160, 44)))):
        x0, x1, y0, y1 = i * panel_w + pad, (i + 1) * panel_w - pad // 2, pad // 2 + 12, h - pad
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 4), title, fill=(0, 0, 0))
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo_x, hi_x = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        lo_y, hi_y = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        pix = [(x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (y - lo_y) / (hi_y - lo_y) * (y1 - y0))
               for x, y in points]
        if len(pix) > 1:
            draw.line(pix, fill=color, width=2)
        else:
            draw.ellipse([pix[0][0] - 2, pix[0][1] - 2, pix[0][0] + 2, pix[0][1] + 2], fill=color)
        draw.text((x0 + 2, y1 + 4), f"{lo_x}", fill=(0, 0, 0))
        draw.text((x1 - 40, y1 + 4), f"{hi_x}", fill=(0, 0, 0))
        draw.text((x0 + 4, y0 + 2), f"{hi_y:.3g}", fill=(0, 0, 0))
        draw.text((x0 + 4, y1 - 14), f"{lo_y:.3g}", fill=(0, 0, 0))
    img.save(path)
    return path
