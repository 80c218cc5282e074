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
inputs the relative error of an F(4x4) layer was 1.3-3% (points 0, +-1, +-2 and the best others
tried) against 0.2-0.3% for a direct bf16 conv, so a bf16 inference call (a cast model, or CPU
autocast to bf16) runs F(2x2, 3x3) instead, whose transforms hardly amplify it
(core/winograd_bf16.py), and a bf16 call with gradients the direct conv. A float32 call that needs
gradients runs _WinogradConvFunction (forward, input and weight gradient all in the Winograd
domain). The direct conv runs in a model traced by torch.compile: under torch 2.13 inductor, a
model whose Winograd convs ran eagerly between compiled graphs gave wrong logits (freezing, ATen
at AVX2) or a glibc "double free or corruption" abort (no freezing, AVX-512), so a compiled model
keeps the library's conv.
Only on the CPU so far: cuDNN and CANN choose their own Winograd kernels.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import nn

from core import winograd_bf16
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


def _buffer(name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scratch tensor of `shape` viewed from a per-thread buffer that only grows: a fresh
    100-200 MB tensor per layer would be page-faulted in again at every call (a fresh V for the
    ASPP bottleneck cost 8x the transform itself here)."""
    need = math.prod(shape)
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < need or buf.dtype != dtype:
        buf = torch.empty(need, dtype=dtype)
        setattr(_workspace, name, buf)
    return buf[:need].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are kept between calls on purpose)."""
    _workspace.__dict__.clear()


def _kron_g(dtype: torch.dtype, device) -> torch.Tensor:
    """kron(G, G) as [36, 9]: row 6a + b, column 3i + j holds G[a, i] G[b, j]."""
    g = torch.tensor(_G, dtype=dtype, device=device)
    return torch.einsum("ai,bj->abij", g, g).reshape(36, 9)


def transform_weight(weight: torch.Tensor, exact: bool = True, flip: bool = False,
                     scratch: bool = False) -> torch.Tensor:
    """[O, C, 3, 3] -> U [36, C, O] float32 with U[6a + b] = G g G^T per (o, c): one matrix product
    kron(G, G) [36, 9] @ weight [9, O * C], of which U is the transposed view [36, C, O] of the
    [36, O, C] result (MKL's batched GEMM reads it as it is, no copy). exact: in float64 (inference: computed once), else in
    float32 (training: at every step). flip: the weight of the input-gradient conv instead, the
    kernel flipped with its channels swapped, weight.transpose(0, 1).flip(2, 3) -> [36, O, C]:
    the same product with kron(G, G)'s columns reversed. scratch (float32 only): the result lives
    in this thread's reused buffer, valid until the next scratch transform (training's per-call
    transforms: a fresh 190 MB tensor would be page-faulted in at every step)."""
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [O, C, 3, 3], got shape {tuple(weight.shape)}")
    o, c = weight.shape[:2]
    dtype = torch.float64 if exact else torch.float32
    kron = _kron_g(dtype, weight.device)
    if flip:
        kron = kron.flip(1)
    w = weight.detach().to(dtype).contiguous().view(o * c, 9)  # (a channels_last weight is copied here)
    if scratch and not exact:
        u = torch.mm(kron, w.T, out=_buffer("u", (36, o * c))).view(36, o, c)
    else:
        u = (kron @ w.T).view(36, o, c).float()
    return u if flip else u.transpose(1, 2)


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
    xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC: a view, no copy, for a channels_last x
    y = x.new_empty(n, h, w, o)
    for row0, k, tiles in _chunks(n, max(c, o), h, w, d):
        v = ops.winograd_input(xh, d, row0, k, _buffer("v", (36, tiles, c)))
        m = torch.bmm(v, u, out=_buffer("m", (36, tiles, o)))  # [36, tiles, O]: where the time goes
        ops.winograd_output(m, bias, d, row0, k, y)
    return _to_format(y.permute(0, 3, 1, 2), _is_channels_last(x))


def _chunks(n: int, channels: int, h: int, w: int, d: int):
    """(row0, rows, tiles) of each chunk of tile rows. The transformed input of a whole map is
    36/16 x 2.25 = 5x the map's size (~190 MB for the ASPP bottleneck at 512x1024): a chunk
    holds at most _CHUNK elements of it."""
    th, tw = tile_grid(h, w, d)
    rows = max(1, min(th, _CHUNK // (36 * channels * n * d * d * tw)))
    for row0 in range(0, th, rows):
        k = min(rows, th - row0)
        yield row0, k, n * d * d * k * tw


def winograd_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, dilation: int) -> torch.Tensor:
    """The weight gradient [O, C, 3, 3] of winograd_conv2d(x, ., dilation) for the output gradient
    grad_y, in the Winograd domain: dU[k] = sum over tiles of (A dY A^T)[k]^T (B^T X B)[k], a
    batched GEMM with a quarter of the direct products, then dW = G^T dU G (the adjoint of
    transform_weight, again one [OC, 36] @ [36, 9] product)."""
    n, c, h, w = x.shape
    o, d = grad_y.shape[1], dilation
    xh = x.permute(0, 2, 3, 1).contiguous()
    gh = grad_y.permute(0, 2, 3, 1).contiguous()
    du = _buffer("du", (36, o, c)).zero_()
    for row0, k, tiles in _chunks(n, max(c, o), h, w, d):
        v = ops.winograd_input(xh, d, row0, k, _buffer("v", (36, tiles, c)))
        g = ops.winograd_output_grad(gh, d, row0, k, _buffer("m", (36, tiles, o)))
        du.baddbmm_(g.transpose(1, 2), v)
    return (du.view(36, o * c).T @ _kron_g(torch.float32, du.device)).view(o, c, 3, 3)


def winograd_gain(h: int, w: int, dilation: int) -> float:
    """Estimated speed-up of Winograd over the direct conv on an h x w map: the multiply-adds whose
    input is inside the image (what oneDNN's channels_last forward computes) over the Winograd
    GEMM's, 36 per 4x4 tile of every phase grid, whole tiles, padding included. Large dilations on
    small maps lose: the ASPP's 24 and 36 at 64x128 estimate 1.17 and 0.8 (measured 0.99x and
    0.71x), its 12 estimates 1.94 (measured 1.60x); dilation 1 and 2 at 64x128 about 3.8."""
    _, needed = conv_macs(1, 1, 1, h, w, dilation)
    th, tw = tile_grid(h, w, dilation)
    return needed / (36 * dilation * dilation * th * tw)


def _weight_format(weight: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(weight) else torch.contiguous_format


class _WinogradConvFunction(torch.autograd.Function):
    """Training, all three products by Winograd: the input gradient of a same-padded 3x3 conv is
    the same-padded conv of dY with the kernel flipped and its channels swapped (one more
    winograd_conv2d), the weight gradient is winograd_weight_grad. The transformed weights are
    rebuilt at every call (the weights change at every step), in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation: int):
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return winograd_conv2d(x, transform_weight(weight, exact=False, scratch=True), bias, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = transform_weight(weight, exact=False, flip=True, scratch=True)
            grad_x = winograd_conv2d(grad_y, flipped, None, d)
        if ctx.needs_input_grad[1]:
            grad_w = winograd_weight_grad(x, grad_y, d).to(memory_format=_weight_format(weight))
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding == dilation, groups 1) that runs Winograd for float32 CPU
    calls where winograd_gain reaches MIN_GAIN, and the plain conv otherwise (a dilated one in
    channels_last, as core/atrous.py's inference choice does). Without gradients the transformed
    weight is kept (a plain attribute: no state-dict key, no buffer for DDP to broadcast) and
    rebuilt when the weight changes in place or moves; a call with gradients drops it and runs
    _WinogradConvFunction."""

    @staticmethod
    def eligible(m: nn.Module) -> bool:
        return same_padded_3x3(m)

    def forward(self, x: torch.Tensor, first_channel: int = 0) -> torch.Tensor:
        """The conv of x; with first_channel > 0, x holds only the input channels from first_channel
        on, and the conv uses only their part of the weight (core.blocks.split_pool_conv: the ASPP
        bottleneck without its image-pool channels)."""
        weight = self.weight[:, first_channel:] if first_channel else self.weight
        if x.ndim != 4 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return self._conv_forward(x, weight, self.bias)
        d = self.dilation[0]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        if not needs_grad and winograd_bf16.bf16_call(x, weight) and winograd_bf16.worthwhile(self, x):
            u = self._transformed(winograd_bf16.transform_weight2, first_channel)
            return winograd_bf16.winograd2_conv2d(x.to(torch.bfloat16), u, self.bias, d)
        if (x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or winograd_gain(x.shape[2], x.shape[3], d) < MIN_GAIN):
            if d == 1:
                return self._conv_forward(x, weight, self.bias)
            return _run("channels_last", x, weight, self.bias, d)
        if needs_grad:
            self.__dict__.pop("_winograd_u", None)  # training again: the kept transform is stale
            return _WinogradConvFunction.apply(x, weight, self.bias, d)
        return winograd_conv2d(x, self._transformed(transform_weight, first_channel), self.bias, d)

    def _transformed(self, transform, first_channel: int = 0) -> torch.Tensor:
        """The kept transform of the weight's input channels from first_channel on (F(4x4) float32 or
        F(2x2) bf16), rebuilt when the weight changes in place, moves or is cast, or the other
        transform or channels are asked for. Transformed from the sliced weight, so it is contiguous
        (a sliced transform cost the bf16 GEMMs 15% more in strided reads)."""
        w = self.weight
        key = (transform.__name__, first_channel, w.device, w.dtype, w._version, w.data_ptr())
        if self.__dict__.get("_winograd_key") != key:
            self._winograd_u, self._winograd_key = transform(w[:, first_channel:]), key
        return self._winograd_u


def convert_winograd(model: nn.Module, min_channels: int = 128, max_dilation: Optional[int] = None) -> int:
    """Turn every eligible plain nn.Conv2d with at least `min_channels` input and output
    channels (and dilation at most `max_dilation`, if given) into a WinogradConv2d, in place
    (same objects, parameters and state-dict keys).
    Smaller convs are left alone: their transforms cost more than their GEMMs save (R50-D8 at
    512x1024 on the Zen 4 here, fp32, 2 threads, against oneDNN's channels_last conv: 32->32 at
    256x512 0.50x, 64->64 at 128x256 0.99x, 128->128 at 64x128 1.38x, 256->256 d2 1.87x, 512->512
    d4 2.43x, 2560->512 2.71x, the ASPP's 2048->512 d12 1.60x). Which calls of a converted conv
    run Winograd depends on the map (winograd_gain). Returns the number converted."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and WinogradConv2d.eligible(m)
                and min(m.in_channels, m.out_channels) >= min_channels
                and (max_dilation is None or m.dilation[0] <= max_dilation)):
            m.__class__ = WinogradConv2d
            count += 1
    return count


def revert_winograd(model: nn.Module) -> int:
    """Undo convert_winograd (plain nn.Conv2d again, same objects). Returns the number reverted."""
    converted = [m for m in model.modules() if type(m) is WinogradConv2d]
    for m in converted:
        m.__class__ = nn.Conv2d
        m.__dict__.pop("_winograd_u", None), m.__dict__.pop("_winograd_key", None)
    return len(converted)


def count_skipped_flops(model: nn.Module, input_shape, dtype: torch.dtype = torch.float32,
                        device_type: str = "cpu") -> int:
    """FLOPs of one training step that core.mfu's count (which sees direct convs) includes and
    the WinogradConv2d calls do not compute: per call that runs Winograd, 3 products x 2 FLOPs x
    (9 direct multiply-adds per output - 36 per 4x4 tile of every phase grid) x C x O. The
    transforms are not counted (memory-bound, a few % of the GEMMs' time). Subtract it for a true MFU."""
    if device_type != "cpu" or dtype != torch.float32:
        return 0
    from core.atrous_plan import conv_calls
    skipped = 0
    for _, m, (n, c, h, w) in conv_calls(model, input_shape, lambda m: type(m) is WinogradConv2d):
        d = m.dilation[0]
        if winograd_gain(h, w, d) >= MIN_GAIN:
            th, tw = tile_grid(h, w, d)
            skipped += 6 * c * m.out_channels * (n * h * w * 9 - 36 * n * d * d * th * tw)
    return skipped
