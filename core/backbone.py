"""Dilated ResNet backbones with mmseg's parameter names.

ResNetV1c (deep stem: three 3x3 convs 32-32-64, names `stem.0`..`stem.7`) and ResNetV1b (one 7x7
conv, names `conv1`/`bn1`, the torchvision layout), depths 18/34/50/101, output stride 8
(strides 1,2,1,1 / dilations 1,1,2,4) or 16 (strides 1,2,2,1 / dilations 1,1,1,2), with mmseg's
contract_dilation: the first block of a dilated stage uses half the stage's dilation.
Style "pytorch": the stride sits on the 3x3 conv of a bottleneck.

`norm_layer` is a BatchNorm class or a core.norm.NormSpec (the `norm` choice of build_model). With
a memory-saving norm the BN modules apply the activation themselves (the blocks' ReLU is then
skipped there), and with inplace-abn-residual the last BN of a block also takes the shortcut.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from core.fused_conv import conv_add_relu, conv_relu
from core.norm import norm_spec

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}

# (strides, dilations) per output stride, mmseg's R50-D8 / R50-D16 configs.
OUTPUT_STRIDES = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _Block(nn.Module):
    def _set_norm(self, norm_layer) -> None:
        norm = norm_spec(norm_layer)
        self.fused_act, self.fused_residual = norm.fuses_act, norm.fuses_residual
        self.relu = nn.ReLU(inplace=True)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        # A fused norm has applied the activation already.
        return x if self.fused_act else self.relu(x)

    def _add_act(self, bn: nn.Module, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        if self.fused_residual:
            return bn(out, identity)  # BN, + shortcut, leaky ReLU: one op that keeps only its output
        return self.relu(bn(out) + identity)

    # conv -> BN -> act, and conv -> BN -> + shortcut -> act. Once BN is folded into the conv
    # (core.blocks.fuse_for_inference: Identity in its place), the ReLU and the add become the
    # conv's post-ops (core/fused_conv.py).
    def _conv_act(self, conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(bn) is nn.Identity and not self.fused_act:
            return conv_relu(conv, x)
        return self._act(bn(conv(x)))

    def _conv_add_act(self, conv: nn.Module, bn: nn.Module, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        if type(bn) is nn.Identity and not self.fused_residual and not self.fused_act:
            return conv_add_relu(conv, x, identity)
        return self._add_act(bn, conv(x), identity)


class BasicBlock(_Block):
    expansion = 1
    CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer):
        super().__init__()
        norm = norm_spec(norm_layer)
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm.bn_act(planes)
        # mmseg's BasicBlock dilates only its first conv.
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm.bn_add_act(planes)
        self._set_norm(norm)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._conv_act(self.conv1, self.bn1, x)
        return self._conv_add_act(self.conv2, self.bn2, out, identity)


class Bottleneck(_Block):
    expansion = 4
    CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer):
        super().__init__()
        norm = norm_spec(norm_layer)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm.bn_act(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm.bn_act(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm.bn_add_act(planes * self.expansion)
        self._set_norm(norm)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._conv_act(self.conv1, self.bn1, x)
        out = self._conv_act(self.conv2, self.bn2, out)
        return self._conv_add_act(self.conv3, self.bn3, out, identity)


def _make_layer(block: type, inplanes: int, planes: int, blocks: int, stride: int, dilation: int,
                contract_dilation: bool, norm_layer) -> Tuple[nn.Sequential, int]:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            norm_spec(norm_layer).bn(planes * block.expansion))
    first_dilation = dilation // 2 if (contract_dilation and dilation > 1) else dilation
    layers = [block(inplanes, planes, stride, first_dilation, downsample, norm_layer)]
    inplanes = planes * block.expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes, 1, dilation, None, norm_layer))
    return nn.Sequential(*layers), inplanes


class ResNet(nn.Module):
    """Returns the four stage outputs (C2..C5) for the heads."""

    def __init__(self, depth: int = 50, deep_stem: bool = True, output_stride: int = 8,
                 base_channels: int = 64, contract_dilation: bool = True,
                 norm_layer=nn.BatchNorm2d, in_channels: int = 3):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {sorted(OUTPUT_STRIDES)}, got {output_stride}")
        if base_channels < 2 or base_channels % 2:
            raise ValueError(f"base_channels must be an even number >= 2, got {base_channels}")
        kind, stage_blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        strides, dilations = OUTPUT_STRIDES[output_stride]
        self.depth, self.deep_stem, self.output_stride = depth, deep_stem, output_stride
        norm = norm_layer = norm_spec(norm_layer)

        def act() -> nn.Module:  # a fused norm applies the activation itself
            return nn.Identity() if norm.fuses_act else nn.ReLU(inplace=True)

        stem = base_channels
        if deep_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem // 2, 3, stride=2, padding=1, bias=False),
                norm.bn_act(stem // 2), act(),
                nn.Conv2d(stem // 2, stem // 2, 3, padding=1, bias=False),
                norm.bn_act(stem // 2), act(),
                nn.Conv2d(stem // 2, stem, 3, padding=1, bias=False),
                norm.bn_act(stem), act())
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm.bn_act(stem)
            self.relu = act()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        inplanes = stem
        self.stage_channels: List[int] = []
        for i, (n, s, d) in enumerate(zip(stage_blocks, strides, dilations)):
            layer, inplanes = _make_layer(block, inplanes, base_channels * 2 ** i, n, s, d,
                                          contract_dilation, norm_layer)
            self.add_module(f"layer{i + 1}", layer)
            self.stage_channels.append(inplanes)
        self._init_weights()

    CONV_BN_PAIRS = (("conv1", "bn1"),)  # only present for the 7x7 stem; checked by type when folding

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


def stage_channels(depth: int, base_channels: int = 64) -> Sequence[int]:
    kind, _ = DEPTHS[depth]
    expansion = 1 if kind == "basic" else 4
    return tuple(base_channels * 2 ** i * expansion for i in range(4))
