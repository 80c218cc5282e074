"""Segmentation loss: cross-entropy with an ignore label, main head + weighted auxiliary head.

Always computed in fp32 (logits are cast up), whatever the model's precision.

Normalisation (`avg_non_ignore`): mmseg's CrossEntropyLoss default (avg_non_ignore=False)
averages the per-pixel losses over *all* pixels, ignored pixels counting as 0, while
torch's `cross_entropy(ignore_index=...)` mean divides by the valid pixels only. We default to
mmseg's so loss curves compare with theirs.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def pixel_ce(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
             avg_non_ignore: bool = False) -> torch.Tensor:
    """Mean CE of logits [B,K,h,w] (any float dtype) against label [B,H,W] (integer).

    Logits are bilinearly resized to the label's size first (align_corners=False, as mmseg).
    """
    if logits.ndim != 4 or label.ndim != 3 or logits.shape[0] != label.shape[0]:
        raise ValueError(f"expected logits [B,K,H,W] and label [B,H,W]; got {tuple(logits.shape)} "
                         f"and {tuple(label.shape)}")
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    label = label.long()
    total = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    if avg_non_ignore:
        # An all-ignore batch gives 0 rather than 0/0 = NaN (which would count as a bad step).
        count = (label != ignore_index).sum().clamp_min(1)
    else:
        count = label.numel()
    return total / count


def seg_loss(outputs: Dict[str, torch.Tensor], label: torch.Tensor, aux_weight: float = 0.4,
             ignore_index: int = 255, avg_non_ignore: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss and its parts {'loss_decode', 'loss_aux'} (aux only when the model gave one)."""
    parts = {"loss_decode": pixel_ce(outputs["out"], label, ignore_index, avg_non_ignore)}
    total = parts["loss_decode"]
    if "aux" in outputs:
        parts["loss_aux"] = pixel_ce(outputs["aux"], label, ignore_index, avg_non_ignore)
        total = total + aux_weight * parts["loss_aux"]
    return total, parts
