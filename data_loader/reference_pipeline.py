"""The straightforward OpenCV version of mmseg's Cityscapes training pipeline (no kernels).

Decode with cv2.imread, resize the whole image (cv2.resize INTER_LINEAR / INTER_NEAREST), crop
with the cat_max_ratio retries on the resized label (np.unique), flip, PhotoMetricDistortion in
float32 / OpenCV HSV as mmseg does it, pad; optionally normalise to float CHW. It consumes the
random Generator in mmseg's order (restated here, independently of data_loader.transforms), so
for one seed both produce the same sample; tests use it as the specification and
bench/loader.py as the baseline to beat.
"""
from __future__ import annotations

import cv2
import numpy as np

from .transforms import TrainTransformConfig

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg PhotoMetricDistortion.convert: float32 multiply-add, clip, truncating cast.
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, params: dict) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 BGR with already drawn parameters."""
    if params["brightness_delta"] is not None:
        img = _convert(img, beta=params["brightness_delta"])
    if params["contrast_first"] and params["contrast_alpha"] is not None:
        img = _convert(img, alpha=params["contrast_alpha"])
    if params["saturation_alpha"] is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=params["saturation_alpha"])
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if params["hue_delta"] is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + params["hue_delta"]) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not params["contrast_first"] and params["contrast_alpha"] is not None:
        img = _convert(img, alpha=params["contrast_alpha"])
    return img


def _draw_photometric(rng: np.random.Generator, cfg: TrainTransformConfig) -> dict:
    # mmseg PhotoMetricDistortion.__call__ order: brightness, mode, [contrast], saturation, hue, [contrast]
    p = {"brightness_delta": None, "contrast_alpha": None, "saturation_alpha": None, "hue_delta": None}
    if rng.integers(2):
        p["brightness_delta"] = rng.uniform(-cfg.brightness_delta, cfg.brightness_delta)
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        p["contrast_alpha"] = rng.uniform(*cfg.contrast_range)
    if rng.integers(2):
        p["saturation_alpha"] = rng.uniform(*cfg.saturation_range)
    if rng.integers(2):
        p["hue_delta"] = int(rng.integers(-cfg.hue_delta, cfg.hue_delta))
    if mode == 0 and rng.integers(2):
        p["contrast_alpha"] = rng.uniform(*cfg.contrast_range)
    p["contrast_first"] = mode == 1
    return p


def reference_train_sample(img_bgr: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                           cfg: TrainTransformConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training sample, the plain way: uint8 BGR [ch,cw,3] and uint8 label [ch,cw]."""
    # Resize: mmseg random_sample_ratio, then mmcv.imrescale (rescale_size + _scale_size)
    lo, hi = cfg.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    target = int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio)
    h, w = label.shape
    factor = min(max(target) / max(h, w), min(target) / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    img = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)

    # RandomCrop with cat_max_ratio: up to `crop_tries` checks, a failed check redraws
    ch, cw = cfg.crop_size

    def crop_box():
        y0 = rng.integers(0, max(new_h - ch, 0) + 1)
        x0 = rng.integers(0, max(new_w - cw, 0) + 1)
        return y0, x0

    y0, x0 = crop_box()
    if cfg.cat_max_ratio < 1.0:
        for _ in range(cfg.crop_tries):
            values, counts = np.unique(seg[y0:y0 + ch, x0:x0 + cw], return_counts=True)
            counts = counts[values != cfg.ignore_index]
            if len(counts) > 1 and np.max(counts) / np.sum(counts) < cfg.cat_max_ratio:
                break
            y0, x0 = crop_box()
    img = img[y0:y0 + ch, x0:x0 + cw]
    seg = seg[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < cfg.flip_prob:
        img, seg = img[:, ::-1], seg[:, ::-1]
    img = np.ascontiguousarray(img)
    if cfg.photometric:
        img = photometric_distortion(img, _draw_photometric(rng, cfg))
    pad_h, pad_w = ch - img.shape[0], cw - img.shape[1]
    img = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(cfg.pad_value,) * 3)
    seg = cv2.copyMakeBorder(np.ascontiguousarray(seg), 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=cfg.seg_pad_value)
    return img, seg


def normalize_chw(img_bgr: np.ndarray) -> np.ndarray:
    """mmseg Normalize(to_rgb=True) then HWC -> CHW float32, as a plain DataLoader pipeline does."""
    rgb = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    rgb -= np.asarray(MEAN_RGB, np.float32)
    rgb /= np.asarray(STD_RGB, np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
