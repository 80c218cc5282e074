"""Conv + BN + activation blocks, and folding BN into convs for inference.

`ConvBNAct` keeps mmcv ConvModule's parameter names (`conv`, `bn`) so mmseg head checkpoints
load unchanged. Folding replaces a BN by Identity (a core.norm.BatchNormAct2d by the activation
it applied) and moves its affine transform into the conv's weight and bias; module names stay,
so a folded backbone still says `conv1`, `layer1.0.conv2`...
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from core.fused_conv import conv_relu
from core.norm import NormSpec, norm_spec
from core.winograd import WinogradConv2d

_BatchNorm = nn.modules.batchnorm._BatchNorm


class PoolBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for a tensor with one value per sample and channel ([B, C, 1, 1]).

    At batch 1 per process a plain BatchNorm2d raises ("Expected more than 1 value per channel",
    pytorch/vision issue 1667). With one value the batch statistics are the value itself and
    variance 0, so the normalised output is exactly 0 and the layer emits its bias; we compute
    that without the check and leave the running statistics alone (one sample says nothing about
    the variance). With B >= 2 this is an ordinary BatchNorm2d, so SyncBN conversion and mmseg's
    numerics are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] == 1:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            xhat = (x - mean) * torch.rsqrt(torch.zeros_like(mean) + self.eps)
            w = self.weight.view(1, -1, 1, 1) if self.weight is not None else 1.0
            b = self.bias.view(1, -1, 1, 1) if self.bias is not None else 0.0
            # Keep the input's dtype (bf16/fp16 activations with fp32 BN parameters at O2).
            return (xhat * w + b).to(x.dtype)
        return super().forward(x)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, the atrous building block of the heads.

    norm_layer: a BatchNorm class, or a core.norm.NormSpec; with a memory-saving norm the BN
    module applies the activation itself and `act` is Identity.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 dilation: int = 1, padding: Optional[int] = None, act: bool = True,
                 norm_layer: "type | NormSpec" = nn.BatchNorm2d):
        super().__init__()
        if padding is None:
            padding = (kernel_size // 2) * dilation
        norm = norm_spec(norm_layer)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, bias=False)
        self.bn = norm.bn_act(out_channels) if act else norm.bn(out_channels)
        self.act = nn.ReLU(inplace=True) if act and not norm.fuses_act else nn.Identity()

    def forward(self, x: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With `pooled` ([N, P, 1, 1]): the block of cat([pooled broadcast over x's map, x]) (split_pool_conv)."""
        if pooled is not None:
            return self.act(self.bn(split_pool_conv(self.conv, x, pooled)))
        if type(self.bn) is nn.Identity and type(self.act) is nn.ReLU:  # folded: ReLU as the conv's post-op
            return conv_relu(self.conv, x)
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> "ConvBNAct":
        """Fold the BN into the conv (inference only: uses the running statistics)."""
        if isinstance(self.bn, _BatchNorm):
            self.conv = fold_conv_bn(self.conv, self.bn)
            self.bn = folded_replacement(self.bn)
        return self


def split_pool_conv(conv: nn.Conv2d, rest: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """conv(cat([pooled broadcast to rest's H x W, rest])) for a same-padded stride-1 conv, without
    convolving the broadcast map: its channels are one constant vector p per image, so tap (i, j)
    contributes W[:, :P, i, j] @ p wherever that tap reads the image (everywhere but the border
    rows and columns of the padding). The rest is the conv over rest's channels with their part of
    the weight: 20% fewer multiply-adds in the ASPP bottleneck (512 of its 2560 input channels).
    Exact in exact arithmetic; the result has rest's memory format."""
    p_ch = pooled.shape[1]
    if isinstance(conv, WinogradConv2d):
        y = conv(rest, p_ch)
    else:
        y = conv._conv_forward(rest, conv.weight[:, p_ch:], conv.bias)
    n, _, h, w = rest.shape
    kh, kw = conv.kernel_size
    dtype = torch.promote_types(y.dtype, torch.float32)
    # taps[o, i, j, n] = W[o, :P, i, j] @ p[n] (a view of a channels_last weight; NCHW: a small copy)
    w_pool = conv.weight[:, :p_ch].permute(0, 2, 3, 1).reshape(-1, p_ch)
    taps = (w_pool.to(dtype) @ pooled.flatten(1).to(dtype).T).view(-1, kh, kw, n)
    # rows[i, y] = 1 where kernel row i reads the image at output row y; likewise columns
    rows = _tap_reads_image(h, kh, conv.padding[0], conv.dilation[0], dtype, rest.device)
    cols = _tap_reads_image(w, kw, conv.padding[1], conv.dilation[1], dtype, rest.device)
    term = torch.einsum("iy,jx,oijn->nyxo", rows, cols, taps)  # [N, H, W, O]: a channels_last [N, O, H, W]
    return y + term.permute(0, 3, 1, 2).to(y.dtype)


def _tap_reads_image(length: int, k: int, padding: int, dilation: int, dtype, device) -> torch.Tensor:
    """[k, length]: 1 where kernel row (column) i reads inside the map at output position y."""
    pos = torch.arange(length, device=device).view(1, -1) + torch.arange(k, device=device).view(-1, 1) * dilation
    pos = pos - padding
    return ((pos >= 0) & (pos < length)).to(dtype)


def folded_replacement(bn: nn.Module) -> nn.Module:
    """What takes a folded BN's place: Identity, or the activation a BatchNormAct2d applied."""
    folded = getattr(bn, "folded_activation", None)
    return folded() if folded is not None else nn.Identity()


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A conv computing conv followed by bn (in eval mode), with the BN folded into it."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {type(bn).__name__} without running statistics "
                         "(track_running_stats=False)")
    # Fold in float64 so the folded weights are as close to the two-step computation as fp32 allows.
    w = conv.weight.double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    shift = bn.bias.double() if bn.bias is not None else 0.0
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(device=conv.weight.device)
    fused.weight.copy_((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + shift).to(conv.weight.dtype))
    return fused


def conv_bn_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    """Names of (conv, bn) children of `module` where bn directly follows conv.

    Blocks declare their pairs in `CONV_BN_PAIRS` (e.g. ResNet's conv1/bn1); an nn.Sequential's
    pairs are adjacent (Conv2d, BatchNorm) children, which covers the deep stem and downsample.
    """
    declared = getattr(module, "CONV_BN_PAIRS", None)
    if declared is not None:
        return list(declared)
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        pairs = []
        for a, b in zip(names, names[1:]):
            if isinstance(module._modules[a], nn.Conv2d) and isinstance(module._modules[b], _BatchNorm):
                pairs.append((a, b))
        return pairs
    return []


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every conv+BN pair of `model` in place and put it in eval mode.

    Returns the model. The folded model gives the same outputs as the unfolded one in eval mode
    (to fp32 rounding). Training a folded model is an error: there are no BN layers left to train.
    """
    model.eval()
    for module in list(model.modules()):
        if isinstance(module, ConvBNAct):
            module.fuse()
            continue
        for conv_name, bn_name in conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                setattr(module, conv_name, fold_conv_bn(conv, bn))
                setattr(module, bn_name, folded_replacement(bn))
    model.fused = True
    return model


def count_batchnorms(modules: Iterable[nn.Module]) -> int:
    return sum(isinstance(m, _BatchNorm) for m in modules)


def mean_over_valid(x: torch.Tensor, valid_hw: Optional[torch.Tensor]) -> torch.Tensor:
    """Spatial mean [B, C, 1, 1] of x [B, C, H, W], over the top-left valid_hw[b] window.

    A mask built from aranges keeps every shape static (no slicing by data-dependent sizes), so
    graph compilers see one graph whatever the valid sizes are.
    """
    b, c, h, w = x.shape
    if valid_hw is None:
        if _nhwc(x):  # torch's mean over dims (2, 3) of NHWC memory: 32 ms against 5 ms (see _spatial_sum)
            return x.permute(0, 2, 3, 1).reshape(b, h * w, c).mean(1).view(b, c, 1, 1)
        return x.mean(dim=(2, 3), keepdim=True)  # (one ReduceMean in an ONNX export, core/onnx_export.py)
    if valid_hw.shape != (b, 2):
        raise ValueError(f"valid_hw must have shape [B, 2] = [{b}, 2], got {tuple(valid_hw.shape)}")
    vh = valid_hw[:, 0].to(device=x.device).clamp(1, h)
    vw = valid_hw[:, 1].to(device=x.device).clamp(1, w)
    rows = torch.arange(h, device=x.device).view(1, h, 1) < vh.view(b, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) < vw.view(b, 1, 1)
    mask = (rows & cols).to(x.dtype).unsqueeze(1)  # [B,1,H,W]
    total = _spatial_sum(x * mask)
    count = (vh * vw).to(x.dtype).view(b, 1, 1, 1)
    return total / count


def _nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(dim=(2, 3), keepdim=True). In NHWC memory, a sum over the rows of the [B, H*W, C] view it
    already is: torch's reduction over dims (2, 3) of that layout was 6x slower (ASPP input at
    512x1024, bf16: 32 ms against 5 ms)."""
    b, c, h, w = x.shape
    if _nhwc(x):
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c).sum(1).view(b, c, 1, 1)
    return x.sum(dim=(2, 3), keepdim=True)

