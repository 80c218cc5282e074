"""Pure torch reference of the Winograd transforms, with the signatures of kernels.ops': F(4x4, 3x3)
on float32 NHWC CPU tensors (winograd_input / winograd_output / winograd_output_grad,
kernels/csrc/winograd.cpp) and F(2x2, 3x3) on bfloat16 ones (winograd2_input / winograd2_output,
kernels/csrc/winograd_bf16.cpp: computed in float32, rounded to bfloat16 once).

The tiles of a dilation-D conv are read from the phase grids x[p::D, q::D] with as_strided over a
zero-padded copy, and B^T . B and A^T . A are applied as matrix products over the tile axes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .reference import check_num_threads

Tensor = torch.Tensor
# Lavin & Gray, CVPR 2016: interpolation points 0, +-1, +-2, infinity (core/winograd.py holds G).
BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
      (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
# F(2x2, 3x3), points 0, +-1, infinity (core/winograd_bf16.py holds G)
BT2 = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
AT2 = ((1, 1, 1, 0), (0, 1, -1, -1))


def tile_grid(h: int, w: int, dilation: int, m: int = 4) -> Tuple[int, int]:
    """(TH, TW): whole m x m output tiles over the largest phase grid of an h x w map at this dilation."""
    return -(-(-(-h // dilation)) // m), -(-(-(-w // dilation)) // m)


def check_tensor(t, name: str, ndim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {str(dtype).replace('torch.', '')}, "
                        f"got {str(t.dtype).replace('torch.', '')}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (NHWC data as a contiguous [N, H, W, C] tensor)")
    return t


def check_chunk(h: int, w: int, dilation, row0, rows, m: int = 4) -> Tuple[int, int]:
    """Validated (TH, TW) of m x m output tiles for tile rows [row0, row0 + rows)."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if h < 1 or w < 1:
        raise ValueError("the feature map must be at least 1x1")
    th, tw = tile_grid(h, w, dilation, m)
    if not (isinstance(row0, int) and isinstance(rows, int) and 0 <= row0 and rows >= 1 and row0 + rows <= th):
        raise ValueError(f"tile rows [row0, row0 + rows) = [{row0}, {row0 + rows}) must lie within [0, {th}) "
                         f"for a {h}x{w} map at dilation {dilation}")
    return th, tw


def _into(out: Optional[Tensor], result: Tensor) -> Tensor:
    """result, or the caller's out [36, T, C] (or [16, T, C]) holding it."""
    if out is None:
        return result
    check_tensor(out, "out", 3, result.dtype)
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"out must have shape {tuple(result.shape)}, got {tuple(out.shape)}")
    return out.copy_(result)


def _input(x: Tensor, d: int, row0: int, rows: int, bt) -> Tensor:
    """[(m + 2)^2, T, C]: B^T d_t B of the (m + 2) x (m + 2) input tiles (bt: B^T, m = len(bt) - 2)."""
    n, h, w, c = x.shape
    t = len(bt)
    m = t - 2
    th, tw = check_chunk(h, w, d, row0, rows, m)
    hp, wp = d * (m * th + 2), d * (m * tw + 2)
    xp = F.pad(x, (0, 0, d, wp - w - d, d, hp - h - d))  # d before (the conv's padding), whole tiles after
    s_row, s_col = wp * c, c
    # element (i, j) of tile (ta, tb) of phase (p, q) is padded pixel (p + d(m ta + i), q + d(m tb + j))
    tiles = xp.as_strided((t, t, n, d, d, rows, tw, c), (d * s_row, d * s_col, hp * s_row, s_row, s_col,
                                                         m * d * s_row, m * d * s_col, 1), m * d * row0 * s_row)
    bt = torch.tensor(bt, dtype=x.dtype)
    v = (bt @ tiles.reshape(t, -1)).view(t, t, -1)
    return torch.matmul(bt, v).reshape(t * t, -1, c)


def _output(m: Tensor, bias: Optional[Tensor], d: int, row0: int, rows: int, out: Tensor, at) -> Tensor:
    """A^T m_t A (+ bias) of every tile t of m [(k + 2)^2, T, O] (at: A^T, k = len(at)), in m's dtype,
    written into the in-image pixels of out [N, H, W, O] (converted to out's dtype)."""
    n, h, w, o = out.shape
    k = len(at)
    t = k + 2
    th, tw = check_chunk(h, w, d, row0, rows, k)
    want = (t * t, n * d * d * rows * tw, o)
    if tuple(m.shape) != want:
        raise ValueError(f"m must have shape {want}, got {tuple(m.shape)}")
    if bias is not None and tuple(check_tensor(bias, "bias", 1).shape) != (o,):
        raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    at = torch.tensor(at, dtype=m.dtype)
    z = torch.matmul(at, (at @ m.reshape(t, -1)).view(k, t, -1))  # [k, k, T * O]
    # pixel row p + d(k ta + i) = (ta, i, p) row-major, likewise columns
    block = z.view(k, k, n, d, d, rows, tw, o).permute(2, 5, 0, 3, 6, 1, 4, 7).reshape(n, k * d * rows, k * d * tw, o)
    top = k * d * row0
    valid = min(h, top + k * d * rows) - top
    if bias is not None:
        block = block + bias
    out[:, top:top + valid] = block[:, :valid, :w].to(out.dtype)
    return out


def winograd_input(x: Tensor, dilation: int, row0: int, rows: int, out: Optional[Tensor] = None,
                   num_threads: Optional[int] = None) -> Tensor:
    """v [36, T, C], v[6a + b, t] = (B^T d_t B)[a, b] for the 6x6 input tiles d_t of tile rows
    [row0, row0 + rows) of x [N, H, W, C] (pixels outside the image read 0)."""
    check_num_threads(num_threads)
    return _into(out, _input(check_tensor(x, "x", 4), dilation, row0, rows, BT))


def winograd_output(m: Tensor, bias: Optional[Tensor], dilation: int, row0: int, rows: int, out: Tensor,
                    num_threads: Optional[int] = None) -> Tensor:
    """Write A^T m_t A (+ bias) of every tile t of m [36, T, O] into the pixels of out [N, H, W, O]
    inside the image (tiles numbered as in winograd_input)."""
    check_num_threads(num_threads)
    check_tensor(out, "out", 4)
    return _output(check_tensor(m, "m", 3), bias, dilation, row0, rows, out, AT)


def winograd2_input(x: Tensor, dilation: int, row0: int, rows: int, out: Optional[Tensor] = None,
                    num_threads: Optional[int] = None) -> Tensor:
    """v [16, T, C] bfloat16, v[4a + b, t] = (B^T d_t B)[a, b] for the 4x4 input tiles d_t of tile rows
    [row0, row0 + rows) of bfloat16 x [N, H, W, C], in float32, rounded once."""
    check_num_threads(num_threads)
    x = check_tensor(x, "x", 4, torch.bfloat16)
    return _into(out, _input(x.float(), dilation, row0, rows, BT2).to(torch.bfloat16))


def winograd2_output(m: Tensor, bias: Optional[Tensor], dilation: int, row0: int, rows: int, out: Tensor,
                     num_threads: Optional[int] = None) -> Tensor:
    """Write A^T m_t A (+ float32 bias) of every tile t of bfloat16 m [16, T, O], in float32, rounded
    once, into the pixels of bfloat16 out [N, H, W, O] inside the image."""
    check_num_threads(num_threads)
    check_tensor(out, "out", 4, torch.bfloat16)
    return _output(check_tensor(m, "m", 3, torch.bfloat16).float(), bias, dilation, row0, rows, out, AT2)


def winograd_output_grad(dy: Tensor, dilation: int, row0: int, rows: int, out: Optional[Tensor] = None,
                         num_threads: Optional[int] = None) -> Tensor:
    """The adjoint of winograd_output without bias: g [36, T, O], g[6a + b, t] = (A dy_t A^T)[a, b]
    for the 4x4 output tiles dy_t of dy [N, H, W, O] (pixels outside the image read 0)."""
    check_num_threads(num_threads)
    n, h, w, o = check_tensor(dy, "dy", 4).shape
    d = dilation
    th, tw = check_chunk(h, w, d, row0, rows)
    top = 4 * d * row0
    block = dy.new_zeros(n, 4 * d * rows, 4 * d * tw, o)
    valid = min(h, top + 4 * d * rows) - top
    block[:, :valid, :w] = dy[:, top:top + valid]
    # pixel row p + d(4ta + i) = (ta, i, p) row-major: the tiles' view, [4, 4, n, d, d, rows, tw, o]
    tiles = block.view(n, rows, 4, d, tw, 4, d, o).permute(2, 5, 0, 3, 6, 1, 4, 7)
    a = torch.tensor(AT, dtype=dy.dtype).T  # [6, 4]
    g = (a @ tiles.reshape(4, -1)).view(6, 4, -1)
    return _into(out, torch.matmul(a, g).reshape(36, -1, o))
