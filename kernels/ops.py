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
from . import reference_bn as _bn
from . import reference_winograd as _wino
from . import reference_enabled

__all__ = ["backend", "resize_crop", "label_histogram", "photometric", "normalize", "label_lookup",
           "confusion_matrix", "fill_polygons", "bn_act_stats", "bn_act_forward", "bn_act_backward_reduce",
           "bn_act_backward", "winograd_input", "winograd_output",
           "winograd_output_grad", "winograd2_input", "winograd2_output"]

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


# ---- BatchNorm + activation (core/norm.py): channels-last float32 [M, C] CPU tensors ----------
# act(v) = v if v > 0 else slope * v (slope 0.01 leaky ReLU, 1 identity, 0 ReLU). Per-channel
# arguments are float32 [C]; per-channel results are float64 [C]. The four steps are separate so
# that SyncBN can all-reduce the statistics and the two backward sums between them.

def _np(t, name: str) -> np.ndarray:
    """The numpy view the C++ side reads (it checks ndim, contiguity and shapes itself)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype float32, got {str(t.dtype).replace('torch.', '')}")
    return t.detach().numpy()


def _np_opt(t, name: str):
    return None if t is None else _np(t, name)


def bn_act_stats(x: torch.Tensor, num_threads: int | None = None) -> tuple:
    """(mean, var): float64 [C] per-channel mean and biased variance of x [M, C]."""
    if reference_enabled():
        return _bn.bn_act_stats(x, num_threads)
    mean, var = _lib().bn_act_stats(_np(x, "x"), _ref.check_num_threads(num_threads))
    return torch.from_numpy(mean), torch.from_numpy(var)


def bn_act_forward(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, slope: float = 0.01, residual: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, num_threads: int | None = None) -> torch.Tensor:
    """act(x * a + b [+ residual]), a = invstd * weight, b = bias - mean * a; out may be x (in place)."""
    if reference_enabled():
        return _bn.bn_act_forward(x, mean, invstd, weight, bias, slope, residual, out, num_threads)
    slope = _bn.check_slope(slope, False)
    result = _lib().bn_act_forward(_np(x, "x"), _np(mean, "mean"), _np(invstd, "invstd"), _np(weight, "weight"),
                                   _np(bias, "bias"), slope, _np_opt(residual, "residual"), _np_opt(out, "out"),
                                   _ref.check_num_threads(num_threads))
    return out if out is not None else torch.from_numpy(result)


def bn_act_backward_reduce(src: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, slope: float = 0.01, src_is_output: bool = True,
                           residual: torch.Tensor | None = None, dresidual: torch.Tensor | None = None,
                           num_threads: int | None = None) -> tuple:
    """(sum_g, sum_g_xhat): float64 [C] sums of g = dy * act'(.) and g * x_hat, x_hat rebuilt from src:
    the forward's output y (src_is_output; slope > 0) or its input x. dresidual, if given, receives g."""
    if reference_enabled():
        return _bn.bn_act_backward_reduce(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual,
                                          dresidual, num_threads)
    slope = _bn.check_slope(slope, _ref.check_flag(src_is_output, "src_is_output"))
    sum_g, sum_gx = _lib().bn_act_backward_reduce(
        _np(src, "src"), _np(dy, "dy"), _np(mean, "mean"), _np(invstd, "invstd"), _np(weight, "weight"),
        _np(bias, "bias"), slope, src_is_output, _np_opt(residual, "residual"), _np_opt(dresidual, "dresidual"),
        _ref.check_num_threads(num_threads))
    return torch.from_numpy(sum_g), torch.from_numpy(sum_gx)


def bn_act_backward(src: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, mean_g: torch.Tensor, mean_g_xhat: torch.Tensor,
                    slope: float = 0.01, src_is_output: bool = True, residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, num_threads: int | None = None) -> torch.Tensor:
    """dx = (g - mean_g - x_hat * mean_g_xhat) * weight * invstd, mean_g / mean_g_xhat being the
    sums of bn_act_backward_reduce divided by the (global) row count."""
    if reference_enabled():
        return _bn.bn_act_backward(src, dy, mean, invstd, weight, bias, mean_g, mean_g_xhat, slope, src_is_output,
                                   residual, out, num_threads)
    slope = _bn.check_slope(slope, _ref.check_flag(src_is_output, "src_is_output"))
    result = _lib().bn_act_backward(
        _np(src, "src"), _np(dy, "dy"), _np(mean, "mean"), _np(invstd, "invstd"), _np(weight, "weight"),
        _np(bias, "bias"), _np(mean_g, "mean_g"), _np(mean_g_xhat, "mean_g_xhat"), slope, src_is_output,
        _np_opt(residual, "residual"), _np_opt(out, "out"), _ref.check_num_threads(num_threads))
    return out if out is not None else torch.from_numpy(result)


# ---- Winograd F(4x4, 3x3) transforms (core/winograd.py): float32 NHWC CPU tensors ---------------
# Tiles of tile rows [row0, row0 + rows) of every phase grid of a dilation-D 3x3 conv, numbered
# t = (((n * D + p) * D + q) * rows + ta - row0) * TW + tb (kernels/csrc/winograd.cpp).

def _np_wino(t: torch.Tensor) -> np.ndarray:
    """A tensor's data for the C++ transforms: float32 as it is, bfloat16 as its bits (int16)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _winograd_tiles(op: str, src: torch.Tensor, name: str, dilation: int, row0: int, rows: int,
                    out: torch.Tensor | None, num_threads: int | None, dtype=torch.float32, m: int = 4) -> torch.Tensor:
    """winograd_input / winograd_output_grad / winograd2_input: [N, H, W, C] -> [(m + 2)^2, T, C] by
    the C++ op `op`, on `dtype` tensors."""
    _wino.check_tensor(src, name, 4, dtype)
    _wino.check_chunk(src.shape[1], src.shape[2], dilation, row0, rows, m)
    if out is not None:
        _wino.check_tensor(out, "out", 3, dtype)
    result = getattr(_lib(), op)(_np_wino(src), dilation, row0, rows, None if out is None else _np_wino(out),
                                 _ref.check_num_threads(num_threads))
    return out if out is not None else torch.from_numpy(result).view(dtype)


def winograd_input(x: torch.Tensor, dilation: int, row0: int, rows: int, out: torch.Tensor | None = None,
                   num_threads: int | None = None) -> torch.Tensor:
    """v [36, T, C]: B^T d B of every 6x6 input tile d of x [N, H, W, C] (zero outside the image)."""
    if reference_enabled():
        return _wino.winograd_input(x, dilation, row0, rows, out, num_threads)
    return _winograd_tiles("winograd_input", x, "x", dilation, row0, rows, out, num_threads)


def winograd_output(m: torch.Tensor, bias: torch.Tensor | None, dilation: int, row0: int, rows: int,
                    out: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """Writes A^T m_t A (+ bias [O]) of every tile of m [36, T, O] into out [N, H, W, O] (in-image pixels)."""
    if reference_enabled():
        return _wino.winograd_output(m, bias, dilation, row0, rows, out, num_threads)
    return _winograd_output("winograd_output", m, bias, dilation, row0, rows, out, num_threads)


def _winograd_output(op: str, m: torch.Tensor, bias: torch.Tensor | None, dilation: int, row0: int, rows: int,
                     out: torch.Tensor, num_threads: int | None, dtype=torch.float32, k: int = 4) -> torch.Tensor:
    """winograd_output / winograd2_output: m [(k + 2)^2, T, O] -> k x k tiles of out [N, H, W, O] by `op`."""
    _wino.check_tensor(out, "out", 4, dtype)
    _wino.check_chunk(out.shape[1], out.shape[2], dilation, row0, rows, k)
    _wino.check_tensor(m, "m", 3, dtype)
    if bias is not None:
        _wino.check_tensor(bias, "bias", 1)
    getattr(_lib(), op)(_np_wino(m), None if bias is None else bias.detach().numpy(), dilation, row0, rows,
                        _np_wino(out), _ref.check_num_threads(num_threads))
    return out


def winograd_output_grad(dy: torch.Tensor, dilation: int, row0: int, rows: int, out: torch.Tensor | None = None,
                         num_threads: int | None = None) -> torch.Tensor:
    """g [36, T, O]: A dy_t A^T of every 4x4 tile dy_t of dy [N, H, W, O] (the adjoint of winograd_output)."""
    if reference_enabled():
        return _wino.winograd_output_grad(dy, dilation, row0, rows, out, num_threads)
    return _winograd_tiles("winograd_output_grad", dy, "dy", dilation, row0, rows, out, num_threads)


# ---- Winograd F(2x2, 3x3) transforms (core/winograd_bf16.py): bfloat16 NHWC CPU tensors ----------
# Tiles numbered as above with 2x2 output tiles (TW = ceil(ceil(W / D) / 2)); float32 arithmetic,
# one rounding to bfloat16 (kernels/csrc/winograd_bf16.cpp).

def winograd2_input(x: torch.Tensor, dilation: int, row0: int, rows: int, out: torch.Tensor | None = None,
                    num_threads: int | None = None) -> torch.Tensor:
    """v [16, T, C] bfloat16: B^T d B of every 4x4 input tile d of bfloat16 x [N, H, W, C] (zero outside)."""
    if reference_enabled():
        return _wino.winograd2_input(x, dilation, row0, rows, out, num_threads)
    return _winograd_tiles("winograd2_input", x, "x", dilation, row0, rows, out, num_threads, torch.bfloat16, 2)


def winograd2_output(m: torch.Tensor, bias: torch.Tensor | None, dilation: int, row0: int, rows: int,
                     out: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """Writes A^T m_t A (+ float32 bias [O]) of every tile of bfloat16 m [16, T, O] into bfloat16
    out [N, H, W, O] (in-image pixels)."""
    if reference_enabled():
        return _wino.winograd2_output(m, bias, dilation, row0, rows, out, num_threads)
    return _winograd_output("winograd2_output", m, bias, dilation, row0, rows, out, num_threads, torch.bfloat16, 2)
