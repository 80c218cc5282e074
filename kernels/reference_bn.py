"""Pure torch reference of the bn_act ops (BatchNorm + activation, kernels/csrc/bn_act.cpp).

Two layers:

* The math, on channels-last tensors [..., C] of any float dtype, device and strides (`stats`,
  `forward`, `grad_terms`, `backward_reduce`, `backward`). core/norm.py uses these as its torch
  path (CUDA/NPU, bfloat16/float16 under AMP, float64 for gradcheck, non-channels_last layouts).
  They compute in float32 (float64 for float64 inputs) and return that dtype.
* `bn_act_stats`, `bn_act_forward`, `bn_act_backward_reduce`, `bn_act_backward`: the reference of
  kernels.ops, with the C++ signatures and argument checks (float32 [M, C] CPU tensors).

The activation is act(v) = v if v > 0 else slope * v: slope 0.01 is leaky ReLU, 1 identity,
0 ReLU. The backward takes `src`, the forward's output y (src_is_output=True; slope > 0, the
activation is inverted) or its input x, and rebuilds x_hat and g = dL/d(pre-activation) from it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .reference import check_num_threads

Tensor = torch.Tensor

# |weight| below the smallest normal float32 cannot be inverted: x_hat is taken as 0 there (dx is
# still exact, being scaled by weight; that channel's d(weight) is then 0). Same rule in C++.
_MIN_WEIGHT = 1.17549435e-38


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: Tensor) -> Tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def stats(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x [..., C] in `dtype` (default compute_dtype(x))."""
    var, mean = torch.var_mean(x.to(dtype or compute_dtype(x)), dim=_dims(x), unbiased=False)
    return mean, var


def _scale_shift(mean, invstd, weight, bias, dtype):
    # The same float arithmetic as the kernel: a = invstd * weight, b = bias - mean * a.
    a = invstd.to(dtype) * weight.to(dtype)
    return a, bias.to(dtype) - mean.to(dtype) * a


def _act(v: Tensor, slope: float) -> Tensor:
    return torch.where(v > 0, v, v * slope)


def forward(x, mean, invstd, weight, bias, slope: float, residual: Optional[Tensor] = None) -> Tensor:
    """act(x * a + b [+ residual]) with a = invstd * weight, b = bias - mean * a."""
    dt = compute_dtype(x)
    a, b = _scale_shift(mean, invstd, weight, bias, dt)
    v = x.to(dt) * a + b
    if residual is not None:
        v = v + residual.to(dt)
    return _act(v, _as_dtype_scalar(slope, dt))


def _as_dtype_scalar(v: float, dtype: torch.dtype) -> float:
    # The kernel holds slope and 1/slope as float32; round the same way for float32 math.
    return float(torch.tensor(v, dtype=dtype)) if dtype != torch.float64 else float(v)


def grad_terms(src, dy, mean, invstd, weight, bias, slope: float, src_is_output: bool,
               residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(x_hat, g): the normalised input and dL/d(pre-activation), rebuilt from src and dy."""
    dt = compute_dtype(src)
    s, d = src.to(dt), dy.to(dt)
    slope_t = _as_dtype_scalar(slope, dt)
    if src_is_output:
        pos = s > 0
        inv_slope = _as_dtype_scalar(1.0 / slope_t, dt)
        z = torch.where(pos, s, s * inv_slope)  # act^-1(y)
        if residual is not None:
            z = z - residual.to(dt)
        w = weight.to(dt)
        inv_w = torch.where(w.abs() >= _MIN_WEIGHT, 1.0 / w, torch.zeros_like(w))
        return (z - bias.to(dt)) * inv_w, torch.where(pos, d, d * slope_t)
    a, b = _scale_shift(mean, invstd, weight, bias, dt)
    z = s * a + b  # the forward's pre-activation, rounded as the forward rounded it
    if residual is not None:
        z = z + residual.to(dt)
    return (s - mean.to(dt)) * invstd.to(dt), torch.where(z > 0, d, d * slope_t)


def backward_reduce(src, dy, mean, invstd, weight, bias, slope: float, src_is_output: bool,
                    residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum_g, sum_g_xhat) per channel in float64, and g (the residual's gradient)."""
    xh, g = grad_terms(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual)
    dims = _dims(g)
    return g.sum(dims, dtype=torch.float64), (g * xh).sum(dims, dtype=torch.float64), g


def backward(src, dy, mean, invstd, weight, bias, mean_g, mean_g_xhat, slope: float, src_is_output: bool,
             residual: Optional[Tensor] = None) -> Tensor:
    """dx = (g - mean_g - x_hat * mean_g_xhat) * weight * invstd."""
    xh, g = grad_terms(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual)
    dt = xh.dtype
    scale = weight.to(dt) * invstd.to(dt)
    return (g - mean_g.to(dt) - xh * mean_g_xhat.to(dt)) * scale


# ---------------------------------------------------------------------------------------------
# kernels.ops reference: the C++ signatures and checks

def _check_tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype float32, got {str(t.dtype).replace('torch.', '')}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous (use .contiguous())")
    return t


def _shape_str(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_rows(t, name: str, like: Optional[Tensor] = None) -> Tensor:
    """A float32 C-contiguous CPU tensor [M, C] (M, C >= 1), of like's shape if given."""
    _check_tensor(t, name)
    if like is None:
        if t.ndim != 2:
            raise ValueError(f"{name} must have 2 dimensions, got shape {_shape_str(t.shape)}")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must be [M, C] with M, C >= 1, got shape {_shape_str(t.shape)}")
    elif t.shape != like.shape:
        raise ValueError(f"{name} must have shape {_shape_str(like.shape)}, got {_shape_str(t.shape)}")
    return t


def check_channels(t, name: str, c: int) -> Tensor:
    _check_tensor(t, name)
    if tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), got {_shape_str(t.shape)}")
    return t


def check_slope(slope, src_is_output: bool) -> float:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        raise TypeError(f"slope must be a number, got {type(slope).__name__}")
    if not math.isfinite(slope) or slope < 0:
        raise ValueError(f"slope must be a finite number >= 0, got {slope}")
    if src_is_output and slope == 0:
        raise ValueError("slope must be > 0 when src_is_output=True (ReLU, slope 0, is not invertible)")
    return float(slope)


def _overlaps(a: Tensor, b: Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def check_out(out, name: str, like: Tensor, inputs: dict, alias_ok: Optional[str] = None) -> Optional[Tensor]:
    """The caller's output [M, C] (or None): it overlaps none of `inputs` ({name: tensor or None}),
    except that it may be the input named alias_ok itself."""
    if out is None:
        return None
    check_rows(out, name, like)
    for in_name, t in inputs.items():
        if t is None or not _overlaps(out, t):
            continue
        if in_name == alias_ok:
            if out.data_ptr() == t.data_ptr():
                continue
            raise ValueError(f"{name} must be {in_name} itself or not overlap it")
        raise ValueError(f"{name} must not overlap {in_name}")
    return out


def check_backward_args(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual, num_threads):
    check_rows(src, "src")
    check_rows(dy, "dy", src)
    c = src.shape[1]
    for t, name in ((mean, "mean"), (invstd, "invstd"), (weight, "weight"), (bias, "bias")):
        check_channels(t, name, c)
    check_slope(slope, src_is_output)
    if residual is not None:
        check_rows(residual, "residual", src)
    return check_num_threads(num_threads)


def _write(out: Optional[Tensor], value: Tensor) -> Tensor:
    if out is None:
        return value.to(torch.float32).contiguous()
    return out.copy_(value)


def bn_act_stats(x, num_threads=None) -> Tuple[Tensor, Tensor]:
    check_rows(x, "x")
    check_num_threads(num_threads)
    return stats(x, torch.float64)


def bn_act_forward(x, mean, invstd, weight, bias, slope=0.01, residual=None, out=None, num_threads=None) -> Tensor:
    check_rows(x, "x")
    for t, name in ((mean, "mean"), (invstd, "invstd"), (weight, "weight"), (bias, "bias")):
        check_channels(t, name, x.shape[1])
    slope = check_slope(slope, False)
    if residual is not None:
        check_rows(residual, "residual", x)
    check_num_threads(num_threads)
    check_out(out, "out", x, {"x": x, "residual": residual}, alias_ok="x")
    return _write(out, forward(x, mean, invstd, weight, bias, slope, residual))


def bn_act_backward_reduce(src, dy, mean, invstd, weight, bias, slope=0.01, src_is_output=True, residual=None,
                           dresidual=None, num_threads=None) -> Tuple[Tensor, Tensor]:
    check_backward_args(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual, num_threads)
    check_out(dresidual, "dresidual", src, {"src": src, "dy": dy, "residual": residual})
    sum_g, sum_gx, g = backward_reduce(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual)
    if dresidual is not None:
        dresidual.copy_(g)
    return sum_g, sum_gx


def bn_act_backward(src, dy, mean, invstd, weight, bias, mean_g, mean_g_xhat, slope=0.01, src_is_output=True,
                    residual=None, out=None, num_threads=None) -> Tensor:
    check_backward_args(src, dy, mean, invstd, weight, bias, slope, src_is_output, residual, num_threads)
    check_channels(mean_g, "mean_g", src.shape[1])
    check_channels(mean_g_xhat, "mean_g_xhat", src.shape[1])
    check_out(out, "out", src, {"src": src, "dy": dy, "residual": residual})
    return _write(out, backward(src, dy, mean, invstd, weight, bias, mean_g, mean_g_xhat, slope, src_is_output,
                                residual))
