"""One training step and the evaluation loop.

`train_one_step` is the same code for every opt level (core/amp.py decides what autocast /
backward / unscale_ / step do) and every world size: after backward it makes ONE small
all-reduce of [non-finite flag, stop flag, losses], so all ranks skip a bad step together, stop
at the same iteration after a signal, and report the global mean loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from core.amp import Amp
from core.distributed import all_reduce_sum_, collective_device, world_size
from core.metrics import ConfusionMatrix

# mmseg's Normalize for Cityscapes (RGB order, applied after the BGR->RGB swap).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


@dataclass
class StepResult:
    loss: float
    parts: Dict[str, float] = field(default_factory=dict)
    skipped: bool = False   # non-finite loss or gradient somewhere: no update was made
    stop: bool = False      # some rank was asked to stop (signal): every rank stops now


def to_model_input(image: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32,
                   channels_last: bool = True) -> torch.Tensor:
    """uint8 BGR [B,H,W,3] -> normalised RGB [B,3,H,W] `dtype` on `device`.

    The uint8 batch crosses to the device (4x fewer bytes than float) and is normalised there.
    On the CPU the fused kernel ops.normalize does it in one pass straight from the loader's
    shared-memory slot, writing channels_last memory directly when asked (no second copy).
    """
    if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [B,H,W,3] image batch, got {image.dtype} {tuple(image.shape)}")
    if device.type == "cpu":
        from kernels import ops
        out_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = ops.normalize(image, MEAN_RGB, STD_RGB, to_rgb=True, dtype=out_dtype, memory_format=memory_format)
        return x.to(dtype)  # no-op unless float16 was asked for (keeps the memory format)
    return normalize_with_torch(image.to(device, non_blocking=True), dtype, channels_last)


def normalize_with_torch(image: torch.Tensor, dtype: torch.dtype = torch.float32,
                         channels_last: bool = True) -> torch.Tensor:
    """The accelerator path of to_model_input, on whatever device `image` is (uint8 BGR NHWC)."""
    mean = torch.tensor(MEAN_RGB, device=image.device)
    inv_std = 1.0 / torch.tensor(STD_RGB, device=image.device)
    x = image.flip(-1)  # BGR -> RGB, still NHWC
    x = ((x.float() - mean) * inv_std).to(dtype).permute(0, 3, 1, 2)  # NHWC memory = channels_last
    return x if channels_last else x.contiguous()


def train_one_step(model: torch.nn.Module, batch, amp: Amp, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                   device: torch.device, channels_last: bool = True, stop_requested: bool = False,
                   timer: Optional[Callable[[str], None]] = None) -> StepResult:
    """Forward, fp32 loss, backward, agree across ranks, then step (or skip a non-finite step).

    `batch` is the loader's Batch: batch.to(device) gives the tensors (async copies from pinned
    slots on accelerators, the slots themselves on the CPU) and batch.release() after the loss
    hands the slot back, once nothing reads it any more (the loader knows when a copy is done).
    `timer(phase)`, if given, is called at the end of each phase (profiling only; see
    profiling/phases.py); without it the step has no extra synchronisation.
    """
    image, label = batch.to(device)
    x = to_model_input(image, device, amp.input_dtype, channels_last)
    if timer is not None:
        timer("input")
    with amp.autocast():
        outputs = model(x)
    loss, parts = loss_fn(outputs, label)
    batch.release()  # the input is normalised and the labels are in the loss: the slot may refill now
    if timer is not None:
        timer("forward")
    amp.backward(loss)
    if timer is not None:
        timer("backward")
    amp.unscale_(optimizer)
    bad = ~(torch.isfinite(loss.detach()) & amp.grads_finite().to(loss.device))
    names = sorted(parts)
    flags = torch.stack([bad.float(), torch.tensor(float(stop_requested), device=loss.device),
                         loss.detach().float()] + [parts[k].detach().float() for k in names])
    world = world_size()
    all_reduce_sum_(flags)
    values = flags.tolist()  # the step's one host sync: every rank needs the verdict to continue
    if timer is not None:
        timer("communication")
    skipped, stop = values[0] > 0, values[1] > 0
    if not skipped:
        amp.step(optimizer)
    amp.update()
    amp.zero_grad(model, optimizer)
    if timer is not None:
        timer("optimizer")
    return StepResult(loss=values[2] / world, parts={k: v / world for k, v in zip(names, values[3:])},
                      skipped=skipped, stop=stop)


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: Amp, num_classes: int,
             ignore_index: int = 255, mode: str = "whole", tile: Optional[Tuple[int, int]] = None,
             stride: Optional[Tuple[int, int]] = None, channels_last: bool = True,
             max_images: int = 0) -> np.ndarray:
    """Confusion matrix of `model` (not DDP-wrapped) over `loader`, summed over all ranks.

    The val loader gives fixed-size slots: image [1,H,W,3] with meta['valid_hw'] = the (resized)
    image's size, label [1,H,W] padded with the ignore index, meta['ori_hw'] = its real size.
    Logits of the valid image region are resized to the label's size before the argmax (mmseg).
    whole: the full slot (static shape) with the padding zeroed and valid_hw passed to the model;
    slide: fixed tiles over the valid region (padded when smaller), averaged where they overlap.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and tile is None:
        raise ValueError("slide evaluation needs a tile size (--eval-tile or --crop)")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    try:
        for i, batch in enumerate(loader):
            if max_images and i >= max_images:
                break
            if batch.image.shape[0] != 1:
                raise ValueError(f"evaluation expects batches of one image, got {batch.image.shape[0]}")
            full_hw = tuple(batch.image.shape[1:3])
            vh, vw = _meta_hw(batch.meta, "valid_hw", full_hw)
            oh, ow = _meta_hw(batch.meta, "ori_hw", tuple(batch.label.shape[1:3]))
            image, _ = batch.to(device)
            x = to_model_input(image, device, amp.input_dtype, channels_last)
            with amp.autocast():
                if mode == "whole":
                    logits = whole_inference(model, x, (vh, vw))[:, :, :vh, :vw]
                else:
                    logits = slide_inference(model, x[:, :, :vh, :vw], num_classes, tile,
                                             stride or _default_stride(tile))
            if logits.shape[-2:] != (oh, ow):
                logits = F.interpolate(logits.float(), size=(oh, ow), mode="bilinear", align_corners=False)
            pred = logits.argmax(dim=1).to(torch.uint8 if num_classes <= 255 else torch.int64)
            cm.update(pred[0].cpu(), batch.label[0, :oh, :ow])  # the host label, read before release
            batch.release()
    finally:
        model.train(was_training)
    cm.all_reduce(collective_device(device))
    return cm.matrix


def whole_inference(model: torch.nn.Module, x: torch.Tensor, valid_hw: Tuple[int, int],
                    multiple: int = 32) -> torch.Tensor:
    """Logits [B,K,H',W'] (fp32) of x padded to a multiple of 32; the region past valid_hw is
    zeroed (mmseg pads after normalisation with 0) and the model told its valid size."""
    b, _, h, w = x.shape
    vh, vw = valid_hw
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1) < vh
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w) < vw
    x = x * (rows & cols).to(x.dtype)
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    valid = torch.tensor([[vh, vw]] * b, dtype=torch.int64, device=x.device)
    return model(x, valid_hw=valid)["out"].float()


def slide_inference(model: torch.nn.Module, x: torch.Tensor, num_classes: int, tile: Tuple[int, int],
                    stride: Tuple[int, int]) -> torch.Tensor:
    """mmseg's slide mode with every tile exactly `tile` in size (static shapes)."""
    b, _, h, w = x.shape
    th, tw = tile
    sh, sw = stride
    if sh <= 0 or sw <= 0:
        raise ValueError(f"slide stride must be positive, got {stride}")
    ph, pw = max(th - h, 0), max(tw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    rows = max(H - th + sh - 1, 0) // sh + 1
    cols = max(W - tw + sw - 1, 0) // sw + 1
    summed = torch.zeros(b, num_classes, H, W, device=x.device, dtype=torch.float32)
    count = torch.zeros(1, 1, H, W, device=x.device, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, H - th), min(c * sw, W - tw)
            valid = torch.tensor([[min(th, h - y1), min(tw, w - x1)]] * b, dtype=torch.int64, device=x.device)
            out = model(x[:, :, y1:y1 + th, x1:x1 + tw], valid_hw=valid)["out"].float()
            summed[:, :, y1:y1 + th, x1:x1 + tw] += out
            count[:, :, y1:y1 + th, x1:x1 + tw] += 1
    return (summed / count)[:, :, :h, :w]


def _meta_hw(meta: dict, key: str, default: Tuple[int, int]) -> Tuple[int, int]:
    value = meta.get(key) if isinstance(meta, dict) else None
    if value is None:
        return default
    h, w = (int(v) for v in torch.as_tensor(value).reshape(-1, 2)[0].tolist())
    return h, w


def _default_stride(tile: Tuple[int, int]) -> Tuple[int, int]:
    return (max(1, tile[0] * 2 // 3), max(1, tile[1] * 2 // 3))
