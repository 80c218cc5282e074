"""Winograd F(2x2, 3x3) in bfloat16 (core/winograd_bf16.py) against torch's F.conv2d in float64 on
bf16-exact inputs (the independent reference), next to oneDNN's own bf16 conv; when a converted
conv runs it; the cached transform across dtypes; predictions of a bf16 model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core.winograd_bf16 as wb
from core.winograd import convert_winograd
from core.winograd_bf16 import transform_weight2, winograd2_conv2d, winograd2_gain

pytestmark = pytest.mark.usefixtures("one_thread")


def bf16(rng, *shape, scale=1.0):
    return (torch.from_numpy(rng.standard_normal(shape)).float() * scale).bfloat16()


def norm_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def everywhere(monkeypatch):
    """Let every bf16 call of a converted conv run Winograd, whatever its size or the CPU (the
    thresholds are speed decisions, tested by bench/infer.py; the results must not depend on them)."""
    monkeypatch.setattr(wb, "MIN_CHANNELS", 1)
    monkeypatch.setattr(wb, "MIN_GAIN", 0.0)
    monkeypatch.setattr(wb, "_bf16_kernels", lambda: True)


# tiles that fit, leave a remainder or exceed the map; uneven phase grids; channels across 64-blocks
@pytest.mark.parametrize("n,c,o,h,w,d", [
    (1, 7, 5, 9, 13, 1), (2, 16, 8, 8, 8, 1), (1, 3, 2, 1, 1, 1), (2, 5, 6, 17, 10, 2),
    (1, 70, 9, 7, 30, 4), (1, 8, 8, 3, 3, 4), (1, 96, 130, 17, 9, 3), (3, 1, 1, 5, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_direct_convolution_within_bf16_error(rng, backend, n, c, o, h, w, d, channels_last):
    x, weight, bias = torch.relu(bf16(rng, n, c, h, w)), bf16(rng, o, c, 3, 3, scale=0.2), bf16(rng, o)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, d, d)  # exact for these inputs
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = winograd2_conv2d(x, transform_weight2(weight), bias, d)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # V, U, M and Y are each rounded to bf16 once (u = 2^-8 relative) and the transforms add and
    # subtract up to 4 terms, so an output's error is a small multiple of u times the magnitude of
    # what it sums (the direct conv's: within 1 u; Winograd's worst over 1200 random cases here: 11.6 u)
    magnitude = F.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs(), 1, d, d)
    assert ((y.double() - ref).abs() <= 24 * 2.0 ** -8 * magnitude).all()


def test_chunks_of_tile_rows_give_the_same_result(rng, monkeypatch):
    x, weight = bf16(rng, 2, 20, 23, 11), bf16(rng, 6, 20, 3, 3)
    u = transform_weight2(weight)
    whole = winograd2_conv2d(x, u, None, 2)
    monkeypatch.setattr(wb, "_CHUNK", 16 * 20 * 2 * 4 * 6)  # one tile row of every phase grid per chunk
    assert torch.equal(winograd2_conv2d(x, u, None, 2), whole)


def test_zeros_give_zeros_and_bad_inputs_name_what_was_expected():
    u = transform_weight2(torch.randn(4, 3, 3, 3))
    assert u.dtype == torch.bfloat16 and u.shape == (16, 3, 4)
    assert torch.count_nonzero(winograd2_conv2d(torch.zeros(1, 3, 6, 7, dtype=torch.bfloat16), u)) == 0
    with pytest.raises(TypeError, match="must be bfloat16"):
        winograd2_conv2d(torch.zeros(1, 3, 5, 5), u)
    with pytest.raises(ValueError, match=r"u must be \[16, 2, O\]"):
        winograd2_conv2d(torch.zeros(1, 2, 5, 5, dtype=torch.bfloat16), u)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        winograd2_conv2d(torch.zeros(1, 3, 5, 5, dtype=torch.bfloat16), u, dilation=0)
    with pytest.raises(ValueError, match=r"weight must be \[O, C, 3, 3\]"):
        transform_weight2(torch.zeros(4, 3, 1, 1))


def test_gain_estimate_by_hand():
    # 64x128 (a 512x1024 image at OS8), dilation 1: taps read 63+64+63 rows and 127+128+127 columns;
    # 32x64 tiles of 2x2, 16 multiplies each
    assert winograd2_gain(64, 128, 1) == pytest.approx(190 * 382 / (32 * 64 * 16))
    # dilation 12: rows 52+64+52, columns 116+128+116; 144 phase grids of at most 6x11 pixels -> 3x6 tiles
    assert winograd2_gain(64, 128, 12) == pytest.approx(168 * 360 / (144 * 18 * 16))
    # dilation 36: rows 28+64+28, columns 92+128+92; 1296 grids of at most 2x4 pixels -> 1x2 tiles
    assert winograd2_gain(64, 128, 36) == pytest.approx(120 * 312 / (1296 * 2 * 16))


def test_a_converted_conv_runs_it_for_bf16_inference_only(rng, everywhere):
    conv = nn.Conv2d(6, 5, 3, padding=2, dilation=2)
    convert_winograd(conv, min_channels=1)
    x = torch.randn(1, 6, 9, 11)
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 2, 2)
        # fp32: F(4x4), float32 accurate
        assert norm_error(conv(x), ref) < 1e-5
        # autocast to bf16 (O1): F(2x2) on the bf16 input, the weight's transform rounded once
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, winograd2_conv2d(x.bfloat16(), transform_weight2(conv.weight), conv.bias, 2))
        assert norm_error(conv(x), ref) < 1e-5  # back to fp32: the F(4x4) transform again, not the bf16 one
        conv.to(torch.bfloat16)  # a cast model (O2/O3)
        xb = x.bfloat16()
        assert torch.equal(conv(xb), winograd2_conv2d(xb, transform_weight2(conv.weight), conv.bias, 2))
    # a call that needs gradients runs the direct conv, with its gradients
    xg = xb.clone().requires_grad_()
    y = conv(xg)
    assert y.requires_grad
    torch.testing.assert_close(y, F.conv2d(xb, conv.weight, conv.bias, 1, 2, 2))
    y.float().sum().backward()
    assert xg.grad is not None and conv.weight.grad is not None


def test_without_bf16_kernels_or_below_the_thresholds_the_direct_conv_runs(rng, monkeypatch):
    conv = nn.Conv2d(8, 8, 3, padding=1).bfloat16()
    convert_winograd(conv, min_channels=1)
    x = bf16(rng, 1, 8, 12, 12)
    direct = F.conv2d(x, conv.weight, conv.bias, 1, 1, 1)
    monkeypatch.setattr(wb, "MIN_CHANNELS", 1)
    monkeypatch.setattr(wb, "_bf16_kernels", lambda: False)  # an AVX2-only CPU: bf16 GEMMs are emulated
    with torch.no_grad():
        assert torch.equal(conv(x), direct)
        monkeypatch.setattr(wb, "_bf16_kernels", lambda: True)
        assert not torch.equal(conv(x), direct)  # Winograd now (different rounding, same conv)
        monkeypatch.setattr(wb, "MIN_CHANNELS", 9)
        assert torch.equal(conv(x), direct)


def test_bf16_predictions_use_it_and_agree_with_the_direct_bf16_model(rng, tmp_path, everywhere):
    from core.inference import Segmenter
    from core.mmseg_io import read_checkpoint
    from core.model import build_model
    from inference_data import ARCH, save_project_checkpoint
    arch = {**ARCH, "base_channels": 32, "output_stride": 8}
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = build_model(**arch).eval()
    ckpt = read_checkpoint(save_project_checkpoint(model, str(tmp_path / "wide.pt"), **arch))
    images = [rng.integers(0, 256, (72, 100, 3), dtype="uint8") for _ in range(2)]
    level = {"opt_level": "O2", "amp_dtype": "bfloat16", "scale": None}
    fast, direct = Segmenter(ckpt, **level), Segmenter(ckpt, winograd=False, **level)
    exact = Segmenter(ckpt, scale=None, winograd=False)
    assert fast.winograd_convs > 0 and direct.winograd_convs == 0
    fast_maps, direct_maps, exact_maps = fast.predict(images), direct.predict(images), exact.predict(images)
    for a, b, e in zip(fast_maps, direct_maps, exact_maps):
        # a random model's logits are near ties, so bf16 flips some pixels either way: Winograd's
        # bf16 model must agree with fp32 about as well as the direct bf16 model does
        assert (a == e).mean() > (b == e).mean() - 0.03
        assert (a == b).mean() > 0.9
