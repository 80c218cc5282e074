"""Winograd F(4x4, 3x3) inference convolution (core/winograd.py) against torch's F.conv2d in
float64, which is the independent reference here. Inputs come from the shared `rng` fixture."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.model import build_model
from smooth_model import smooth
from core.winograd import (MIN_GAIN, WinogradConv2d, convert_winograd, count_skipped_flops, transform_weight,
                           revert_winograd, winograd_conv2d, winograd_gain, winograd_weight_grad)


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape)).float()


def relative_error(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# sizes where the 4x4 tiles fit exactly, leave a remainder, or are larger than the map, and
# dilations whose phase grids are uneven (17 rows, dilation 3: phases of 6, 6 and 5 rows)
@pytest.mark.parametrize("n,c,o,h,w,d", [
    (1, 7, 5, 9, 13, 1), (2, 16, 8, 8, 8, 1), (1, 3, 2, 1, 1, 1), (2, 5, 6, 17, 10, 2),
    (1, 4, 3, 7, 30, 4), (1, 8, 8, 3, 3, 4), (1, 2, 3, 17, 9, 3), (3, 1, 1, 5, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_direct_convolution(rng, backend, n, c, o, h, w, d, channels_last):
    x, weight, bias = randn(rng, n, c, h, w), randn(rng, o, c, 3, 3), randn(rng, o)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, d, d)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = winograd_conv2d(x, transform_weight(weight), bias, d)
    assert y.shape == ref.shape
    assert relative_error(y, ref) < 2e-5
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_edge_values(rng):
    # zeros give exact zeros; a constant map and a one-hot kernel give shifted copies of x exactly
    weight = torch.zeros(2, 3, 3, 3)
    assert torch.count_nonzero(winograd_conv2d(torch.zeros(1, 3, 10, 11), transform_weight(weight))) == 0
    x = randn(rng, 1, 3, 10, 11)
    weight[0, 1, 1, 1] = 1.0  # output 0 = input channel 1
    weight[1, 2, 0, 0] = 1.0  # output 1 = input channel 2 shifted down-right by one, zero-filled
    y = winograd_conv2d(x, transform_weight(weight))
    torch.testing.assert_close(y[0, 0], x[0, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, 1, 1:, 1:], x[0, 2, :-1, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, 1, 0], torch.zeros(11), atol=1e-5, rtol=0)
    big = x * 1e4  # scale passes through: relative error as at unit scale
    w = randn(rng, 4, 3, 3, 3)
    ref = F.conv2d(big.double(), w.double(), None, 1, 1, 1)
    assert relative_error(winograd_conv2d(big, transform_weight(w)), ref) < 2e-5


def test_bad_inputs_name_what_was_expected():
    u = transform_weight(torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        winograd_conv2d(torch.zeros(3, 5, 5), u)
    with pytest.raises(ValueError, match=r"u must be \[36, 2, O\]"):
        winograd_conv2d(torch.zeros(1, 2, 5, 5), u)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        winograd_conv2d(torch.zeros(1, 3, 5, 5), u, dilation=0)
    with pytest.raises(TypeError, match="must be float32"):
        winograd_conv2d(torch.zeros(1, 3, 5, 5, dtype=torch.float64), u)
    with pytest.raises(ValueError, match=r"weight must be \[O, C, 3, 3\]"):
        transform_weight(torch.zeros(4, 3, 5, 5))


def test_model_conversion_keeps_outputs_keys_and_training(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = build_model(num_classes=5, backbone="r18", base_channels=32, output_stride=8).eval()
    plain = copy.deepcopy(model)
    converted = convert_winograd(model, min_channels=64)
    eligible = [m for m in plain.modules() if WinogradConv2d.eligible(m) and min(m.in_channels, m.out_channels) >= 64]
    assert converted == len(eligible) > 0
    assert all(type(m) is WinogradConv2d for m in model.modules() if WinogradConv2d.eligible(m)
               and min(m.in_channels, m.out_channels) >= 64)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = randn(rng, 1, 3, 64, 96)
    with torch.no_grad():
        ref, y = plain.double()(x.double()), model(x)
    for key in ref:
        assert relative_error(y[key], ref[key]) < 1e-4, key
    assert revert_winograd(model) == converted and not any(type(m) is WinogradConv2d for m in model.modules())
    assert model.state_dict().keys() == plain.state_dict().keys()
def test_weight_changes_and_low_precision_fall_back_correctly(rng):
    conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    convert_winograd(conv, min_channels=1)
    assert type(conv) is WinogradConv2d
    x = randn(rng, 1, 8, 9, 7)
    with torch.no_grad():
        conv.weight.mul_(-3.0)  # in place after conversion: the transformed weight is rebuilt
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 2, 2), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the direct conv in bf16
            assert conv(x).dtype == torch.bfloat16
        conv.to(torch.bfloat16)
        got = conv(x.bfloat16())
        torch.testing.assert_close(got, F.conv2d(x.bfloat16(), conv.weight, conv.bias, 1, 2, 2))


def test_predictions_use_it_and_agree(rng, tmp_path):
    from core.inference import Segmenter
    from core.mmseg_io import read_checkpoint
    from inference_data import ARCH, save_project_checkpoint
    arch = {**ARCH, "base_channels": 32, "output_stride": 8}  # layer3/4 and the head reach 128+ channels
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = build_model(**arch).eval()
    ckpt = read_checkpoint(save_project_checkpoint(model, str(tmp_path / "wide.pt"), **arch))
    images = [rng.integers(0, 256, (72, 100, 3), dtype="uint8") for _ in range(2)]
    fast, direct = Segmenter(ckpt, scale=None), Segmenter(ckpt, scale=None, winograd=False)
    assert fast.winograd_convs > 0 and direct.winograd_convs == 0
    for a, b in zip(fast.predict(images), direct.predict(images)):
        assert (a == b).mean() > 0.999  # float rounding may flip a near-tie
    # bf16 (cast model): the same convs converted, F(2x2) where it pays (tests/test_winograd_bf16.py)
    assert Segmenter(ckpt, scale=None, opt_level="O2", amp_dtype="bfloat16").winograd_convs == fast.winograd_convs


def test_a_compiled_model_traces_the_direct_conv(rng):
    # torch.compile keeps the library's conv (core/winograd.py says why); dynamo's eager backend
    # traces exactly what inductor would be given, without inductor's compile time
    conv = nn.Conv2d(8, 6, 3, padding=1)
    convert_winograd(conv, min_channels=1)
    x = randn(rng, 2, 8, 11, 9)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        y = torch.compile(conv, backend=backend, dynamic=False)(x)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, 1, 1, 1))
    assert len(graphs) == 1 and "conv2d" in graphs[0].code and "bmm" not in graphs[0].code


def test_gain_estimate_by_hand():
    # ASPP dilation 12 on 64x128 (a 512x1024 image at OS8). Taps at offsets -12, 0, +12 read the
    # image on 52, 64, 52 rows and 116, 128, 116 columns: (52+64+52) * (116+128+116) useful MACs
    # per channel pair. Phase grids: 64 = 12*5 + 4 rows -> 6 rows at most -> 2 tiles of 4; 128 =
    # 12*10 + 8 -> 11 columns -> 3 tiles; 144 grids * 6 tiles * 36 multiplies.
    assert winograd_gain(64, 128, 12) == pytest.approx(168 * 360 / (144 * 6 * 36))
    # dilation 36: rows 28+64+28, columns 92+128+92; grids of at most 2x4 pixels: one tile each
    assert winograd_gain(64, 128, 36) == pytest.approx(120 * 312 / (36 * 36 * 36))
    # dilation 1 on 8x8: taps read 7, 8, 7 rows and columns; 2x2 tiles
    assert winograd_gain(8, 8, 1) == pytest.approx(22 * 22 / (4 * 36))


def _ran_gemm(conv, x) -> bool:
    """Whether the forward ran Winograd's batched GEMM (seen in torch.profiler's op list)."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        y = conv(x)
    names = {e.name for e in prof.events()}
    assert y.shape[2:] == x.shape[2:]
    return "aten::bmm" in names


@pytest.mark.parametrize("channels_last", [False, True])
def test_each_call_runs_winograd_only_where_it_pays_off(rng, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ran = []
    for d, h, w in [(12, 64, 128), (36, 64, 128), (24, 32, 64), (1, 5, 5), (1, 16, 24), (2, 13, 17)]:
        conv = nn.Conv2d(8, 6, 3, padding=d, dilation=d)
        convert_winograd(conv, min_channels=1)
        x = randn(rng, 1, 8, h, w).contiguous(memory_format=fmt)
        ran.append(_ran_gemm(conv, x))
        assert ran[-1] == (winograd_gain(h, w, d) >= MIN_GAIN), (d, h, w)
        with torch.no_grad():
            y = conv(x)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, d, d)
        assert relative_error(y, ref) < 2e-5, (d, h, w)
        assert y.is_contiguous(memory_format=fmt)
    assert set(ran) == {True, False}  # both kinds of call were seen


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_training_gradients_are_as_accurate_as_the_plain_model(rng, train):
    # With gradients the converted convs run Winograd too (forward and input gradient; the weight
    # gradient is the library's). Held, like tests/test_atrous.py, to the model's own float64
    # evaluation (SiLU model: tests/smooth_model.py): no further from it than 3x the plain fp32
    # model + 5e-5 (eval) or + 3e-4 (train: batch statistics of 8x12 maps amplify rounding). Over
    # 16 seeds: eval 0.45-2.0x the plain model's error; train 0.44-4.75x, at most 3.8e-4 (Winograd's
    # transforms, constants up to 8 and 1/24, round a few times more than a direct conv).
    torch.manual_seed(int(rng.integers(1 << 31)))
    ref = smooth(build_model(num_classes=5, backbone="r18", base_channels=32, output_stride=8)).train(train)
    mine = copy.deepcopy(ref)
    assert convert_winograd(mine, min_channels=64, max_dilation=4) > 0
    x = randn(rng, 2, 3, 64, 96).contiguous(memory_format=torch.channels_last)

    def outputs_and_grads(model, inp):
        torch.manual_seed(0)  # the same dropout masks
        out = model(inp)
        loss = sum((v.double() * torch.linspace(-1, 1, v.numel(), dtype=torch.float64).view_as(v)).sum()
                   for v in out.values())
        loss.backward()
        return [out["out"].detach()] + [p.grad for p in model.parameters()]

    truth = outputs_and_grads(copy.deepcopy(ref).double(), x.double())
    ran = []
    for m in mine.modules():
        if type(m) is WinogradConv2d:
            m.register_forward_hook(lambda m, a, o: ran.append(winograd_gain(a[0].shape[2], a[0].shape[3],
                                                                             m.dilation[0]) >= MIN_GAIN))

    def error(results):
        return max(((g.double() - t).abs().max() / t.abs().max()).item()
                   for g, t in zip(results, truth) if t is not None)
    plain, converted = error(outputs_and_grads(ref, x)), error(outputs_and_grads(mine, x))
    assert any(ran)  # some convs ran Winograd with gradients
    assert converted <= 3 * plain + (3e-4 if train else 5e-5), (converted, plain)
    assert all(m.dilation[0] <= 4 for m in mine.modules() if type(m) is WinogradConv2d)


@pytest.mark.parametrize("n,c,o,h,w,d", [(1, 7, 5, 9, 13, 1), (2, 5, 6, 17, 10, 2), (1, 70, 66, 12, 20, 3),
                                         (3, 1, 1, 5, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_all_three_products_match_float64_autograd(rng, backend, n, c, o, h, w, d, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias = randn(rng, n, c, h, w), randn(rng, o, c, 3, 3), randn(rng, o)
    grad_y = randn(rng, n, o, h, w)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    F.conv2d(xd, wd, bd, 1, d, d).backward(grad_y.double())
    # the weight gradient alone, then the whole autograd Function through a converted conv
    assert relative_error(winograd_weight_grad(x.contiguous(memory_format=fmt), grad_y.contiguous(memory_format=fmt), d),
                          wd.grad) < 2e-5
    conv = nn.Conv2d(c, o, 3, padding=d, dilation=d)
    with torch.no_grad():
        conv.weight.copy_(weight), conv.bias.copy_(bias)
    convert_winograd(conv.to(memory_format=fmt), min_channels=1)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    y = conv(x)
    y.backward(grad_y)
    assert (y.grad_fn.name() == "_WinogradConvFunctionBackward") == (winograd_gain(h, w, d) >= MIN_GAIN)
    for got, want in ((y.detach(), F.conv2d(xd, wd, bd, 1, d, d)), (x.grad, xd.grad), (conv.weight.grad, wd.grad),
                      (conv.bias.grad, bd.grad)):
        assert relative_error(got, want) < 2e-5
    assert x.grad.is_contiguous(memory_format=fmt) and conv.weight.grad.is_contiguous(memory_format=fmt)


def test_skipped_flops_count_what_winograd_does_not_compute():
    model = build_model(num_classes=5, backbone="r18", base_channels=32, output_stride=8)
    assert count_skipped_flops(model, (2, 3, 64, 96)) == 0  # nothing converted
    convert_winograd(model, min_channels=128, max_dilation=4)
    # r18 base 32: layer4 (256 channels, 8x12 maps at OS8) has 3 such 3x3 convs at dilation 2 and
    # 4 (the block's first conv2 at 2, then conv1 and conv2 at 4); the 128-channel layer3 convs too
    calls = [(m.dilation[0], m.in_channels, m.out_channels) for m in model.modules() if type(m) is WinogradConv2d]
    expected = 0
    for d, c, o in calls:
        if winograd_gain(8, 12, d) >= MIN_GAIN:
            th, tw = -(-(-(-8 // d)) // 4), -(-(-(-12 // d)) // 4)
            expected += 3 * 2 * c * o * (2 * 8 * 12 * 9 - 36 * 2 * d * d * th * tw)
    assert count_skipped_flops(model, (2, 3, 64, 96)) == expected > 0
    assert count_skipped_flops(model, (2, 3, 64, 96), dtype=torch.bfloat16) == 0
    assert count_skipped_flops(model, (2, 3, 64, 96), device_type="cuda") == 0
