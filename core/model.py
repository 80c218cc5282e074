"""DeepLabV3 = dilated ResNet + ASPP decode head (+ FCN auxiliary head), and `build_model`.

State-dict keys follow mmsegmentation 1.x's EncoderDecoder exactly (`backbone.*`,
`decode_head.*`, `auxiliary_head.*`), so an mmseg DeepLabV3 checkpoint loads with strict matching.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.backbone import ResNet
from core.heads import ASPPHead, FCNHead
from core.norm import NORMS, norm_spec

# mmseg configs: R50/R101 use ASPP channels 512 and aux 256; R18/R34 use 128 and 64
# (configs/deeplabv3/deeplabv3_r18-d8_*.py).
HEAD_CHANNELS = {18: (128, 64), 34: (128, 64), 50: (512, 256), 101: (512, 256)}
ASPP_DILATIONS = {8: (1, 12, 24, 36), 16: (1, 6, 12, 18)}
BACKBONES = {"r18": 18, "r34": 34, "r50": 50, "r101": 101}


class DeepLabV3(nn.Module):
    def __init__(self, backbone: ResNet, decode_head: ASPPHead, auxiliary_head: Optional[FCNHead]):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.output_stride = backbone.output_stride

    def forward(self, x: torch.Tensor, valid_hw: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """x: float [B,3,H,W]. valid_hw: optional int [B,2], the unpadded (h, w) of each image.

        Returns {'out': logits [B,K,H,W]} and, in training mode with an aux head, 'aux' too.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be [B, 3, H, W], got {tuple(x.shape)}")
        size = x.shape[-2:]
        feats = self.backbone(x)
        feat_valid = None
        if valid_hw is not None:
            # Each stride-2 layer maps n pixels to ceil(n/2), so the valid part of the stride-s
            # feature map is ceil(valid / s), exactly the unpadded image's feature size.
            feat_valid = torch.div(valid_hw + (self.output_stride - 1), self.output_stride,
                                   rounding_mode="floor")
        out = {"out": _upsample(self.decode_head(feats[3], feat_valid), size)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = _upsample(self.auxiliary_head(feats[2]), size)
        return out


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def parse_backbone(name: str):
    """'r50' -> (50, deep_stem=True); 'r50-v1b' -> (50, deep_stem=False)."""
    base, _, style = name.lower().partition("-")
    if base not in BACKBONES or style not in ("", "v1c", "v1b"):
        names = ", ".join(sorted(BACKBONES) + [f"{k}-v1b" for k in sorted(BACKBONES)])
        raise ValueError(f"backbone must be one of {names}; got {name!r}")
    return BACKBONES[base], style != "v1b"


def build_model(backbone: str = "r50", output_stride: int = 8, num_classes: int = 19,
                aux_head: bool = True, pretrained: Optional[str] = None,
                norm_layer: Optional[type] = None, base_channels: int = 64,
                dropout: float = 0.1, norm: str = "bn") -> DeepLabV3:
    """Build any DeepLabV3 variant.

    backbone: r18, r34, r50, r101 (ResNetV1c deep stem) or r18-v1b ... r101-v1b (7x7 stem).
    pretrained: a local backbone checkpoint (mmcv resnet*_v1c or torchvision resnet layout).
    base_channels: width of the first stage (64 in the paper); smaller values give tiny models
        for tests; head widths scale with it.
    norm: one of core.norm.NORMS. 'bn' (default) is mmseg's BatchNorm + ReLU; 'inplace-abn' and
        'inplace-abn-residual' save activation memory with leaky ReLU (see core/norm.py for what
        that changes). Same state-dict keys for every choice. norm_layer replaces nn.BatchNorm2d
        for norm='bn'.
    """
    depth, deep_stem = parse_backbone(backbone)
    if output_stride not in ASPP_DILATIONS:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    norm_layer = norm_spec(norm, norm_layer)
    net = ResNet(depth=depth, deep_stem=deep_stem, output_stride=output_stride,
                 base_channels=base_channels, norm_layer=norm_layer)
    aspp_ch, aux_ch = (c * base_channels // 64 for c in HEAD_CHANNELS[depth])
    c2, c3, c4, c5 = net.stage_channels
    decode = ASPPHead(c5, aspp_ch, num_classes, ASPP_DILATIONS[output_stride], dropout, norm_layer)
    aux = FCNHead(c4, aux_ch, num_classes, dropout=dropout, norm_layer=norm_layer) if aux_head else None
    model = DeepLabV3(net, decode, aux)
    if pretrained:
        from core.pretrained import load_backbone
        load_backbone(model.backbone, pretrained)
    return model
