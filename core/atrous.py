"""Padding-aware atrous convolution: F.conv2d(x, w, b, stride=1, padding=d, dilation=d) for a
3x3 kernel without the multiply-adds that only read the zero padding.

Tap (ky, kx) reads the input at offset ((ky-1)d, (kx-1)d), so it touches the image only for
output rows in [max(0, -dy), min(H, H-dy)) (likewise columns); a tap with an empty window is
skipped. The cuts {d, H-d} x {d, W-d} split the map into at most 3x3 regions, in each of which
the taps reading the image form a fixed rectangle of the kernel, so a region is ONE product
    Y[region] = [X shifted by each of its taps, concatenated over channels] @ W[those taps]
(fp32 accumulation over all taps inside the GEMM: a bf16 output is rounded once, as the plain
conv's). grad_input is that computation on dY with the kernel flipped and channels transposed;
grad_weight is one product per tap over its window, dW_tap = dY[win]^T @ X[win shifted], and
exactly zero for a tap that never reads the image (as F.conv2d's). Mode "hybrid" (the CPU
training default) keeps the library's channels_last conv for forward and grad_input, where
oneDNN already skips padding taps, and decomposes grad_weight only (see _AtrousConv).

Memory format: NHWC inside; the result is channels_last when the input or the weight is (what
nn.Conv2d returns, so the following BN/ReLU/cat keep the model's format), NCHW otherwise.
Only torch ops: runs on any device, traces under torch.compile, and autocast behaves as for
nn.Conv2d (the conv runs in the autocast dtype; fp32 parameters get fp32 gradients).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ALGORITHMS = ("plain", "nchw", "channels_last", "taps", "hybrid")


# ---- geometry -------------------------------------------------------------------------------
def _bands(length: int, d: int) -> List[Tuple[int, int, int, int]]:
    """(start, stop, k0, k1): output rows [start, stop) where exactly taps k0..k1-1 read the image."""
    cuts = sorted({0, length, *(v for v in (d, length - d) if 0 < v < length)})
    return [(a, b, 0 if a >= d else 1, 3 if b + d <= length else 2) for a, b in zip(cuts, cuts[1:])]


def _tap_window(length: int, k: int, d: int) -> Tuple[int, int]:
    off = (k - 1) * d
    return max(0, -off), min(length, length - off)


def conv_macs(batch: int, cin: int, cout: int, h: int, w: int, dilation: int) -> Tuple[int, int]:
    """(multiply-adds of the plain 3x3 conv, multiply-adds whose input is inside the image)."""
    rows = sum(max(0, b - a) for a, b in (_tap_window(h, k, dilation) for k in range(3)))
    cols = sum(max(0, b - a) for a, b in (_tap_window(w, k, dilation) for k in range(3)))
    return batch * cin * cout * h * w * 9, batch * cin * cout * rows * cols


# ---- the three products on NHWC tensors ------------------------------------------------------
def _taps_conv(x: torch.Tensor, w: torch.Tensor, out_major: bool, bias: Optional[torch.Tensor],
               d: int) -> torch.Tensor:
    """x [N,H,W,Cin] contiguous -> y [N,H,W,Cout]. w is [Cout,3,3,Cin] (out_major) or
    [3,3,Cin,Cout], contiguous: whichever the caller has without a transposing copy."""
    n, h, w_, c = x.shape
    o = w.shape[0] if out_major else w.shape[3]
    t0 = 1 if out_major else 0  # dim of ky in w
    col_bands = _bands(w_, d)
    regions = [(rb, cb) for rb in _bands(h, d) for cb in col_bands]
    blocks: Dict[Tuple[int, int], torch.Tensor] = {}
    y = None if len(regions) == 1 else x.new_empty(n, h, w_, o)
    for (a, b, r0, r1), (e, f, c0, c1) in regions:
        parts = [x[:, a + (ky - 1) * d:b + (ky - 1) * d, e + (kx - 1) * d:f + (kx - 1) * d]
                 for ky in range(r0, r1) for kx in range(c0, c1)]
        xg = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
        xg = xg.reshape(-1, xg.shape[3])  # a view when the window is the whole contiguous map
        # xg's columns are (ky, kx, cin); w's tap rectangle in that order is a strided view when it
        # spans whole kernel rows or one row, else a per-column-range copy made once per call
        # (a copy per region cost ~6% of the 2048->512 forward at 32x64, d=12).
        if r1 - r0 == 1 or (c0, c1) == (0, 3):
            blk = w.narrow(t0, r0, r1 - r0).narrow(t0 + 1, c0, c1 - c0)
        else:
            if (c0, c1) not in blocks:
                blocks[c0, c1] = w.narrow(t0 + 1, c0, c1 - c0).contiguous()
            blk = blocks[c0, c1].narrow(t0, r0, r1 - r0)
        wg = blk.reshape(o, -1).t() if out_major else blk.reshape(-1, o)
        out = torch.mm(xg, wg) if bias is None else torch.addmm(bias, xg, wg)
        if y is None:
            return out.view(n, h, w_, o)
        y[:, a:b, e:f] = out.view(n, b - a, f - e, o)
    return y


def _taps_weight_grad(x: torch.Tensor, gy: torch.Tensor, d: int) -> torch.Tensor:
    """x [N,H,W,C], gy [N,H,W,O] (NHWC contiguous) -> dW [O,C,3,3] (memory order [3,3,O,C])."""
    n, h, w, c = x.shape
    o = gy.shape[3]
    gw = x.new_empty(3, 3, o, c)
    for ky in range(3):
        r0, r1 = _tap_window(h, ky, d)
        for kx in range(3):
            c0, c1 = _tap_window(w, kx, d)
            if r0 >= r1 or c0 >= c1:
                gw[ky, kx].zero_()  # the tap reads only padding: F.conv2d's gradient is exactly 0
                continue
            g = gy[:, r0:r1, c0:c1].reshape(-1, o)
            xs = x[:, r0 + (ky - 1) * d:r1 + (ky - 1) * d, c0 + (kx - 1) * d:c1 + (kx - 1) * d]
            torch.mm(g.t(), xs.reshape(-1, c), out=gw[ky, kx])
    return gw.permute(2, 3, 0, 1)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()  # no copy when t is channels_last already


def _to_format(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _is_channels_last(t: torch.Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


class _AtrousConv(torch.autograd.Function):
    """mode "taps": all three products by per-tap matrix products (any device). mode "hybrid":
    forward and grad_input by the library's conv in channels_last, grad_weight by taps. On the
    Zen 4 here (oneDNN 3.12, AVX-512) the channels_last forward AND backward-data kernels skip
    padding taps (2048->512 at 32x64, 1 thread: forward 843/509/189 ms, backward-data 727/589/220
    ms at d 1/12/36), backward-weights does not (1080/1023/1050 ms): only it needs the taps."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation: int, out_channels_last: bool, mode: str):
        d = dilation
        with torch.autocast(x.device.type, enabled=False):
            if mode == "hybrid":
                cl = torch.channels_last
                y = F.conv2d(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias, 1, d, d)
            else:
                y = _taps_conv(_nhwc(x), _nhwc(weight), True, bias, d).permute(0, 3, 1, 2)
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias, ctx.mode = d, bias is not None, mode
        ctx.x_channels_last = _is_channels_last(x)
        return _to_format(y, out_channels_last)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        d, cl = ctx.dilation, torch.channels_last
        gx = gw = gb = None
        with torch.autocast(grad_out.device.type, enabled=False):
            gy = _nhwc(grad_out)
            hybrid_gx = ctx.needs_input_grad[0] and ctx.mode == "hybrid"
            xc = x.contiguous(memory_format=cl) if hybrid_gx or ctx.needs_input_grad[1] else None  # <= 1 copy
            if ctx.needs_input_grad[0]:
                if hybrid_gx:
                    gx = torch.ops.aten.convolution_backward(
                        gy.permute(0, 3, 1, 2), xc, weight.contiguous(memory_format=cl),
                        None, (1, 1), (d, d), (d, d), False, (0, 0), 1, (True, False, False))[0]
                else:  # dX = the same conv of dY with the kernel flipped in space, channels transposed
                    gx = _taps_conv(gy, _nhwc(weight).permute(1, 2, 0, 3).flip(0, 1).contiguous(),
                                    False, None, d).permute(0, 3, 1, 2)
                gx = _to_format(gx, ctx.x_channels_last)
            if ctx.needs_input_grad[1]:
                gw = _taps_weight_grad(xc.permute(0, 2, 3, 1), gy, d)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = gy.sum(dim=(0, 1, 2))
        return gx, gw, gb, None, None, None


def atrous_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  dilation: int = 1, mode: str = "taps") -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride=1, padding=dilation, dilation=dilation) without the
    multiply-adds that read only padding (mode "taps" or "hybrid", see _AtrousConv). Under
    torch.autocast the inputs are cast as autocast casts conv2d's; otherwise dtypes must agree."""
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [O, {x.shape[1]}, 3, 3] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if mode not in ("taps", "hybrid"):
        raise ValueError(f"mode must be 'taps' or 'hybrid', got {mode!r}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # autocast's rule for conv2d: cast all but float64
        low = torch.get_autocast_dtype(dev)
        x, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(low) for t in (x, weight, bias))
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x ({x.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must have the same dtype")
    out_cl = _is_channels_last(x) or _is_channels_last(weight)
    return _AtrousConv.apply(x, weight, bias, dilation, out_cl, mode)


# ---- algorithm choice ------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def shape_key(shape, out_channels: int, dtype: torch.dtype, training: bool, channels_last: bool) -> str:
    """The plan's key for one call: input shape and memory format, compute dtype, train or eval."""
    n, c, h, w = shape
    fmt = "nhwc" if channels_last else "nchw"
    return f"{n}x{c}x{h}x{w}:{fmt}->{out_channels}:{str(dtype)[6:]}:{'train' if training else 'eval'}"


# Calibrated with bench/atrous.py on the Zen 4 here (batch 2, 1 thread, CPU time; R50-D8 ASPP and
# layer4 convs; "share" = MACs reading the image / plain MACs; time / oneDNN NCHW):
#   fp32 train: hybrid 0.27/0.40/0.52/0.72/0.77/0.94 at shares 21/38/51/66/66/82%, 1.03-1.05 at
#     88-97% (there 0.86-0.93x oneDNN channels_last on 1 thread, but 1.01-1.03x on 2 threads);
#     eval: channels_last 0.24/0.36/0.52/0.66/0.66/0.80, 1.03-1.05 at 88-97%.
#   bf16 train: taps 0.23/0.38/0.49 at 21/38/51% (hybrid 0.31/0.39/0.52), hybrid 0.94/0.68/0.84
#     at 66/66/82% (taps 0.95/0.68/0.87), 0.99-1.03x channels_last at 88-97%; eval: taps
#     0.21/0.37/0.56/0.83/0.73 at 21-66%, channels_last 0.79 at 82% (taps 0.82).
MAX_SHARE = 0.85              # above this: "plain"
BF16_TAPS_SHARE = (0.6, 0.7)  # bf16 at or below this share: "taps" in (train, eval)


def default_algorithm(n: int, c: int, o: int, h: int, w: int, dilation: int, device_type: str,
                      training: bool, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> str:
    """The deterministic rule: a pure function of shapes, compute dtype and device type, so every
    run (and every resume of it) makes the same choice for the same layer. (`channels_last`, the
    model's format, is part of plan keys; the measurements gave the rule no use for it yet.)

    CPU fp32: "hybrid" to train, "channels_last" for inference (oneDNN's channels_last forward
    skips padding taps itself); CPU bf16: the same, or "taps" when the share is small enough;
    above MAX_SHARE, fp16 (not measured) and other devices: "plain", the model's own format
    (cuDNN / CANN are the baseline off the CPU; measure_plan can choose otherwise from timings)."""
    plain, needed = conv_macs(n, c, o, h, w, dilation)
    if device_type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or needed > MAX_SHARE * plain:
        return "plain"
    if dtype == torch.bfloat16 and needed <= BF16_TAPS_SHARE[0 if training else 1] * plain:
        return "taps"
    return "hybrid" if training else "channels_last"


@torch.compiler.disable
def _atrous_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], d: int,
                  algorithm: str) -> torch.Tensor:
    # torch 2.13's inductor miscompiles the backward of a graph holding _AtrousConv: every
    # gradient of the model came out zero (aot_eager was right). Run it eagerly between compiled
    # graphs instead; tests/test_launch_run.py's compile test guards the losses.
    return atrous_conv2d(x, weight, bias, d, algorithm)


def _run(algorithm: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         d: int) -> torch.Tensor:
    if algorithm in ("taps", "hybrid"):
        return _atrous_eager(x, weight, bias, d, algorithm)
    if algorithm == "plain":
        return F.conv2d(x, weight, bias, 1, d, d)
    cl_out = _is_channels_last(x) or _is_channels_last(weight)
    if algorithm not in ("nchw", "channels_last"):
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    fmt = torch.channels_last if algorithm == "channels_last" else torch.contiguous_format
    y = F.conv2d(x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt), bias, 1, d, d)
    return y.contiguous(memory_format=torch.channels_last if cl_out else torch.contiguous_format)


def same_padded_3x3(m: nn.Module) -> bool:
    """An nn.Conv2d computing F.conv2d(x, w, b, stride=1, padding=d, dilation=d) with a 3x3 kernel:
    the convolutions core/atrous.py and core/winograd.py can take over."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and m.dilation[0] == m.dilation[1]
            and m.padding == m.dilation)


class PaddingAwareConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding == dilation > 1, groups 1) whose forward picks, per input
    shape, one of ALGORITHMS: "plain" (F.conv2d on the tensors as given, i.e. disabled), "nchw" /
    "channels_last" (the library's conv in that memory format, converting in and out), "taps" or
    "hybrid" (see _AtrousConv). Same parameters, buffers and state-dict keys as nn.Conv2d.

    The choice is `algorithm` when set (benchmarks; "plain" disables), else `plan[shape_key]`
    (measured by measure_plan, persisted by the caller), else default_algorithm (deterministic).
    """
    algorithm: Optional[str] = None

    @staticmethod
    def eligible(m: nn.Module) -> bool:
        return same_padded_3x3(m) and m.dilation[0] > 1

    def choose(self, x: torch.Tensor) -> str:
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        cl = _is_channels_last(x) or _is_channels_last(self.weight)
        return self.choice(tuple(x.shape), _compute_dtype(x), x.device.type, training, cl)

    def choice(self, shape, dtype: torch.dtype, device_type: str, training: bool, channels_last: bool) -> str:
        if self.algorithm is not None:
            return self.algorithm
        found = getattr(self, "plan", {}).get(shape_key(shape, self.out_channels, dtype, training, channels_last))
        if found is not None:
            return found
        n, c, h, w = shape
        return default_algorithm(n, c, self.out_channels, h, w, self.dilation[0], device_type, training, dtype,
                                 channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.device.type == "meta":
            return super().forward(x)  # unbatched input; meta runs (FLOP counting) see the plain conv
        return _run(self.choose(x), x, self.weight, self.bias, self.dilation[0])


def convert_atrous(model: nn.Module, algorithm: Optional[str] = None) -> int:
    """Turn every eligible plain nn.Conv2d of `model` into a PaddingAwareConv2d, in place, and set
    `algorithm` (None: plan / rule; "plain": disabled) on every converted conv, old or new. An ASPP
    head's bottleneck also stops convolving the image-pool branch's constant map (core.blocks.split_pool_conv;
    off with "plain").

    The module object itself changes class, so names, Parameter objects (hence optimizer state,
    DDP buckets, hooks), requires_grad, device and dtype all stay; no weights are initialised, so
    the global RNG is untouched. Returns the number newly converted."""
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be None or one of {ALGORITHMS}, got {algorithm!r}")
    count = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and PaddingAwareConv2d.eligible(m):
            m.__class__, m.plan = PaddingAwareConv2d, {}
            count += 1
        if isinstance(m, PaddingAwareConv2d):
            m.algorithm = algorithm
        if hasattr(m, "split_pool"):  # core.heads.ASPPHead: its bottleneck skips the constant image-pool map
            m.split_pool = algorithm != "plain"
    return count


def revert_atrous(model: nn.Module) -> int:
    """Undo convert_atrous (plain nn.Conv2d again, same objects). Returns the number reverted."""
    converted = [m for m in model.modules() if type(m) is PaddingAwareConv2d]
    for m in converted:
        m.__class__ = nn.Conv2d
        m.__dict__.pop("plan", None), m.__dict__.pop("algorithm", None)
    for m in model.modules():
        if hasattr(m, "split_pool"):
            m.split_pool = False
    return len(converted)
