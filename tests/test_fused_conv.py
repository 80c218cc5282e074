"""core/fused_conv.py: oneDNN's conv with ReLU / residual-add post-ops against the unfused torch ops
(the independent reference), in float32 and bfloat16, NCHW and channels_last; the cases that
must keep the unfused ops (gradients wanted, convs that are not plain nn.Conv2d)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.atrous import PaddingAwareConv2d
from core.fused_conv import conv_add_relu, conv_relu

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape)).float()


CONVS = [dict(kernel_size=1), dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=3, padding=1, bias=False)]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_the_unfused_ops(rng, spec, dtype, channels_last):
    conv = nn.Conv2d(6, 10, **spec).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv.to(memory_format=fmt)
    x = randn(rng, 2, 6, 13, 10).to(dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        y = conv(x)
        other = randn(rng, *y.shape).to(dtype)  # the shortcut, in NCHW whatever x's format
        # float32: the same products and sums; bf16: the fused add rounds once where the
        # unfused ops round the conv's output and then the sum
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        got = conv_relu(conv, x)  # fused in channels_last, the unfused ops in NCHW
        torch.testing.assert_close(got, torch.relu(y), **tol)
        assert got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(conv_add_relu(conv, x, other), torch.relu(y + other), **tol)
        assert conv_relu(conv, x).min() >= 0


def test_calls_that_need_gradients_keep_the_unfused_ops(rng):
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x, other = randn(rng, 1, 4, 7, 8).requires_grad_(), randn(rng, 1, 5, 7, 8).requires_grad_()
    y = conv_add_relu(conv, x, other)
    y.sum().backward()
    x2, o2 = x.detach().clone().requires_grad_(), other.detach().clone().requires_grad_()
    ref = torch.relu(F.conv2d(x2, conv.weight, conv.bias, 1, 1) + o2)
    torch.testing.assert_close(y, ref)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(other.grad, o2.grad)
    assert conv_relu(conv, x).requires_grad


def test_subclassed_convs_keep_their_own_forward(rng):
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    conv.__class__ = PaddingAwareConv2d  # as core.atrous.convert_atrous does
    conv.algorithm = "taps"
    calls = []
    original = PaddingAwareConv2d.forward

    def spy(self, x):
        calls.append(x.shape)
        return original(self, x)

    PaddingAwareConv2d.forward = spy
    try:
        x = randn(rng, 1, 4, 9, 9)
        with torch.no_grad():
            y = conv_relu(conv, x)
    finally:
        PaddingAwareConv2d.forward = original
    assert calls == [x.shape]
    torch.testing.assert_close(y, torch.relu(F.conv2d(x, conv.weight, conv.bias, 1, 2, 2)), rtol=1e-5, atol=1e-5)
