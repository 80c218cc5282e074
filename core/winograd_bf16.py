"""Winograd F(2x2, 3x3) convolution in bfloat16 for inference: F.conv2d(x, w, b, stride=1,
padding=d, dilation=d) for a 3x3 kernel with 16 multiplies per 2x2 output tile instead of 36
(2.25x fewer; Lavin & Gray, CVPR 2016, interpolation points 0, +-1, infinity).

Per tile Y = A^T [(G g G^T) . (B^T d B)] A as in core/winograd.py's F(4x4, 3x3), whose float32
transforms it shares the tiling, chunking and phase grids with; here the 16 GEMMs
M[k] = V[k] @ U[k] run in bfloat16 (the CPU's bf16 dot-product instructions, twice the float32
rate), the data transforms (kernels/csrc/winograd_bf16.cpp) compute in float32 from bf16 and round once.

Why F(2x2) and not F(4x4) in bf16: the GEMM inputs V and U and the products M are rounded to bf16
(up to 2^-8 relative), and the transforms amplify that by the size of their entries. F(4x4)'s (up
to 8, and G's 1/24) gave 1.3-3% relative error per layer; F(2x2)'s are 0, +-1 and +-1/2: measured
0.28-0.41% per layer (error norm over output norm, bf16-exact inputs, the output's rounding
included) against 0.17% for oneDNN's direct bf16 conv (R50-D8 layer shapes, Zen 4;
tests/test_winograd_bf16.py holds an element-wise bound). The whole R50-D8 at 512x1024 agreed with
the fp32 model's argmax on 99.857% of the pixels, the direct bf16 model on 99.858% (bench/infer.py).
Only where the CPU has bf16 kernels (core.cpu.bf16_here): elsewhere the bf16 GEMM is a slow
reference loop and the direct conv is kept. Inference only: a call that needs gradients runs the
direct conv.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from core.atrous import _is_channels_last, _to_format, conv_macs
from kernels import ops
from kernels.reference_winograd import tile_grid

_G2 = ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1))  # B^T, A^T: kernels/reference_winograd.py
_CHUNK = 1 << 25  # elements of transformed input per chunk (64 MB in bfloat16)
# A bf16 call runs Winograd when the direct conv's useful multiply-adds are at least MIN_GAIN times
# the GEMMs' (winograd2_gain) and both channel counts reach MIN_CHANNELS. Measured against oneDNN's
# channels_last bf16 conv (R50-D8 at 512x1024, Zen 4, 2 threads; the estimated gain in brackets):
# 2560->512 1.76x (2.21), 512->512 d4 1.56-1.60x (2.11), 2048->512 d12 1.53x (1.46: oneDNN's bf16
# conv computes some padding taps), d24 1.01-1.10x (0.88), d36 0.99x (0.90), 256->256 d2 0.98-1.22x
# (2.18; no gain in a whole-model A/B, so kept direct), 128->128 0.80x (2.21).
MIN_GAIN = 1.2
MIN_CHANNELS = 512


def transform_weight2(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> U [16, C, O] bfloat16, U[4a + b] = G g G^T per (o, c), computed in float64
    and rounded once."""
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [O, C, 3, 3], got shape {tuple(weight.shape)}")
    o, c = weight.shape[:2]
    g = torch.tensor(_G2, dtype=torch.float64, device=weight.device)
    kron = torch.einsum("ai,bj->abij", g, g).reshape(16, 9)
    u = kron @ weight.detach().double().reshape(o * c, 9).T  # [16, O * C]
    return u.view(16, o, c).transpose(1, 2).contiguous().to(torch.bfloat16)


def winograd2_gain(h: int, w: int, dilation: int) -> float:
    """Estimated speed-up over the direct conv on an h x w map, as core.winograd.winograd_gain: the
    multiply-adds whose input is inside the image over the GEMMs', 16 per 2x2 tile of every phase grid."""
    _, needed = conv_macs(1, 1, 1, h, w, dilation)
    th, tw = tile_grid(h, w, dilation, 2)
    return needed / (16 * dilation * dilation * th * tw)


def winograd2_conv2d(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dilation: int = 1) -> torch.Tensor:
    """F.conv2d(x, w, bias, 1, dilation, dilation) with u = transform_weight2(w), x [N, C, H, W]
    bfloat16 (any memory format); the result is bfloat16 in x's memory format."""
    from core.winograd import _buffer
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if u.ndim != 3 or u.shape[0] != 16 or u.shape[1] != x.shape[1]:
        raise ValueError(f"u must be [16, {x.shape[1]}, O] (transform_weight2 of [O, {x.shape[1]}, 3, 3]), "
                         f"got shape {tuple(u.shape)}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if x.dtype != torch.bfloat16 or u.dtype != torch.bfloat16:
        raise TypeError(f"x and u must be bfloat16, got {x.dtype} and {u.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (the transforms are kernels/csrc/winograd_bf16.cpp), got {x.device}")
    n, c, h, w = x.shape
    o, d = u.shape[2], dilation
    xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC: a view, no copy, for a channels_last x
    y = x.new_empty(n, h, w, o)
    b = None if bias is None else bias.detach().float()
    th, tw = tile_grid(h, w, d, 2)
    rows = max(1, min(th, _CHUNK // (16 * max(c, o) * n * d * d * tw)))
    for row0 in range(0, th, rows):
        k = min(rows, th - row0)
        tiles = n * d * d * k * tw
        v = ops.winograd2_input(xh, d, row0, k, _buffer("v2", (16, tiles, c), torch.bfloat16))
        m = torch.bmm(v, u, out=_buffer("m2", (16, tiles, o), torch.bfloat16))  # where the time goes
        ops.winograd2_output(m, b, d, row0, k, y)
    return _to_format(y.permute(0, 3, 1, 2), _is_channels_last(x))


@functools.lru_cache(maxsize=None)
def _bf16_kernels() -> bool:
    from core.cpu import bf16_here
    return bf16_here()[0]


def bf16_call(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A conv call that computes in bf16: bf16 input and weight (a cast model, O2/O3), or CPU autocast
    to bf16 (O1: the conv would cast both)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16


def worthwhile(conv, x: torch.Tensor) -> bool:
    """Whether a bf16 inference call of this 3x3 conv on x should run winograd2_conv2d."""
    return (min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS and _bf16_kernels()
            and winograd2_gain(x.shape[2], x.shape[3], conv.dilation[0]) >= MIN_GAIN)
