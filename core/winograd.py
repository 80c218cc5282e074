"""Winograd F(4x4, 3x3) convolution for inference: F.conv2d(x, w, b, stride=1, padding=d,
dilation=d) for a 3x3 kernel with 36 multiplies per 4x4 output tile instead of 144 (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016; the matrices B^T, G, A^T
below are theirs, interpolation points 0, +-1, +-2, infinity).

Per tile: Y = A^T [ (G g G^T) . (B^T d B) ] A, a 6x6 input tile d giving a 4x4 output tile.
Over channels the elementwise product becomes 36 independent matrix products
    M[k] = V[k] @ U[k],  V[k]: [tiles, Cin] (transformed input),  U[k]: [Cin, Cout] (weights)
which is where the time goes (MKL GEMMs); the transforms of the tiles (B^T d B in, A^T M A out) are
one fused pass over memory each in C++ (kernels/csrc/winograd.cpp, its torch reference in
kernels/reference_winograd.py). A dilated conv is d*d ordinary 3x3 convs on the phase grids x[p::d, q::d], so
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

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.atrous import _is_channels_last, _run, _to_format, conv_macs, same_padded_3x3
from kernels import ops
from kernels.reference_winograd import tile_grid

_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # B^T and A^T: kernels/reference_winograd.py
_CHUNK = 1 << 24  # elements of transformed input per chunk (64 MB in float32)
# A call runs Winograd when its GEMM work is at most 1/MIN_GAIN of the direct conv's useful work
# (winograd_gain); measured speed-ups were 0.82-0.85x of that estimate for 2048-channel layers.
MIN_GAIN = 1.5
_workspace = threading.local()  # per thread: the V and M buffers, reused by every layer and call


def _buffer(name: str, shape) -> torch.Tensor:
    """A float32 scratch tensor of `shape` viewed from a per-thread buffer that only grows: a fresh
    100-200 MB tensor per layer would be page-faulted in again at every call (a fresh V for the
    ASPP bottleneck cost 8x the transform itself here)."""
    need = math.prod(shape)
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=torch.float32)
        setattr(_workspace, name, buf)
    return buf[:need].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are kept between calls on purpose)."""
    _workspace.__dict__.clear()


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
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (the transforms are kernels/csrc/winograd.cpp), got {x.device}")
    n, c, h, w = x.shape
    o, d = u.shape[2], dilation
    th, tw = tile_grid(h, w, d)
    xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC: a view, no copy, for a channels_last x
    y = x.new_empty(n, h, w, o)
    # Rows of tiles in chunks: the transformed input of a whole map is 36/16 x 2.25 = 5x the
    # map's size (~190 MB for the ASPP bottleneck at 512x1024), a chunk at most _CHUNK elements.
    rows = max(1, min(th, _CHUNK // (36 * c * n * d * d * tw)))
    for row0 in range(0, th, rows):
        k = min(rows, th - row0)
        tiles = n * d * d * k * tw
        v = ops.winograd_input(xh, d, row0, k, _buffer("v", (36, tiles, c)))
        m = torch.bmm(v, u, out=_buffer("m", (36, tiles, o)))  # [36, tiles, O]: where the time goes
        ops.winograd_output(m, bias, d, row0, k, y)
    return _to_format(y.permute(0, 3, 1, 2), _is_channels_last(x))


def winograd_gain(h: int, w: int, dilation: int) -> float:
    """Estimated speed-up of Winograd over the direct conv on an h x w map: the multiply-adds whose
    input is inside the image (what oneDNN's channels_last forward computes) over the Winograd
    GEMM's, 36 per 4x4 tile of every phase grid, whole tiles, padding included. Large dilations on
    small maps lose: the ASPP's 24 and 36 at 64x128 estimate 1.17 and 0.8 (measured 0.99x and
    0.71x), its 12 estimates 1.94 (measured 1.60x); dilation 1 and 2 at 64x128 about 3.8."""
    _, needed = conv_macs(1, 1, 1, h, w, dilation)
    th, tw = tile_grid(h, w, dilation)
    return needed / (36 * dilation * dilation * th * tw)


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding == dilation, groups 1) that runs winograd_conv2d for
    float32 CPU calls without gradients where winograd_gain reaches MIN_GAIN, the plain conv
    otherwise (a dilated one in channels_last, as core/atrous.py's inference choice does). The
    transformed weight is a non-persistent buffer (state-dict keys unchanged; it follows .to()),
    rebuilt when the weight changes in place (its version counter moves)."""

    @staticmethod
    def eligible(m: nn.Module) -> bool:
        return same_padded_3x3(m)

    def refresh(self) -> None:
        self.register_buffer("winograd_weight", transform_weight(self.weight), persistent=False)
        self._winograd_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.ndim != 4 or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or x.device.type != "cpu" or torch.is_autocast_enabled(x.device.type)
                or torch.compiler.is_compiling()):
            return super().forward(x)
        d = self.dilation[0]
        if winograd_gain(x.shape[2], x.shape[3], d) < MIN_GAIN:
            return super().forward(x) if d == 1 else _run("channels_last", x, self.weight, self.bias, d)
        if self.winograd_weight.device != self.weight.device or self._winograd_version != self.weight._version:
            self.refresh()
        return winograd_conv2d(x, self.winograd_weight, self.bias, d)


def convert_winograd(model: nn.Module, min_channels: int = 128) -> int:
    """Turn every eligible plain nn.Conv2d with at least `min_channels` input and output
    channels into a WinogradConv2d, in place (same objects, parameters and state-dict keys).
    Smaller convs are left alone: their transforms cost more than their GEMMs save (R50-D8 at
    512x1024 on the Zen 4 here, fp32, 2 threads, against oneDNN's channels_last conv: 32->32 at
    256x512 0.50x, 64->64 at 128x256 0.99x, 128->128 at 64x128 1.38x, 256->256 d2 1.87x, 512->512
    d4 2.43x, 2560->512 2.71x, the ASPP's 2048->512 d12 1.60x). Which calls of a converted conv
    run Winograd depends on the map (winograd_gain). Returns the number converted."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and WinogradConv2d.eligible(m)
                and min(m.in_channels, m.out_channels) >= min_channels):
            m.__class__ = WinogradConv2d
            m.refresh()
            count += 1
    return count
