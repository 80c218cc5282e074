"""Pure torch reference of the Winograd F(4x4, 3x3) transforms (kernels/csrc/winograd.cpp), with
the signatures of kernels.ops.winograd_input / winograd_output: float32 NHWC CPU tensors.

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


def tile_grid(h: int, w: int, dilation: int) -> Tuple[int, int]:
    """(TH, TW): whole 4x4 tiles over the largest phase grid of an h x w map at this dilation."""
    return -(-(-(-h // dilation)) // 4), -(-(-(-w // dilation)) // 4)


def check_tensor(t, name: str, ndim: int, writeable: bool = False) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype float32, got {str(t.dtype).replace('torch.', '')}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (NHWC data as a contiguous [N, H, W, C] tensor)")
    return t


def check_chunk(h: int, w: int, dilation, row0, rows) -> Tuple[int, int]:
    """Validated (TH, TW) for tile rows [row0, row0 + rows)."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if h < 1 or w < 1:
        raise ValueError("the feature map must be at least 1x1")
    th, tw = tile_grid(h, w, dilation)
    if not (isinstance(row0, int) and isinstance(rows, int) and 0 <= row0 and rows >= 1 and row0 + rows <= th):
        raise ValueError(f"tile rows [row0, row0 + rows) = [{row0}, {row0 + rows}) must lie within [0, {th}) "
                         f"for a {h}x{w} map at dilation {dilation}")
    return th, tw


def _into(out: Optional[Tensor], result: Tensor) -> Tensor:
    """result, or the caller's out [36, T, C] holding it."""
    if out is None:
        return result
    check_tensor(out, "out", 3)
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"out must have shape {tuple(result.shape)}, got {tuple(out.shape)}")
    return out.copy_(result)


def winograd_input(x: Tensor, dilation: int, row0: int, rows: int, out: Optional[Tensor] = None,
                   num_threads: Optional[int] = None) -> Tensor:
    """v [36, T, C], v[6a + b, t] = (B^T d_t B)[a, b] for the 6x6 input tiles d_t of tile rows
    [row0, row0 + rows) of x [N, H, W, C] (pixels outside the image read 0)."""
    check_num_threads(num_threads)
    n, h, w, c = check_tensor(x, "x", 4).shape
    d = dilation
    th, tw = check_chunk(h, w, d, row0, rows)
    hp, wp = d * (4 * th + 2), d * (4 * tw + 2)
    xp = F.pad(x, (0, 0, d, wp - w - d, d, hp - h - d))  # d before (the conv's padding), whole tiles after
    s_row, s_col = wp * c, c
    # element (i, j) of tile (ta, tb) of phase (p, q) is padded pixel (p + d(4ta + i), q + d(4tb + j))
    tiles = xp.as_strided((6, 6, n, d, d, rows, tw, c), (d * s_row, d * s_col, hp * s_row, s_row, s_col,
                                                         4 * d * s_row, 4 * d * s_col, 1), 4 * d * row0 * s_row)
    bt = torch.tensor(BT, dtype=x.dtype)
    v = (bt @ tiles.reshape(6, -1)).view(6, 6, -1)
    return _into(out, torch.matmul(bt, v).reshape(36, -1, c))


def winograd_output(m: Tensor, bias: Optional[Tensor], dilation: int, row0: int, rows: int, out: Tensor,
                    num_threads: Optional[int] = None) -> Tensor:
    """Write A^T m_t A (+ bias) of every tile t of m [36, T, O] into the pixels of out [N, H, W, O]
    inside the image (tiles numbered as in winograd_input)."""
    check_num_threads(num_threads)
    n, h, w, o = check_tensor(out, "out", 4).shape
    d = dilation
    th, tw = check_chunk(h, w, d, row0, rows)
    check_tensor(m, "m", 3)
    want = (36, n * d * d * rows * tw, o)
    if tuple(m.shape) != want:
        raise ValueError(f"m must have shape {want}, got {tuple(m.shape)}")
    if bias is not None and tuple(check_tensor(bias, "bias", 1).shape) != (o,):
        raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    at = torch.tensor(AT, dtype=m.dtype)
    z = torch.matmul(at, (at @ m.reshape(6, -1)).view(4, 6, -1))  # [4, 4, T * O]
    # pixel row p + d(4ta + i) = (ta, i, p) row-major, likewise columns
    block = z.view(4, 4, n, d, d, rows, tw, o).permute(2, 5, 0, 3, 6, 1, 4, 7).reshape(n, 4 * d * rows, 4 * d * tw, o)
    top = 4 * d * row0
    valid = min(h, top + 4 * d * rows) - top
    if bias is not None:
        block = block + bias
    out[:, top:top + valid] = block[:, :valid, :w]
    return out


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
