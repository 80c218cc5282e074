"""Winograd F(4x4, 3x3) convolution for inference: F.conv2d(x, w, b, stride=1, padding=d,
dilation=d) for a 3x3 kernel with 36 multiplies per 4x4 output tile instead of 144 (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016; the matrices B^T, G, A^T
below are theirs, interpolation points 0, +-1, +-2, infinity).

Per tile: Y = A^T [ (G g G^T) . (B^T d B) ] A, a 6x6 input tile d giving a 4x4 output tile.
Over channels the elementwise product becomes 36 independent matrix products
    M[k] = V[k] @ U[k],  V[k]: [tiles, Cin] (transformed input),  U[k]: [Cin, Cout] (weights)
which is where the time goes (oneDNN/MKL GEMMs); the transforms are small matrix products over
the tile axes. A dilated conv is d*d ordinary 3x3 convs on the phase grids x[p::d, q::d], so
dilation only changes the strides with which tiles are read and written: one code path.

Numerics: exact in exact arithmetic; in float32 the error against oneDNN's direct conv is a few
1e-6 relative (tests/test_winograd.py). The transforms amplify rounding: with bfloat16 GEMM
inputs the relative error of a layer was 1.3-3% (points 0, +-1, +-2 and the best others tried)
against 0.2-0.3% for a direct bf16 conv, so a bf16 call runs the direct conv instead (see WinogradConv2d.forward). Inference only: a call that needs gradients
runs the plain conv, and so does a call under autocast (the conv then runs in the low dtype) and
one traced by torch.compile: under torch 2.13 inductor, a model whose Winograd convs ran eagerly
between compiled graphs gave wrong logits (freezing, ATen at AVX2) or a glibc "double free or
corruption" abort (no freezing, AVX-512), so a compiled model keeps the library's conv.
Only on the CPU so far: cuDNN and CANN choose their own Winograd kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.atrous import _is_channels_last, _to_format, same_padded_3x3

_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_CHUNK = 1 << 24  # elements of transformed input per chunk (64 MB in float32)
MAX_DILATION = 4  # larger dilations (the ASPP's) leave the padding-aware convs in charge (core/atrous.py)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> U [36, C, O] float32 (G g G^T per (o, c), computed in float64)."""
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [O, C, 3, 3], got shape {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->aboc", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).transpose(1, 2).contiguous().float()


def winograd_conv2d(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    dilation: int = 1) -> torch.Tensor:
    """F.conv2d(x, w, bias, 1, dilation, dilation) with u = transform_weight(w). x is
    [N, C, H, W] in float32 (any memory format); the result has x's memory format."""
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if u.ndim != 3 or u.shape[0] != 36 or u.shape[1] != x.shape[1]:
        raise ValueError(f"u must be [36, {x.shape[1]}, O] (transform_weight of [O, {x.shape[1]}, 3, 3]), "
                         f"got shape {tuple(u.shape)}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if x.dtype != torch.float32 or u.dtype != torch.float32:
        raise TypeError(f"x and u must be float32, got {x.dtype} and {u.dtype}")
    n, c, h, w = x.shape
    o, d = u.shape[2], dilation
    th, tw = -(-(-(-h // d)) // 4), -(-(-(-w // d)) // 4)  # tiles per phase grid
    hp, wp = d * (4 * th + 2), d * (4 * tw + 2)
    # NHWC, zero-padded: d rows/cols before (the conv's padding), enough after for whole tiles
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, d, wp - w - d, d, hp - h - d))
    s_row, s_col = wp * c, c
    # element (i, j) of tile (ta, tb) of phase (p, q) is padded pixel (p + d(4ta + i), q + d(4tb + j))
    tiles = xp.as_strided((6, 6, n, d, d, th, tw, c),
                          (d * s_row, d * s_col, hp * s_row, s_row, s_col, 4 * d * s_row, 4 * d * s_col, 1))
    bt = torch.tensor(_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(_AT, dtype=x.dtype, device=x.device)
    y = x.new_empty(n, 4 * d * th, 4 * d * tw, o)
    # pixel row p + d(4ta + i) = (ta, i, p) row-major, likewise columns: y's tile-order view
    y_tiles = y.view(n, th, 4, d, tw, 4, d, o)
    # Rows of tiles in chunks: the transformed input of a whole map is 36/16 x 2.25 = 5x the
    # map's size (~190 MB for the ASPP bottleneck at 512x1024), a chunk at most _CHUNK elements.
    rows = max(1, _CHUNK // (36 * c * n * d * d * tw))
    for ta in range(0, th, rows):
        part = tiles[:, :, :, :, :, ta:ta + rows]
        k = part.shape[5]
        v = (bt @ part.reshape(6, -1)).view(6, 6, -1)                # B^T d (rows), one gather copy
        v = torch.matmul(bt, v).view(36, -1, c)                      # ... B (columns)
        m = torch.bmm(v, u)                                          # [36, tiles, O]
        z = torch.matmul(at, (at @ m.view(6, -1)).view(4, 6, -1))    # A^T M A: [4, 4, tiles * O]
        y_tiles[:, ta:ta + k] = z.view(4, 4, n, d, d, k, tw, o).permute(2, 5, 0, 3, 6, 1, 4, 7)
    y = y[:, :h, :w]
    if bias is not None:
        y = y + bias
    return _to_format(y.permute(0, 3, 1, 2), _is_channels_last(x))


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding == dilation <= MAX_DILATION, groups 1) that runs
    winograd_conv2d for float32 calls without gradients, the plain conv otherwise. The
    transformed weight is a non-persistent buffer (state-dict keys unchanged; it follows .to()),
    rebuilt when the weight changes in place (its version counter moves)."""

    @staticmethod
    def eligible(m: nn.Module) -> bool:
        return same_padded_3x3(m) and m.dilation[0] <= MAX_DILATION

    def refresh(self) -> None:
        self.register_buffer("winograd_weight", transform_weight(self.weight), persistent=False)
        self._winograd_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.ndim != 4 or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or x.device.type == "meta" or torch.is_autocast_enabled(x.device.type)
                or torch.compiler.is_compiling()):
            return super().forward(x)
        if self.winograd_weight.device != self.weight.device or self._winograd_version != self.weight._version:
            self.refresh()
        return winograd_conv2d(x, self.winograd_weight, self.bias, self.dilation[0])


def convert_winograd(model: nn.Module, min_channels: int = 128) -> int:
    """Turn every eligible plain nn.Conv2d with at least `min_channels` input and output
    channels into a WinogradConv2d, in place (same objects, parameters and state-dict keys).
    Smaller convs are left alone: their transforms cost more than their GEMMs save (R50-D8 at
    512x1024 on the Zen 4 here, fp32, 2 threads, against oneDNN's channels_last conv: 32->32 at
    256x512 0.20x, 64->64 at 128x256 0.61x, 128->128 at 64x128 1.41x, 256->256 d2 1.58x, 512->512
    d4 1.47x, 2560->512 1.89x; the ASPP's 2048->512 d12 0.86x, hence MAX_DILATION). Returns the
    number converted."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and WinogradConv2d.eligible(m)
                and min(m.in_channels, m.out_channels) >= min_channels):
            m.__class__ = WinogradConv2d
            m.refresh()
            count += 1
    return count
