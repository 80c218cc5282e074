"""A small synthetic Cityscapes-layout dataset and a tiny DeepLabV3 checkpoint that predicts
something non-trivial, shared by the predict / export / mmseg-interop tests.

The checkpoint is cheap to make and deterministic: a random-init r18 at base width 8 whose 1x1
classifier (decode_head.conv_seg) is fitted by logistic regression on the frozen features of the
training images. That takes well under a second (no backward through the network) and gives a
model that separates sky, road and buildings with IoUs far from 0 and far from 100.
"""
import glob
import os

import numpy as np
import torch
import torch.nn.functional as F

from core import build_model
from data_loader.decode import read_image_bgr, read_label
from data_loader.synthetic import generate

SIZE = (128, 64)  # (width, height) of the synthetic images
ARCH = {"backbone": "r18", "output_stride": 8, "num_classes": 19, "base_channels": 8}


def make_dataset(root: str, num_train: int = 4, num_val: int = 6) -> str:
    return generate(root, num_train, num_val, size=SIZE)


def train_pairs(root: str):
    images = sorted(glob.glob(os.path.join(root, "leftImg8bit", "train", "*", "*.png")))
    labels = [p.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep)
              .replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png") for p in images]
    return (torch.from_numpy(np.stack([read_image_bgr(p) for p in images])),
            torch.from_numpy(np.stack([read_label(p) for p in labels])))


@torch.no_grad()
def _features(model, image_bgr):
    from core.engine import to_model_input
    seen = []
    hook = model.decode_head.conv_seg.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    try:
        model(to_model_input(image_bgr, torch.device("cpu"), channels_last=False))
    finally:
        hook.remove()
    return seen[0]


def fitted_model(root: str, seed: int = 0, steps: int = 150):
    """The tiny model with its classifier fitted on the training images (see module doc)."""
    torch.manual_seed(seed)
    model = build_model(**ARCH).eval()
    image, label = train_pairs(root)
    feats = _features(model, image)  # [B, C, h, w] at 1/8 resolution
    target = F.interpolate(label[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    y = target.reshape(-1)
    keep = y != 255
    x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0) + 1e-6
    weight = torch.zeros(ARCH["num_classes"], x.shape[1], requires_grad=True)
    bias = torch.zeros(ARCH["num_classes"], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy((x - mean) / std @ weight.T + bias, y).backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the 1x1 conv
        w = weight / std
        model.decode_head.conv_seg.weight.copy_(w[:, :, None, None])
        model.decode_head.conv_seg.bias.copy_(bias - (w * mean).sum(1))
    return model


def save_project_checkpoint(model, path: str, **config) -> str:
    """A checkpoint laid out like launch/run.py's checkpoint_state (the parts readers use)."""
    cfg = {**ARCH, "eval_scale": None, "eval_mode": "whole", "crop": [64, 128], **config}
    torch.save({"meta": {"iteration": 1, "config": cfg, "world_size": 1, "format": 1},
                "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}, path)
    return path
