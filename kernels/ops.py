"""Typed entry points of the kernels: each dispatches to the C++ extension kernels._C or, when
`kernels.use_reference(True)` / KERNELS_REFERENCE=1 is in force, to kernels.reference.

Both paths take the same arguments and return the same values. The C++ path never falls back to
the reference on its own: a missing extension is an ImportError saying how to build it.
num_threads=None means torch.get_num_threads(); results do not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
import torch

from . import reference as _ref
from . import reference_enabled

__all__ = ["backend", "resize_crop", "label_histogram", "photometric", "normalize", "label_lookup",
           "confusion_matrix", "fill_polygons"]

_BUILD_HINT = ("the C++ extension kernels._C is not built. Build it with `pip install -e .` (or "
               "`python setup.py build_ext --inplace`) in the repository root, or set "
               "KERNELS_REFERENCE=1 to run the slow pure numpy/torch reference instead")
_lib_module = None


def _lib():
    global _lib_module
    if _lib_module is None:
        try:
            from . import _C
        except ImportError as err:
            raise ImportError(f"{_BUILD_HINT} ({err})") from err
        _lib_module = _C
    return _lib_module


def backend() -> str:
    """'reference' or 'cpp': the implementation the ops run now (ImportError if cpp is unbuilt)."""
    if reference_enabled():
        return "reference"
    _lib()
    return "cpp"


def resize_crop(src: np.ndarray, out_size: tuple, crop: tuple, flip: bool = False,
                interp: str = "bilinear", out: np.ndarray | None = None,
                num_threads: int | None = None) -> np.ndarray:
    """The window crop=(y0, x0, h, w) of cv2.resize(src, (out_w, out_h)), mirrored if flip.

    interp 'bilinear' is OpenCV INTER_LINEAR (bit-exact with cv2 5.0), 'nearest' INTER_NEAREST.
    Only the window is computed.
    """
    if reference_enabled():
        return _ref.resize_crop(src, out_size, crop, flip, interp, out, num_threads)
    lib = _lib()
    out_h, out_w = _ref.int_tuple(out_size, "out_size", 2, "(out_h, out_w)")
    y0, x0, h, w = _ref.int_tuple(crop, "crop", 4, "(y0, x0, h, w)")
    return lib.resize_crop(src, out_h, out_w, y0, x0, h, w, _ref.check_flag(flip, "flip"), _ref.check_interp(interp),
                           out, _ref.check_num_threads(num_threads))


def label_histogram(label: np.ndarray, window: tuple | None = None, ignore_index: int = 255) -> np.ndarray:
    """int64 [256] counts of each value of uint8 label [H,W] inside window (None = whole)."""
    if reference_enabled():
        return _ref.label_histogram(label, window, ignore_index)
    lib = _lib()
    y0, x0, h, w = (0, 0, -1, -1) if window is None else _ref.int_tuple(window, "window", 4, "(y0, x0, h, w)")
    return lib.label_histogram(label, y0, x0, h, w, window is None, _ref.check_int(ignore_index, "ignore_index"))


def photometric(img: np.ndarray, brightness_delta: float | None = None, contrast_alpha: float | None = None,
                saturation_alpha: float | None = None, hue_delta: int | None = None,
                contrast_first: bool = True, out: np.ndarray | None = None,
                num_threads: int | None = None) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 BGR [H,W,3] with the caller's random draws (None = skip)."""
    if reference_enabled():
        return _ref.photometric(img, brightness_delta, contrast_alpha, saturation_alpha, hue_delta,
                                contrast_first, out, num_threads)
    lib = _lib()
    draws = _ref.check_photometric_draws(brightness_delta, contrast_alpha, saturation_alpha, hue_delta, contrast_first)
    return lib.photometric(img, *draws, out, _ref.check_num_threads(num_threads))


def normalize(img, mean, std, to_rgb: bool = True, dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None, num_threads: int | None = None,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [B,H,W,3] / [H,W,3] (numpy or CPU tensor) -> [B,3,H,W] / [3,H,W] float32 or bfloat16.

    memory_format=torch.channels_last (batched img only) writes the [B,3,H,W] result in NHWC
    memory, as a channels_last model wants it, in the same single pass (same values). out, if
    given, must be contiguous in that memory format.
    """
    if reference_enabled():
        return _ref.normalize(img, mean, std, to_rgb, dtype, out, num_threads, memory_format)
    lib = _lib()
    t, mean3, std3, to_rgb, shape = _ref.check_normalize_args(img, mean, std, to_rgb, dtype, out, memory_format)
    threads = _ref.check_num_threads(num_threads)
    if out is None:
        out = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    # The C++ side sees plain numpy views: bfloat16 travels as its 16-bit pattern, and a
    # channels_last tensor as an [B,3,H,W] array with NHWC strides (which is how it is written).
    out_view = out.view(torch.int16).numpy() if dtype == torch.bfloat16 else out.numpy()
    batched_in = t.numpy().reshape((-1,) + tuple(t.shape[-3:]))
    batched_out = out_view if out_view.ndim == 4 else out_view[None]
    lib.normalize(batched_in, mean3, std3, to_rgb, dtype == torch.bfloat16, batched_out, threads)
    return out


def label_lookup(label: np.ndarray, table: np.ndarray, out: np.ndarray | None = None,
                 num_threads: int | None = None) -> np.ndarray:
    """out[i] = table[label[i]] for uint8 label of any shape and uint8 table [256]."""
    if reference_enabled():
        return _ref.label_lookup(label, table, out, num_threads)
    return _lib().label_lookup(label, table, out, _ref.check_num_threads(num_threads))


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = 255,
                     num_threads: int | None = None) -> np.ndarray:
    """int64 [K,K]: rows ground truth, columns prediction; label == ignore_index is skipped."""
    if reference_enabled():
        return _ref.confusion_matrix(pred, label, num_classes, ignore_index, num_threads)
    lib = _lib()
    pred = _ref.as_label_array(pred, "pred")
    label = _ref.as_label_array(label, "label")
    return lib.confusion_matrix(pred, label, _ref.check_int(num_classes, "num_classes"),
                                _ref.check_int(ignore_index, "ignore_index"), _ref.check_num_threads(num_threads))


def fill_polygons(canvas: np.ndarray, polygons, values, num_threads: int | None = None) -> np.ndarray:
    """Fill each polygon [N,2] of (x, y) with its value, in order, exactly as PIL ImageDraw.polygon.

    canvas (uint8 [H,W]) is changed in place and returned.
    """
    if reference_enabled():
        return _ref.fill_polygons(canvas, polygons, values, num_threads)
    lib = _lib()
    arrays, ints = _ref.check_polygons(canvas, polygons, values)
    return lib.fill_polygons(canvas, arrays, ints, _ref.check_num_threads(num_threads))
