"""Eager CPU inference: a folded conv with its ReLU (and a residual add) fused into oneDNN's conv.

After BN folding a ResNet block is conv(+bias) -> ReLU and conv(+bias) -> + shortcut -> ReLU. Run
eagerly, the ReLU and the add are separate passes over the output (at 512x1024 they were 90 ms of a
2.0 s bf16 forward on the Zen 4 here). oneDNN applies them as post-ops while the conv's output tile is
still in cache: torch.ops.mkldnn._convolution_pointwise, the op inductor's freezing pass
emits for the same pattern (torch/_inductor/fx_passes/mkldnn_fusion.py). Measured per layer at
64x128 (bf16, 2 threads): 1x1 2048->512 + ReLU 44.1 -> 40.4 ms, 1x1 512->2048 + add + ReLU 73.3 ->
62.1 ms; float32 141.8 -> 118.8 ms. In bf16 the fused add rounds once instead of twice.

Only where it cannot change what autograd or a compiler sees: a plain nn.Conv2d (the Winograd and
padding-aware subclasses keep their own algorithms), on the CPU, channels_last float32 or bfloat16
input matching the weight, no gradient wanted, not under autocast, not while torch.compile traces (inductor fuses
the same pattern itself). Everywhere else: the unfused ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fusable(conv: nn.Module, x: torch.Tensor, *others: torch.Tensor) -> bool:
    # channels_last only: oneDNN's NCHW bf16 path has no add + ReLU post-op in torch 2.13
    # ("Unsupported datatype for add_relu"), and NCHW is not the fast layout on the CPU anyway
    return (type(conv) is nn.Conv2d and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.dtype == conv.weight.dtype and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad
                                                  or any(o.requires_grad for o in others)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available())


def _args(conv: nn.Conv2d):
    return conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_relu(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x))."""
    if not _fusable(conv, x):
        return F.relu(conv(x), inplace=True)
    weight, bias, padding, stride, dilation, groups = _args(conv)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                   "relu", [], "")


def conv_add_relu(conv: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + other), other of conv(x)'s shape (a residual block's shortcut)."""
    if not _fusable(conv, x, other) or other.dtype != x.dtype:
        return F.relu(conv(x) + other, inplace=True)
    weight, bias, padding, stride, dilation, groups = _args(conv)
    # the output takes x's memory format; a shortcut in another format is converted by oneDNN
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, weight, bias, padding, stride, dilation,
                                                          groups, "add", 1.0, "relu", [], "")
