"""Inference on image files: a checkpoint becomes a BN-folded eval model, images of any size become
trainId maps (whole image or slide, batched, any opt level), and each prediction is written as
the trainId PNG, the Cityscapes labelId PNG (the test server's submission format), a colour
overlay and optionally a side-by-side picture.

The numerics are the evaluation's (core/engine.py): the image is resized keep-ratio to `scale`
with the same kernel as ValTransform, normalised by `to_model_input`, run through
`whole_inference` / `slide_inference`, and the logits are resized back to the image's own size
before the argmax. So predictions written here score exactly what `--eval-only` reports.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from core.amp import Amp, resolve_dtype
from core.blocks import fuse_for_inference
from core.engine import slide_inference, to_model_input, whole_inference
from core.mmseg_io import LoadedCheckpoint, build_from_checkpoint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MMSEG_SCALE = (2048, 1024)  # mmseg's Cityscapes test pipeline: Resize(scale=(2048, 1024), keep_ratio=True)


def trainid_to_labelid() -> np.ndarray:
    """uint8[256] table trainId -> Cityscapes labelId (255 and unknown -> 0 'unlabeled')."""
    from data_loader.cityscapes import IGNORE_INDEX, LABELS
    table = np.zeros(256, np.uint8)
    for label in LABELS:
        if 0 <= label.train_id < IGNORE_INDEX:
            table[label.train_id] = label.id
    return table


def collect_inputs(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """(image path, output name without extension) for files, folders (recursive) and globs.

    Names keep the path below a given folder, so `leftImg8bit/val` gives `frankfurt/<stem>`;
    two inputs that would write the same name are an error naming both.
    """
    items: List[Tuple[str, str]] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"input folder {spec!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            items += [(p, os.path.splitext(os.path.relpath(p, spec))[0]) for p in found]
        elif os.path.isfile(spec):
            items.append((spec, os.path.splitext(os.path.basename(spec))[0]))
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input pattern {spec!r} matches no files")
            items += [(p, os.path.splitext(os.path.basename(p))[0]) for p in found]
        else:
            raise FileNotFoundError(f"input {spec!r}: no such file or folder (expected image files, folders or globs)")
    owners: Dict[str, str] = {}
    for path, name in items:
        if name in owners and os.path.abspath(owners[name]) != os.path.abspath(path):
            raise ValueError(f"inputs {owners[name]!r} and {path!r} would both be written as {name}.png; "
                             f"give their common folder instead")
        owners[name] = path
    seen = set()
    return [(p, n) for p, n in items if not (n in seen or seen.add(n))]


def inference_defaults(ckpt: LoadedCheckpoint) -> Dict[str, Any]:
    """mode / scale (WxH or None) / tile / stride the checkpoint was evaluated with, when it says."""
    cfg = ckpt.config
    if ckpt.source == "deeplab-trainer":
        scale, tile, stride = cfg.get("eval_scale"), cfg.get("eval_tile") or cfg.get("crop"), cfg.get("eval_stride")
        return {"mode": cfg.get("eval_mode", "whole"), "scale": tuple(scale) if scale else None,
                "tile": tuple(tile) if tile else None, "stride": tuple(stride) if stride else None}
    test_cfg = (cfg.get("model") or {}).get("test_cfg") if isinstance(cfg.get("model"), Mapping) else None
    test_cfg = test_cfg if isinstance(test_cfg, Mapping) else {}
    return {"mode": test_cfg.get("mode", "whole"), "scale": _pipeline_scale(cfg.get("test_pipeline")) or MMSEG_SCALE,
            "tile": _pair(test_cfg.get("crop_size")), "stride": _pair(test_cfg.get("stride"))}


def convert_for_inference(model: torch.nn.Module, fuse: bool, winograd: bool, atrous: bool) -> int:
    """The inference conversions, in the order they need (in place); returns the number of Winograd
    convs. Folding builds new convs, so it comes first; Winograd (3x3 convs of 128+ channels, run
    where they pay off for the map and dtype at hand: core/winograd.py, core/winograd_bf16.py) before the padding-aware
    conversion, which then takes the dilated convs Winograd left."""
    if fuse:
        fuse_for_inference(model)  # fold every BN into its conv: fewer ops, same outputs
    count = 0
    if winograd:
        from core.winograd import convert_winograd
        count = convert_winograd(model)
    if atrous:  # dilated convs skip the padding-only taps
        from core.atrous import convert_atrous
        convert_atrous(model)
    return count


class Segmenter:
    """A checkpoint's model ready for inference: aux head dropped, BN folded, eval mode,
    channels_last, cast or autocast for the opt level."""

    def __init__(self, ckpt: LoadedCheckpoint, device: str = "cpu", opt_level: str = "O0", amp_dtype: str = "auto",
                 mode: str = "whole", scale: Optional[Tuple[int, int]] = MMSEG_SCALE,
                 tile: Optional[Tuple[int, int]] = None, stride: Optional[Tuple[int, int]] = None,
                 channels_last: bool = True, fuse: bool = True, atrous: bool = True, winograd: bool = True):
        from core.device import get_device
        from data_loader.transforms import ValTransform
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide" and not tile:
            raise ValueError("slide mode needs a tile size (--tile HxW)")
        self.ckpt = ckpt
        self.device = get_device("cuda" if device == "auto" and torch.cuda.is_available() else
                                 ("cpu" if device == "auto" else device))
        self.amp = Amp(opt_level, self.device.type, resolve_dtype(amp_dtype, self.device.autocast_dtype))
        self.mode, self.tile = mode, tuple(tile) if tile else None
        self.stride = tuple(stride) if stride else None
        if self.tile and not self.stride:  # the evaluation's default: 2/3 of the tile
            self.stride = (max(1, self.tile[0] * 2 // 3), max(1, self.tile[1] * 2 // 3))
        self.channels_last = channels_last
        self.resize = ValTransform(tuple(scale) if scale else None)
        self.num_classes = ckpt.settings["num_classes"]
        model = build_from_checkpoint(ckpt, aux_head=False)
        # Winograd on the CPU: F(4x4) in fp32, F(2x2) in bf16 (core/winograd.py, core/winograd_bf16.py)
        self.winograd_convs = convert_for_inference(model, fuse, winograd and self.device.type == "cpu", atrous)
        model.eval()
        model.to(self.device.torch_device,
                 memory_format=torch.channels_last if channels_last else torch.preserve_format)
        if self.amp.level.cast_model:  # O2/O3: weights in the low dtype (no BN left to keep in fp32)
            model.to(self.amp.low_dtype)
        self.model = model

    def model_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) the model sees for an image of this size."""
        return self.resize.image_size(height, width)

    @torch.no_grad()
    def predict(self, images_rgb: Sequence[np.ndarray]) -> List[np.ndarray]:
        """uint8 trainId maps [H, W] at each image's own size; images of one size share a forward."""
        out: List[Optional[np.ndarray]] = [None] * len(images_rgb)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, img in enumerate(images_rgb):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image {i}: expected uint8 [H, W, 3] RGB, got {img.dtype} {img.shape}")
            groups.setdefault(img.shape[:2], []).append(i)
        for (oh, ow), idx in groups.items():
            preds = self._forward(np.stack([self._bgr(images_rgb[i]) for i in idx]), (oh, ow))
            for i, p in zip(idx, preds):
                out[i] = p
        return out  # type: ignore[return-value]

    def _bgr(self, rgb: np.ndarray) -> np.ndarray:
        from kernels import ops
        h, w = self.model_size(*rgb.shape[:2])
        if (h, w) != rgb.shape[:2]:  # ValTransform's kernel: cv2 INTER_LINEAR semantics
            rgb = ops.resize_crop(np.ascontiguousarray(rgb), (h, w), (0, 0, h, w), interp="bilinear")
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def _forward(self, batch_bgr: np.ndarray, original_hw: Tuple[int, int]) -> List[np.ndarray]:
        _, h, w, _ = batch_bgr.shape
        x = to_model_input(torch.from_numpy(batch_bgr), self.device.torch_device, self.amp.input_dtype,
                           self.channels_last)
        with self.amp.autocast():
            if self.mode == "whole":
                logits = whole_inference(self.model, x, (h, w))[:, :, :h, :w]
            else:
                logits = slide_inference(self.model, x, self.num_classes, self.tile, self.stride)
        if logits.shape[-2:] != original_hw:
            logits = F.interpolate(logits.float(), size=original_hw, mode="bilinear", align_corners=False)
        pred = logits.argmax(dim=1).to(torch.uint8 if self.num_classes <= 255 else torch.int64).cpu().numpy()
        return list(pred)


# ---- what predict writes -------------------------------------------------------------------------

class PredictionWriter:
    """Writes per image: trainIds/<name>.png, labelIds/<name>.png (19 Cityscapes classes only),
    overlay/<name>.png and, with show, show/<name>.png (image | colour mask | overlay).

    Each kind has its own folder, so labelIds/ alone is the submission folder that
    cityscapesscripts' evaluation and the test server expect (one *.png per image).
    """

    def __init__(self, out_dir: str, palette: Sequence[Sequence[int]], num_classes: int,
                 show: bool = False, opacity: float = 0.5, label_ids: bool = True):
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be in [0, 1], got {opacity}")
        if len(palette) != num_classes:
            raise ValueError(f"{len(palette)} palette colours for {num_classes} classes")
        self.out_dir, self.show, self.opacity = out_dir, show, opacity
        self.colours = np.zeros((256, 3), np.uint8)  # trainId -> RGB; 255 (none) stays black
        self.colours[:num_classes] = np.asarray(palette, np.uint8)
        self.label_ids = trainid_to_labelid() if (label_ids and num_classes == 19) else None

    def kinds(self) -> List[str]:
        return ["trainIds"] + (["labelIds"] if self.label_ids is not None else []) + ["overlay"] + (
            ["show"] if self.show else [])

    def write(self, name: str, rgb: np.ndarray, pred: np.ndarray) -> None:
        self._png("trainIds", name, pred)
        if self.label_ids is not None:
            self._png("labelIds", name, self.label_ids[pred])
        colour = self.colours[pred]
        over = (rgb.astype(np.float32) * (1 - self.opacity) + colour.astype(np.float32) * self.opacity + 0.5
                ).astype(np.uint8)
        self._png("overlay", name, over[..., ::-1])  # cv2 writes BGR
        if self.show:
            self._png("show", name, np.concatenate([rgb, colour, over], axis=1)[..., ::-1])

    def _png(self, kind: str, name: str, array: np.ndarray) -> None:
        path = os.path.join(self.out_dir, kind, name + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not cv2.imwrite(path, np.ascontiguousarray(array)):
            raise OSError(f"cannot write {path}")


class ProgressMeter:
    """`predict 40/500 images  3.41 img/s  ETA 0:02:15`: redrawn on a terminal, else a line
    every `every` seconds and at the end (logs, CI)."""

    def __init__(self, total: int, stream=None, every: float = 5.0, desc: str = "predict"):
        self.total, self.done, self.desc, self.every = total, 0, desc, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty or now - self.last >= self.every or self.done >= self.total:
            self.last = now
            eta = (self.total - self.done) / self.rate if self.rate > 0 else 0.0
            line = (f"{self.desc} {self.done}/{self.total} images  {self.rate:.2f} img/s  "
                    f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
            self.stream.write(("\r" + line) if self.tty else (line + "\n"))
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def predict_files(segmenter: Segmenter, items: Sequence[Tuple[str, str]], writer: PredictionWriter,
                  batch_size: int = 1, progress: Optional[ProgressMeter] = None) -> Dict[str, Any]:
    """Predict and write every (path, name). Decoding the next batch and writing PNGs run in
    threads (OpenCV releases the GIL) while the model works. An unreadable image is reported and
    skipped; the others are still written. Returns counts, errors and images/s."""
    from data_loader.decode import read_image_rgb
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    errors: List[str] = []

    def read(batch):
        good = []
        for path, name in batch:
            try:
                good.append((name, read_image_rgb(path)))
            except (OSError, ValueError) as exc:  # DatasetError names the file and the problem
                errors.append(str(exc))
        return good

    start, written = time.perf_counter(), 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        ahead = pool.submit(read, batches[0]) if batches else None
        for k in range(len(batches)):
            loaded = ahead.result()
            ahead = pool.submit(read, batches[k + 1]) if k + 1 < len(batches) else None
            if loaded:
                preds = segmenter.predict([img for _, img in loaded])
                pending += [pool.submit(writer.write, name, img, p) for (name, img), p in zip(loaded, preds)]
                written += len(loaded)
            if progress is not None:
                progress.update(len(batches[k]))
        for fut in pending:
            fut.result()  # re-raise a failed write
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - start
    return {"images": written, "errors": errors, "seconds": seconds,
            "images_per_s": written / seconds if seconds > 0 else 0.0}


def _pair(value) -> Optional[Tuple[int, int]]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _pipeline_scale(pipeline) -> Optional[Tuple[int, int]]:
    """The (w, h) of the Resize in an mmseg test pipeline (1.x `scale`, 0.x `img_scale`)."""
    if not isinstance(pipeline, (list, tuple)):
        return None
    for step in pipeline:
        if not isinstance(step, Mapping):
            continue
        for key in ("scale", "img_scale"):
            if _pair(step.get(key)):
                return _pair(step.get(key))
        inner = _pipeline_scale(step.get("transforms"))
        if inner:
            return inner
    return None
