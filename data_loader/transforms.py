"""mmseg's Cityscapes training pipeline, crop-aware, on the kernels (kernels.ops).

    Resize(img_scale=(2048,1024), ratio_range=(0.5,2.0), keep_ratio) -> RandomCrop(512x1024,
    cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Pad(crop, 0 / 255)

Instead of resizing the whole frame and cropping it, ops.resize_crop computes only the crop
window of the resized frame (same pixels as cv2.resize + slicing). The random draws follow
mmseg's order (ratio; crop offsets, redrawn up to 10 times while cat_max_ratio rejects; flip;
photometric flags and values in PhotoMetricDistortion's order) and all come from one numpy
Generator per sample. Output stays uint8 BGR; normalisation happens on the device.

Note: mmseg pads *after* Normalize, so its padding is 0 in normalised space. We pad uint8 with
`pad_value` and report each sample's valid (h, w); with the default crop and scale range the
resized frame is never smaller than the crop, so no padding happens at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kernels import ops


@dataclass(frozen=True)
class TrainTransformConfig:
    crop_size: tuple = (512, 1024)  # (h, w)
    scale: tuple = (2048, 1024)  # mmseg img_scale (w, h): long and short edge targets
    ratio_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    crop_tries: int = 10
    flip_prob: float = 0.5
    photometric: bool = True
    brightness_delta: float = 32
    contrast_range: tuple = (0.5, 1.5)
    saturation_range: tuple = (0.5, 1.5)
    hue_delta: int = 18
    pad_value: int = 0
    seg_pad_value: int = 255
    ignore_index: int = 255

    def __post_init__(self):
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size={self.crop_size}: expected (h, w) > 0")
        if len(self.scale) != 2 or min(self.scale) < 1:
            raise ValueError(f"scale={self.scale}: expected (w, h) > 0")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range={self.ratio_range}: expected 0 < min <= max")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio={self.cat_max_ratio}: expected in (0, 1]")


def rescale_size(height: int, width: int, scale, ratio: float = 1.0) -> tuple[int, int]:
    """mmseg Resize(keep_ratio) size: target (int(w*ratio), int(h*ratio)), then mmcv.rescale_size."""
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    factor = min(max(target) / max(height, width), min(target) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def draw_ratio(rng: np.random.Generator, ratio_range) -> float:
    lo, hi = ratio_range
    return rng.random() * (hi - lo) + lo


def draw_crop_offset(rng: np.random.Generator, frame_hw, crop_hw) -> tuple[int, int]:
    margin_h = max(frame_hw[0] - crop_hw[0], 0)
    margin_w = max(frame_hw[1] - crop_hw[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def draw_photometric(rng: np.random.Generator, cfg: TrainTransformConfig) -> dict:
    """Keyword arguments for ops.photometric, drawn in PhotoMetricDistortion's order.

    mmseg: brightness; mode = randint(2); contrast if mode == 1 (i.e. second); saturation; hue;
    contrast if mode == 0 (last). Each transform is applied when its randint(2) flag is 1.
    """
    p = {"brightness_delta": None, "contrast_alpha": None, "saturation_alpha": None, "hue_delta": None}
    if rng.integers(2):
        p["brightness_delta"] = rng.uniform(-cfg.brightness_delta, cfg.brightness_delta)
    contrast_first = bool(rng.integers(2) == 1)

    def contrast():
        if rng.integers(2):
            p["contrast_alpha"] = rng.uniform(*cfg.contrast_range)

    if contrast_first:
        contrast()
    if rng.integers(2):
        p["saturation_alpha"] = rng.uniform(*cfg.saturation_range)
    if rng.integers(2):
        p["hue_delta"] = int(rng.integers(-cfg.hue_delta, cfg.hue_delta))
    if not contrast_first:
        contrast()
    p["contrast_first"] = contrast_first
    return p


def crop_is_balanced(hist: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's test on a crop's label counts (ignore bin already zero): >1 class and max/sum < ratio."""
    counts = hist[hist > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


@dataclass
class SamplePlan:
    ratio: float
    frame: tuple  # (h, w) of the resized frame
    crop: tuple  # (y0, x0, h, w) inside the frame
    flip: bool
    photometric: dict | None  # ops.photometric keyword arguments
    label: np.ndarray  # the label crop (not flipped yet), a scratch buffer of the transform
    source_height: int


def to_bgr(rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Swap RGB -> BGR into the contiguous array `out` (OpenCV writes into a matching dst)."""
    result = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=out)
    if result is not out and not np.shares_memory(result, out):
        out[...] = result
    return out


class TrainTransform:
    """Fills one batch entry (uint8 BGR image [H,W,3] and label [H,W]) from a decoded sample.

    Two steps so the image can be decoded after the crop is known: plan() makes every random
    draw from the label alone, render() reads only the image rows the crop needs. Keeps scratch
    buffers between calls, so one instance per worker process.
    """

    def __init__(self, cfg: TrainTransformConfig, num_threads: int | None = 1):
        self.cfg = cfg
        self.num_threads = num_threads
        ch, cw = cfg.crop_size
        self._rgb = np.empty((ch, cw, 3), np.uint8)
        self._bgr = np.empty((ch, cw, 3), np.uint8)
        self._label = np.empty((ch, cw), np.uint8)

    def plan(self, label: np.ndarray, rng: np.random.Generator) -> SamplePlan:
        """Every random draw of the sample, and its label crop; needs only the label."""
        cfg = self.cfg
        height, width = label.shape
        ratio = draw_ratio(rng, cfg.ratio_range)
        frame = rescale_size(height, width, cfg.scale, ratio)
        crop_h, crop_w = min(cfg.crop_size[0], frame[0]), min(cfg.crop_size[1], frame[1])
        lab = self._label[:crop_h] if crop_w == cfg.crop_size[1] else np.empty((crop_h, crop_w), np.uint8)

        y0, x0 = draw_crop_offset(rng, frame, (crop_h, crop_w))
        label_ready = False
        if cfg.cat_max_ratio < 1.0:
            for _ in range(cfg.crop_tries):
                ops.resize_crop(label, frame, (y0, x0, crop_h, crop_w), interp="nearest", out=lab,
                                num_threads=self.num_threads)
                hist = ops.label_histogram(lab, ignore_index=cfg.ignore_index)
                if crop_is_balanced(hist, cfg.cat_max_ratio):
                    label_ready = True
                    break
                y0, x0 = draw_crop_offset(rng, frame, (crop_h, crop_w))  # mmseg keeps the last draw
        crop = (y0, x0, crop_h, crop_w)
        if not label_ready:
            ops.resize_crop(label, frame, crop, interp="nearest", out=lab, num_threads=self.num_threads)
        flip = bool(rng.random() < cfg.flip_prob)
        photometric = draw_photometric(rng, cfg) if cfg.photometric else None
        return SamplePlan(ratio, frame, crop, flip, photometric, lab, height)

    @staticmethod
    def rows_needed(plan: SamplePlan) -> int:
        """How many top rows of the source image the bilinear crop reads (OpenCV half-pixel
        mapping src = (y + 0.5) * H / frame_h - 0.5 and its next row, plus a safety row)."""
        last = plan.crop[0] + plan.crop[2] - 1
        src = (last + 0.5) * plan.source_height / plan.frame[0] - 0.5
        return min(plan.source_height, int(np.floor(src)) + 3)

    def render(self, image_rgb: np.ndarray, plan: SamplePlan, out_image: np.ndarray, out_label: np.ndarray) -> dict:
        """Resize-crop-flip-distort the image (only rows_needed(plan) top rows are read) and write both."""
        cfg = self.cfg
        crop_h, crop_w = plan.crop[2:]
        full = (crop_h, crop_w) == tuple(out_label.shape)
        rgb = self._rgb[:crop_h] if full else np.empty((crop_h, crop_w, 3), np.uint8)
        ops.resize_crop(image_rgb, plan.frame, plan.crop, flip=plan.flip, interp="bilinear", out=rgb,
                        num_threads=self.num_threads)
        bgr = self._bgr[:crop_h] if full else np.empty((crop_h, crop_w, 3), np.uint8)
        to_bgr(rgb, bgr)
        if full:
            image_dst, label_dst = out_image, out_label
        else:
            out_image[...] = cfg.pad_value
            out_label[...] = cfg.seg_pad_value
            image_dst = np.empty((crop_h, crop_w, 3), np.uint8)
            label_dst = out_label[:crop_h, :crop_w]
        if plan.photometric is not None:
            ops.photometric(bgr, **plan.photometric, out=image_dst, num_threads=self.num_threads)
        else:
            image_dst[...] = bgr
        label_dst[...] = plan.label[:, ::-1] if plan.flip else plan.label
        if not full:
            out_image[:crop_h, :crop_w] = image_dst
        return {"valid_hw": (crop_h, crop_w), "ratio": plan.ratio, "crop": plan.crop, "flip": plan.flip,
                "photometric": plan.photometric}

    def __call__(self, image_rgb: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 out_image: np.ndarray, out_label: np.ndarray) -> dict:
        """image_rgb uint8 [h,w,3] RGB, label uint8 [h,w]; writes out_image [H,W,3] BGR, out_label [H,W]."""
        return self.render(image_rgb, self.plan(label, rng), out_image, out_label)


class ValTransform:
    """Evaluation: image resized keep-ratio to `scale` (if given) and label at original size, padded."""

    def __init__(self, scale=None, num_threads: int | None = 1, pad_value: int = 0, seg_pad_value: int = 255):
        self.scale = scale
        self.num_threads = num_threads
        self.pad_value = pad_value
        self.seg_pad_value = seg_pad_value

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width) if self.scale is None else rescale_size(height, width, self.scale)

    def __call__(self, image_rgb: np.ndarray, label: np.ndarray, out_image: np.ndarray, out_label: np.ndarray) -> dict:
        height, width = label.shape
        h, w = self.image_size(height, width)
        if (h, w) == (height, width):
            rgb = image_rgb
        else:
            rgb = ops.resize_crop(image_rgb, (h, w), (0, 0, h, w), interp="bilinear", num_threads=self.num_threads)
        if (h, w) == out_image.shape[:2]:
            to_bgr(rgb, out_image)
        else:
            out_image[...] = self.pad_value
            out_image[:h, :w] = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if (height, width) != out_label.shape:
            out_label[...] = self.seg_pad_value
        out_label[:height, :width] = label
        return {"valid_hw": (h, w), "ori_hw": (height, width)}
