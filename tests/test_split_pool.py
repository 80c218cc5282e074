"""The ASPP bottleneck without the image-pool branch's constant map (core.blocks.split_pool_conv,
switched on by core.atrous.convert_atrous): against the plain conv of the concatenation in float64
(the independent reference), forward and gradients, for plain and Winograd convs, with padded
pooling; the FLOPs it skips, counted by hand."""
import copy

import pytest
import torch
from torch import nn

from core.atrous import convert_atrous, revert_atrous
from core.blocks import split_pool_conv
from core.heads import ASPPHead, count_split_pool_flops
from core.model import build_model
from core.winograd import convert_winograd

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(rng, *shape, dtype=torch.float64):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@pytest.mark.parametrize("k,dilation", [(3, 1), (3, 2), (3, 5), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_conv_of_the_concatenation_with_gradients(rng, k, dilation, channels_last):
    conv = nn.Conv2d(13, 6, k, padding=dilation * (k // 2), dilation=dilation).double()
    rest, pooled = randn(rng, 2, 9, 7, 11), randn(rng, 2, 4, 1, 1)
    if channels_last:
        rest = rest.contiguous(memory_format=torch.channels_last)
    rest.requires_grad_(), pooled.requires_grad_()
    got = split_pool_conv(conv, rest, pooled)
    gy = randn(rng, *got.shape)
    got_grads = torch.autograd.grad(got, (rest, pooled, conv.weight, conv.bias), gy)
    full = torch.cat([pooled.expand(-1, -1, 7, 11), rest], dim=1)
    want = conv(full)
    want_grads = torch.autograd.grad(want, (rest, pooled, conv.weight, conv.bias), gy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_winograd_bottleneck_convolves_only_the_other_channels(rng):
    conv = nn.Conv2d(12, 8, 3, padding=1)
    convert_winograd(conv, min_channels=1)
    rest, pooled = randn(rng, 1, 9, 10, 13, dtype=torch.float32), randn(rng, 1, 3, 1, 1, dtype=torch.float32)
    seen = []
    conv.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = split_pool_conv(conv, rest, pooled)
        assert seen == [(1, 9, 10, 13)]  # Winograd ran on the 9 channels only
        want = conv.double()(torch.cat([pooled.expand(-1, -1, 10, 13), rest], 1).double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_convert_atrous_switches_the_head_and_outputs_stay(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = build_model(num_classes=5, backbone="r18", base_channels=8, output_stride=8).double().eval()
    plain = copy.deepcopy(model)
    x = randn(rng, 2, 3, 40, 56)
    valid = torch.tensor([[40, 56], [33, 41]])  # padded pooling: the second image is smaller
    convert_atrous(model)
    assert model.decode_head.split_pool and not plain.decode_head.split_pool
    with torch.no_grad():
        got, want = model.decode_head(model.backbone(x)[-1], valid), plain.decode_head(plain.backbone(x)[-1], valid)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x)["out"], plain(x)["out"], rtol=1e-10, atol=1e-10)
    assert model.state_dict().keys() == plain.state_dict().keys()
    convert_atrous(model, algorithm="plain")
    assert not model.decode_head.split_pool
    convert_atrous(model)
    revert_atrous(model)
    assert not model.decode_head.split_pool


def test_skipped_flops_by_hand():
    model = build_model(num_classes=5, backbone="r18", base_channels=8, output_stride=8)
    head = model.decode_head
    assert isinstance(head, ASPPHead)
    assert count_split_pool_flops(model, (2, 3, 64, 96)) == 0  # not converted: nothing skipped
    convert_atrous(model)
    # OS8: the head sees 8x12; its image pool has 16 channels here (channels = 2 * base), the
    # bottleneck 3x3 outputs 16: 3 products x 2 FLOPs x (2 * 8 * 12) pixels x 9 taps x 16 x 16
    p, o = head.image_pool._modules["1"].conv.out_channels, head.bottleneck.conv.out_channels
    assert (p, o) == (16, 16)
    assert count_split_pool_flops(model, (2, 3, 64, 96)) == 6 * (2 * 8 * 12) * 9 * 16 * 16
