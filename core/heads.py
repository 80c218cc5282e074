"""DeepLabV3's ASPP decode head and the FCN auxiliary head, with mmseg 1.x parameter names.

The ASPP here is accelerator-friendly: the image-pool branch is a (masked) mean over the spatial
dims and a broadcast back, instead of AdaptiveAvgPool2d(1) + bilinear upsampling from 1x1, so
every shape is static for a fixed input size, and with `valid_hw` the pooled features of a padded
batch equal those of the unpadded images ("padded pooling").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from core.atrous import _is_channels_last
from core.blocks import ConvBNAct, PoolBatchNorm2d, mean_over_valid
from core.norm import NormSpec, norm_spec


class ImagePool(nn.Module):
    """Global-context branch. Index 1 holds the 1x1 ConvBNAct, as mmseg's
    `image_pool = Sequential(AdaptiveAvgPool2d(1), ConvModule(...))`, so keys read
    `image_pool.1.conv.weight`."""

    def __init__(self, in_channels: int, channels: int, norm_layer):
        super().__init__()
        self.add_module("0", nn.Identity())  # placeholder for mmseg's pooling layer (no params)
        norm = norm_spec(norm_layer)
        # One value per channel at batch 1: PoolBatchNorm2d handles it (BatchNormAct2d does itself).
        if norm.norm == "bn" and norm.bn_class is nn.BatchNorm2d:
            norm = NormSpec("bn", PoolBatchNorm2d)
        self.add_module("1", ConvBNAct(in_channels, channels, 1, norm_layer=norm))

    def pooled(self, x: torch.Tensor, valid_hw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The branch's features before the broadcast: [N, channels, 1, 1]."""
        return self._modules["1"](mean_over_valid(x, valid_hw))

    def forward(self, x: torch.Tensor, valid_hw: Optional[torch.Tensor] = None) -> torch.Tensor:
        feat = self.pooled(x, valid_hw).expand(-1, -1, x.shape[2], x.shape[3])
        if _is_channels_last(x):
            # torch.cat takes its output's memory format from this first branch, and a broadcast
            # view counts as NCHW: the ASPP's concat (and the bottleneck conv reading it) would then
            # run NCHW in a channels_last model (a 2560-channel copy, 100 ms at 512x1024 here).
            feat = feat.contiguous(memory_format=torch.channels_last)
        return feat


class ASPPHead(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 dilations: Sequence[int] = (1, 12, 24, 36), dropout: float = 0.1,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.image_pool = ImagePool(in_channels, channels, norm_layer)
        self.aspp_modules = nn.ModuleList(
            ConvBNAct(in_channels, channels, 1 if d == 1 else 3, dilation=d,
                      padding=0 if d == 1 else d, norm_layer=norm_layer)
            for d in dilations)
        self.bottleneck = ConvBNAct((len(dilations) + 1) * channels, channels, 3, norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        _init_classifier(self.conv_seg)
        # Set by core.atrous.convert_atrous (work that need not be done): the bottleneck then convolves
        # only the other branches, and adds the image-pool branch's exact contribution
        # (core.blocks.split_pool_conv).
        self.split_pool = False

    def forward(self, x: torch.Tensor, valid_hw: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.split_pool:
            rest = torch.cat([m(x) for m in self.aspp_modules], dim=1)
            out = self.bottleneck(rest, self.image_pool.pooled(x, valid_hw))
        else:
            branches = [self.image_pool(x, valid_hw)]
            branches.extend(m(x) for m in self.aspp_modules)
            out = self.bottleneck(torch.cat(branches, dim=1))
        return self.conv_seg(self.dropout(out))


class FCNHead(nn.Module):
    """mmseg's FCNHead with num_convs=1, concat_input=False (the DeepLabV3 auxiliary head)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 dropout: float = 0.1, norm_layer=nn.BatchNorm2d):
        super().__init__()
        convs = [ConvBNAct(in_channels if i == 0 else channels, channels, 3, norm_layer=norm_layer)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        _init_classifier(self.conv_seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


def _init_classifier(conv: nn.Conv2d) -> None:
    # mmseg BaseDecodeHead: normal_init(conv_seg, mean=0, std=0.01), bias 0.
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)


def count_split_pool_flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one training step that the plain model computes and split_pool_conv does not: per
    ASPP head with split_pool, 3 products (forward, input and weight gradient) x 2 FLOPs x the
    bottleneck's multiply-adds over the image-pool channels (N H W kh kw P O; the taps' own
    products are O kh kw P N, not counted)."""
    from core.atrous_plan import conv_calls
    skipped = 0
    for _, head, (n, _, h, w) in conv_calls(model, input_shape, lambda m: getattr(m, "split_pool", False)):
        conv, pool = head.bottleneck.conv, head.image_pool._modules["1"].conv
        kh, kw = conv.kernel_size
        skipped += 6 * n * h * w * kh * kw * pool.out_channels * conv.out_channels
    return skipped
