"""Pure numpy/torch reference for every op in kernels.ops (same signatures, same results).

These are the specifications the C++ kernels are tested against, written for clarity rather
than speed. Where an op promises to match a library (OpenCV resize and HSV conversion, Pillow
polygons) the reference either calls that library or restates its arithmetic, and the tests
check the reference against the library itself.

Input validation lives here too (kernels/csrc validates the same things in C++ with messages
that name the same arguments), so both paths reject bad input the same way.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

# OpenCV's fixed-point resize: interpolation weights are scaled by 2**11 (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048


# ---------------------------------------------------------------------------------------------
# validation helpers (shared with kernels.ops for the arguments it unpacks before calling C++)

def check_array(x, name: str, dtypes: tuple, ndims: tuple, *, writeable: bool = False) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = "/".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if writeable and not x.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return x


def int_tuple(value, name: str, length: int, fields: str) -> tuple:
    """`value` as a tuple of `length` Python ints, else TypeError naming `name` and its fields."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple {fields}, got {type(value).__name__}") from None
    if len(items) != length or not all(is_int(v) for v in items):
        raise TypeError(f"{name} must be a tuple {fields} of {length} ints, got {value!r}")
    return tuple(int(v) for v in items)


def check_num_threads(num_threads) -> int:
    if num_threads is None:
        return torch.get_num_threads()
    if not is_int(num_threads):
        raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def check_out(out, name: str, shape: tuple, dtype) -> np.ndarray:
    check_array(out, name, (dtype,), (len(shape),), writeable=True)
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    return out


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _finite_float(v, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number or None, got {type(v).__name__}")
    with np.errstate(over="ignore"):
        as_float32 = np.float32(v)
    if not math.isfinite(float(v)) or not math.isfinite(as_float32):
        raise ValueError(f"{name} must be finite (as float32), got {v}")
    return float(v)


def check_int(v, name: str) -> int:
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def check_interp(interp) -> str:
    if interp not in ("bilinear", "nearest"):
        raise ValueError(f"interp must be 'bilinear' or 'nearest', got {interp!r}")
    return interp


def check_flag(v, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


# ---------------------------------------------------------------------------------------------
# resize_crop

def _linear_taps(dst_len: int, src_len: int, start: int, count: int, clamp_weights: bool):
    """OpenCV INTER_LINEAR source indices and 11-bit weights for dst positions start..start+count.

    OpenCV maps dst d to src (d + 0.5) * scale - 0.5 in float32 with scale = 1 / (dst/src)
    (computed in double as cv::resize does). Columns outside the source are clamped to the edge
    pixel with weight (1, 0); rows keep their fractional weight and only clamp the row index.
    """
    scale = 1.0 / (dst_len / src_len)
    d = np.arange(start, start + count, dtype=np.float64)
    pos = ((d + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        outside = (i0 < 0) | (i0 >= src_len - 1)
        frac[outside] = 0.0
        i0 = np.where(i0 < 0, 0, np.where(i0 >= src_len - 1, src_len - 1, i0))
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(i0, 0, src_len - 1), np.clip(i0 + 1, 0, src_len - 1), w0, w1


def nearest_indices(dst_len: int, src_len: int) -> np.ndarray:
    """OpenCV INTER_NEAREST: src = floor(dst * (1 / (dst_len / src_len))), clamped."""
    scale = 1.0 / (dst_len / src_len)
    return np.minimum(np.floor(np.arange(dst_len, dtype=np.float64) * scale).astype(np.int64), src_len - 1)


def resize_crop(src, out_size, crop, flip=False, interp="bilinear", out=None, num_threads=None):
    check_array(src, "src", (np.uint8,), (2, 3))
    if src.ndim == 3 and not 1 <= src.shape[2] <= 4:
        raise ValueError(f"src must have 1..4 channels, got shape {src.shape}")
    if src.shape[0] < 1 or src.shape[1] < 1:
        raise ValueError(f"src must be at least 1x1, got shape {src.shape}")
    out_h, out_w = int_tuple(out_size, "out_size", 2, "(out_h, out_w)")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_size must be positive, got {(out_h, out_w)}")
    if out_h > 2**24 or out_w > 2**24:
        raise ValueError("out_size must be below 2**24 per side")
    y0, x0, h, w = int_tuple(crop, "crop", 4, "(y0, x0, h, w)")
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > out_h or x0 + w > out_w:
        raise ValueError(f"crop {(y0, x0, h, w)} must be a non-empty window inside the resized frame {(out_h, out_w)}")
    flip = check_flag(flip, "flip")
    check_interp(interp)
    check_num_threads(num_threads)
    shape = (h, w) + src.shape[2:]
    if out is not None:
        check_out(out, "out", shape, np.uint8)
        if np.shares_memory(out, src):
            raise ValueError("out must not overlap src")

    img = src if src.ndim == 3 else src[:, :, None]
    in_h, in_w = img.shape[:2]
    if interp == "nearest":
        rows = nearest_indices(out_h, in_h)[y0:y0 + h]
        cols = nearest_indices(out_w, in_w)[x0:x0 + w]
        result = img[rows][:, cols]
    else:
        r0, r1, b0, b1 = _linear_taps(out_h, in_h, y0, h, clamp_weights=False)
        c0, c1, a0, a1 = _linear_taps(out_w, in_w, x0, w, clamp_weights=True)
        a0, a1 = a0[None, :, None], a1[None, :, None]
        top = img[r0].astype(np.int32)
        bottom = img[r1].astype(np.int32)
        top = top[:, c0] * a0 + top[:, c1] * a1
        bottom = bottom[:, c0] * a0 + bottom[:, c1] * a1
        # OpenCV's vectorised vertical pass (VResizeLinearVec_32s8u): drop 4 bits, 16x16->high-16
        # multiplies, then a rounding shift by 2. Its rounding differs from the exact
        # (sum + 2**21) >> 22 in about 10% of pixels, so it is restated exactly.
        mix = ((top >> 4) * b0[:, None, None] >> 16) + ((bottom >> 4) * b1[:, None, None] >> 16)
        result = np.clip((mix + 2) >> 2, 0, 255).astype(np.uint8)
    if flip:
        result = result[:, ::-1]
    result = result.reshape(shape)
    if out is None:
        return np.ascontiguousarray(result)
    out[...] = result
    return out


# ---------------------------------------------------------------------------------------------
# label_histogram

def label_histogram(label, window=None, ignore_index=255):
    check_array(label, "label", (np.uint8,), (2,))
    y0, x0, h, w = (0, 0) + label.shape if window is None else int_tuple(window, "window", 4, "(y0, x0, h, w)")
    if h < 0 or w < 0 or y0 < 0 or x0 < 0 or y0 + h > label.shape[0] or x0 + w > label.shape[1]:
        raise ValueError(f"window {(y0, x0, h, w)} must lie inside label of shape {label.shape}")
    check_int(ignore_index, "ignore_index")
    hist = np.bincount(label[y0:y0 + h, x0:x0 + w].ravel(), minlength=256).astype(np.int64)
    if 0 <= ignore_index < 256:
        hist[ignore_index] = 0
    return hist


# ---------------------------------------------------------------------------------------------
# photometric

def _mmseg_convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg PhotoMetricDistortion.convert: float32 arithmetic (a Python-float factor does not
    # promote a float32 array), clip to [0, 255], then astype(uint8) which truncates.
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)


def _hsv_tables():
    i = np.arange(1, 256, dtype=np.float64)
    sdiv = np.concatenate([[0], np.rint((255 << 12) / i)]).astype(np.int64)
    hdiv = np.concatenate([[0], np.rint((180 << 12) / (6.0 * i))]).astype(np.int64)
    return sdiv, hdiv


_SDIV, _HDIV = _hsv_tables()


def bgr_to_hsv(img: np.ndarray):
    """cv2.cvtColor(img, COLOR_BGR2HSV) for uint8: OpenCV's integer arithmetic with 12-bit
    reciprocal tables (color_hsv.simd.hpp, RGB2HSV_b). Returns uint8 planes h (< 180), s, v."""
    b, g, r = (img[..., c].astype(np.int64) for c in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    return h.astype(np.uint8), s.astype(np.uint8), v.astype(np.uint8)


# cv2.cvtColor(HSV2BGR) converts each row in blocks of this many pixels (4 x 8 float lanes on
# AVX2); the last width % 32 pixels of every row take its scalar code, which rounds.
CV2_HSV_BLOCK = 32


def hsv_to_bgr(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_HSV2BGR) for uint8 planes [H,W] as OpenCV's AVX2 build computes it:
    float32, sector = trunc(h * 6/180), 1 - s*f as one fused multiply-add (emulated exactly in
    float64, where s*f is exact), and truncation to uint8 except in each row's last
    width % 32 pixels, which round half to even."""
    f32 = np.float32
    hf = h.astype(f32) * (f32(6.0) / f32(180))
    sector = np.trunc(hf)
    frac = hf - sector
    sf = s.astype(f32) * f32(1.0 / 255.0)
    vf = v.astype(f32) * f32(1.0 / 255.0)
    tab0 = vf
    tab1 = vf * (f32(1) - sf)
    tab2 = vf * (1.0 - sf.astype(np.float64) * frac.astype(np.float64)).astype(f32)
    tab3 = vf * (1.0 - sf.astype(np.float64) * (f32(1) - frac).astype(np.float64)).astype(f32)
    sector = sector.astype(np.int64)
    tabs = np.stack([tab0, tab1, tab2, tab3], axis=-1)
    # Which tab feeds b, g, r in each of the six hue sectors.
    pick = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])[sector]
    bgr = np.take_along_axis(tabs, pick, axis=-1) * f32(255.0)
    width = bgr.shape[1]
    tail = width - width % CV2_HSV_BLOCK
    bgr[:, :tail] = np.trunc(bgr[:, :tail])
    bgr[:, tail:] = np.rint(bgr[:, tail:])
    return np.clip(bgr, 0, 255).astype(np.uint8)


def check_photometric_draws(brightness_delta, contrast_alpha, saturation_alpha, hue_delta, contrast_first):
    brightness = None if brightness_delta is None else _finite_float(brightness_delta, "brightness_delta")
    contrast = None if contrast_alpha is None else _finite_float(contrast_alpha, "contrast_alpha")
    saturation = None if saturation_alpha is None else _finite_float(saturation_alpha, "saturation_alpha")
    if hue_delta is not None and not is_int(hue_delta):
        raise TypeError(f"hue_delta must be an int or None, got {type(hue_delta).__name__}")
    hue = None if hue_delta is None else int(hue_delta)
    return brightness, contrast, saturation, hue, check_flag(contrast_first, "contrast_first")


def photometric(img, brightness_delta=None, contrast_alpha=None, saturation_alpha=None,
                hue_delta=None, contrast_first=True, out=None, num_threads=None):
    check_array(img, "img", (np.uint8,), (3,))
    if img.shape[2] != 3:
        raise ValueError(f"img must be [H,W,3] BGR, got shape {img.shape}")
    brightness, contrast, saturation, hue_delta, contrast_first = check_photometric_draws(
        brightness_delta, contrast_alpha, saturation_alpha, hue_delta, contrast_first)
    check_num_threads(num_threads)
    if out is not None:
        check_out(out, "out", img.shape, np.uint8)

    x = img
    if brightness is not None:
        x = _mmseg_convert(x, beta=brightness)
    if contrast is not None and contrast_first:
        x = _mmseg_convert(x, alpha=contrast)
    if saturation is not None:
        h, s, v = bgr_to_hsv(x)
        x = hsv_to_bgr(h, _mmseg_convert(s, alpha=saturation), v)
    if hue_delta is not None:
        h, s, v = bgr_to_hsv(x)
        x = hsv_to_bgr(((h.astype(np.int64) + int(hue_delta)) % 180).astype(np.uint8), s, v)
    if contrast is not None and not contrast_first:
        x = _mmseg_convert(x, alpha=contrast)
    if out is None:
        return x.copy() if x is img else x
    out[...] = x
    return out


# ---------------------------------------------------------------------------------------------
# normalize

def _three_floats(v, name: str) -> tuple:
    try:
        items = [float(t) for t in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {v!r}") from None
    if len(items) != 3 or not all(math.isfinite(t) for t in items):
        raise ValueError(f"{name} must hold 3 finite numbers, got {v!r}")
    return tuple(items)


def as_uint8_image_tensor(img) -> torch.Tensor:
    """img (numpy or CPU torch, uint8, [H,W,3] or [B,H,W,3], contiguous) as a torch view."""
    if isinstance(img, np.ndarray):
        check_array(img, "img", (np.uint8,), (3, 4))
        t = torch.from_numpy(img)
    elif isinstance(img, torch.Tensor):
        if img.device.type != "cpu":
            raise ValueError(f"img must be a CPU tensor, got device {img.device}")
        if img.dtype != torch.uint8:
            raise TypeError(f"img must have dtype uint8, got {img.dtype}")
        if img.dim() not in (3, 4):
            raise ValueError(f"img must have 3 or 4 dimensions, got shape {tuple(img.shape)}")
        if not img.is_contiguous():
            raise ValueError("img must be C-contiguous (call .contiguous())")
        t = img
    else:
        raise TypeError(f"img must be a numpy.ndarray or torch.Tensor, got {type(img).__name__}")
    if t.shape[-1] != 3:
        raise ValueError(f"img must have 3 channels last ([H,W,3] or [B,H,W,3]), got shape {tuple(t.shape)}")
    return t


_MEMORY_FORMATS = {torch.contiguous_format: "torch.contiguous_format", torch.channels_last: "torch.channels_last"}


def check_normalize_args(img, mean, std, to_rgb, dtype, out, memory_format=torch.contiguous_format):
    t = as_uint8_image_tensor(img)
    mean3 = _three_floats(mean, "mean")
    std3 = _three_floats(std, "std")
    if any(s == 0.0 for s in std3):
        raise ValueError(f"std must be non-zero, got {std3}")
    to_rgb = check_flag(to_rgb, "to_rgb")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(memory_format, torch.memory_format) or memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format!r}")
    if memory_format == torch.channels_last and t.dim() != 4:
        raise ValueError(f"memory_format=torch.channels_last needs a batched img [B,H,W,3], got shape "
                         f"{tuple(t.shape)}")
    shape = tuple(t.shape[:-3]) + (3,) + tuple(t.shape[-3:-1])
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        layout = _MEMORY_FORMATS[memory_format]
        if (out.device.type != "cpu" or out.dtype != dtype or tuple(out.shape) != shape
                or not out.is_contiguous(memory_format=memory_format)):
            hint = ("" if out.dim() != 4 or memory_format == torch.channels_last
                    or not out.is_contiguous(memory_format=torch.channels_last)
                    else "; for a channels_last out pass memory_format=torch.channels_last")
            raise ValueError(f"out must be a CPU {dtype} tensor of shape {shape}, contiguous in memory_format="
                             f"{layout}, got {out.dtype} {tuple(out.shape)} on {out.device} with strides "
                             f"{tuple(out.stride())}{hint}")
    return t, mean3, std3, to_rgb, shape


def normalize(img, mean, std, to_rgb=True, dtype=torch.float32, out=None, num_threads=None,
              memory_format=torch.contiguous_format):
    t, mean3, std3, to_rgb, _ = check_normalize_args(img, mean, std, to_rgb, dtype, out, memory_format)
    check_num_threads(num_threads)
    x = t.flip(-1) if to_rgb else t
    x = x.movedim(-1, -3).to(torch.float32)
    m = torch.tensor(mean3, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std3, dtype=torch.float32).view(3, 1, 1)
    y = ((x - m) / s).to(dtype)
    if out is None:
        return y.contiguous(memory_format=memory_format)
    out.copy_(y)
    return out


# ---------------------------------------------------------------------------------------------
# label_lookup

def label_lookup(label, table, out=None, num_threads=None):
    check_array(label, "label", (np.uint8,), tuple(range(0, 33)))
    check_array(table, "table", (np.uint8,), (1,))
    if table.shape != (256,):
        raise ValueError(f"table must have shape (256,), got {table.shape}")
    check_num_threads(num_threads)
    if out is not None:
        check_out(out, "out", label.shape, np.uint8)
    result = table[label]
    if out is None:
        return result
    out[...] = result
    return out


# ---------------------------------------------------------------------------------------------
# confusion_matrix

_CM_DTYPES = (np.uint8, np.int32, np.int64)


def as_label_array(x, name: str) -> np.ndarray:
    """A numpy view of a numpy array or CPU torch tensor of integer labels."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        if x.dtype not in (torch.uint8, torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype uint8/int32/int64, got {x.dtype}")
        x = x.numpy()
    return check_array(x, name, _CM_DTYPES, tuple(range(0, 33)))


def confusion_matrix(pred, label, num_classes, ignore_index=255, num_threads=None):
    pred = as_label_array(pred, "pred")
    label = as_label_array(label, "label")
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {pred.shape} and {label.shape}")
    check_int(num_classes, "num_classes")
    if not 1 <= num_classes <= 65536:
        raise ValueError(f"num_classes must be in [1, 65536], got {num_classes}")
    check_int(ignore_index, "ignore_index")
    check_num_threads(num_threads)
    k = int(num_classes)
    p = pred.ravel().astype(np.int64)
    g = label.ravel().astype(np.int64)
    counted = g != ignore_index
    bad_label = counted & ((g < 0) | (g >= k))
    bad_pred = counted & ((p < 0) | (p >= k))
    bad = np.flatnonzero(bad_label | bad_pred)
    if bad.size:
        i = int(bad[0])
        if bad_label[i]:
            raise ValueError(f"label has value {g[i]} at flat index {i}, outside [0, {k}) and not ignore_index={ignore_index}")
        raise ValueError(f"pred has value {p[i]} at flat index {i} (label {g[i]}), outside [0, {k})")
    return np.bincount(g[counted] * k + p[counted], minlength=k * k).astype(np.int64).reshape(k, k)


# ---------------------------------------------------------------------------------------------
# fill_polygons: the ground truth is Pillow itself

def check_polygons(canvas, polygons, values):
    check_array(canvas, "canvas", (np.uint8,), (2,), writeable=True)
    if not isinstance(polygons, (list, tuple)):
        raise TypeError(f"polygons must be a list of [N,2] arrays, got {type(polygons).__name__}")
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise TypeError(f"values must be a list of ints, got {type(values).__name__}")
    if len(values) != len(polygons):
        raise ValueError(f"values must have one entry per polygon: {len(values)} values for {len(polygons)} polygons")
    arrays = []
    for i, poly in enumerate(polygons):
        try:
            a = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"polygons[{i}] must be numeric [N,2] (x, y) points") from None
        if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 2:
            raise ValueError(f"polygons[{i}] must have shape [N,2] with N >= 2, got {a.shape}")
        # Pillow truncates coordinates to C ints; 2**28 keeps every difference of two in range.
        if not np.all(np.abs(a) < 2**28):
            raise ValueError(f"polygons[{i}] coordinates must be finite and below 2**28 in magnitude")
        arrays.append(np.ascontiguousarray(a))
    ints = []
    for i, v in enumerate(values):
        if not is_int(v):
            raise TypeError(f"values[{i}] must be an int, got {type(v).__name__}")
        if not 0 <= v <= 255:
            raise ValueError(f"values[{i}] must be in [0, 255], got {v}")
        ints.append(int(v))
    return arrays, ints


def fill_polygons(canvas, polygons, values, num_threads=None):
    arrays, ints = check_polygons(canvas, polygons, values)
    check_num_threads(num_threads)
    image = Image.fromarray(canvas)  # mode "L", a copy
    draw = ImageDraw.Draw(image)
    for poly, value in zip(arrays, ints):
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=value)
    canvas[...] = np.asarray(image)
    return canvas
