"""Loading pretrained weights from local files.

Backbone checkpoints: mmcv's `resnet50_v1c` layout (`stem.0.weight`, `layer1.0.conv1.weight`,
optionally under `state_dict` or with a `backbone.` prefix) and torchvision's ResNet layout
(`conv1.weight`, `bn1.*`, `layer1.0.downsample.0.weight`), which is the same naming as our V1b
backbone. ImageNet classifier weights (`fc.*`) are dropped. Whole-model checkpoints: mmseg 1.x
DeepLabV3 state dicts load as they are. Files are read with torch.load(weights_only=True) and,
when that refuses a class of another library (mmengine-saved files), with the restricted
unpickler of core/safe_pickle.py; no code from a file runs either way.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("module.", "backbone.")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint file, unwrapped from the usual containers."""
    from core.safe_pickle import safe_load
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist")
    obj = safe_load(path).obj  # ValueError naming the file when it cannot be read
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict of tensors "
                         f"(top-level type {type(obj).__name__})")
    return dict(obj)


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Load an ImageNet backbone (mmcv V1c or torchvision layout) into `backbone`, strictly."""
    sd = _strip_prefixes(read_state_dict(path))
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    load_strict(backbone, sd, path, what="backbone")


def load_model_checkpoint(model: nn.Module, path: str) -> None:
    """Load a whole-model checkpoint (ours or mmseg's DeepLabV3) strictly."""
    sd = read_state_dict(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    load_strict(model, sd, path, what="model")


def load_strict(module: nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs {what} {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path!r} does not match the {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title} keys: {shown}")
        if any(k.startswith("stem.") for k in unexpected) and any(k.startswith("conv1.") for k in missing):
            lines.append("  (a V1c deep-stem checkpoint given to a V1b backbone: use e.g. backbone='r50')")
        if any(k.startswith("conv1.") for k in unexpected) and any(k.startswith("stem.") for k in missing):
            lines.append("  (a V1b/torchvision checkpoint given to a V1c backbone: use e.g. backbone='r50-v1b')")
        raise ValueError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def pretrained_notice(cfg, resuming: bool = False):
    """The line to print when the Cityscapes recipe starts with a randomly initialised backbone
    (None otherwise). mmseg's 79.09 mIoU (deeplabv3_r50-d8, 40k iterations) is trained from
    ImageNet weights (its config's `pretrained='open-mmlab://resnet50_v1c'`)."""
    if getattr(cfg, "preset", None) != "cityscapes" or resuming:
        return None
    if getattr(cfg, "pretrained", None) or getattr(cfg, "load_from", None):
        return None
    return ("note: no --pretrained backbone: training starts from random weights. The published 79.09 mIoU "
            "(mmseg deeplabv3_r50-d8, 40k iterations, Cityscapes val) assumes an ImageNet-pretrained ResNetV1c "
            "(mmcv's resnet50_v1c); pass --pretrained FILE (mmcv resnet*_v1c, or a torchvision resnet* with "
            "--backbone r50-v1b) to reproduce it, or --load-from FILE to start from a whole trained model.")
