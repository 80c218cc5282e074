"""Padding-aware atrous convolution (core/atrous.py) against torch's own F.conv2d.

Every expected value comes from F.conv2d / nn.Conv2d (oneDNN or torch's reference kernels), never
from core.atrous itself. Inputs are drawn from the shared `rng` fixture (its seed is printed).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import atrous, atrous_plan
from core.atrous import PaddingAwareConv2d, atrous_conv2d, convert_atrous
from core.model import build_model
from smooth_model import smooth


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(rng, *shape, dtype=torch.float32):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def conv_and_grads(fn, x, w, b, gy):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


# (batch, cin, cout, H, W, dilation). Where the taps fall:
CASES = [
    (2, 5, 7, 9, 11, 2),    # all taps read the image, edges partly padding
    (3, 3, 4, 13, 40, 12),  # upper/lower taps read one row; left/right taps most columns
    (1, 4, 6, 5, 7, 8),     # d >= H, W: only the centre tap ever reads the image
    (2, 4, 3, 8, 8, 4),     # d == H - d: bands meet, no all-taps region
    (2, 6, 5, 32, 64, 36),  # the issue's geometry: rows never, columns partly
    (3, 3, 5, 1, 1, 2),     # 1x1 map
    (1, 2, 3, 7, 1, 3),     # one column, odd height
    (2, 3, 2, 3, 17, 5),    # odd sizes, d between H and W
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}o{}_{}x{}_d{}".format(*c))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", ["taps", "hybrid"])
def test_outputs_and_all_gradients_match_conv2d_fp32(rng, case, channels_last, bias, mode):
    n, c, o, h, w, d = case
    x, wt, gy = randn(rng, n, c, h, w), randn(rng, o, c, 3, 3), randn(rng, n, o, h, w)
    b = randn(rng, o) if bias else None
    if channels_last:
        x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    ref = conv_and_grads(lambda x, w, b: F.conv2d(x, w, b, 1, d, d), x, wt, b, gy)
    got = conv_and_grads(lambda x, w, b: atrous_conv2d(x, w, b, d, mode), x, wt, b, gy)
    # Each value is a sum of products summed in another order; both results are within a few
    # fp32 ulps of the sum of the products' absolute values (S, from F.conv2d on |inputs| in fp64).
    bounds = conv_and_grads(lambda x, w, b: F.conv2d(x, w, b, 1, d, d), x.double().abs(), wt.double().abs(),
                            None if b is None else b.double().abs(), gy.double().abs())
    for name, r, g, s in zip(("output", "grad_input", "grad_weight", "grad_bias"), ref, got, bounds):
        if r is None:
            assert g is None
            continue
        err = (g.double() - r.double()).abs()
        assert bool((err <= 8 * torch.finfo(torch.float32).eps * s).all()), \
            f"{name}: error up to {err.max().item():.3g}, more than 8 fp32 ulps of the absolute sum"
    y = got[0]
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("mode", ["taps", "hybrid"])
def test_only_the_gradients_asked_for(rng, mode):
    x, wt = randn(rng, 2, 3, 7, 9), randn(rng, 4, 3, 3, 3)
    for x_grad in (True, False):
        xi, wi = x.clone().requires_grad_(x_grad), wt.clone().requires_grad_(not x_grad)
        ri, rw = x.clone().requires_grad_(x_grad), wt.clone().requires_grad_(not x_grad)
        atrous_conv2d(xi, wi, None, 3, mode).square().sum().backward()
        F.conv2d(ri, rw, None, 1, 3, 3).square().sum().backward()
        assert (xi.grad is None) == (ri.grad is None) and (wi.grad is None) == (rw.grad is None)
        got, want = (xi.grad, ri.grad) if x_grad else (wi.grad, rw.grad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_taps_reading_only_padding_get_exactly_zero_weight_gradient(rng):
    x, wt, gy = randn(rng, 2, 3, 6, 20, dtype=torch.float64), randn(rng, 4, 3, 3, 3, dtype=torch.float64), \
        randn(rng, 2, 4, 6, 20, dtype=torch.float64)
    ref = conv_and_grads(lambda x, w, b: F.conv2d(x, w, b, 1, 7, 7), x, wt, None, gy)
    got = conv_and_grads(lambda x, w, b: atrous_conv2d(x, w, b, 7), x, wt, None, gy)
    assert torch.count_nonzero(ref[2][:, :, (0, 2), :]) == 0  # rows 6 < d=7: upper/lower taps
    assert torch.equal(got[2][:, :, (0, 2), :], ref[2][:, :, (0, 2), :])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 5, 2), (2, 2, 2, 3, 3, 2), (1, 1, 2, 5, 2, 3)])
@pytest.mark.parametrize("mode", ["taps", "hybrid"])
def test_gradcheck_float64(rng, shape, mode):
    n, c, o, h, w, d = shape
    x = randn(rng, n, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    wt = randn(rng, o, c, 3, 3, dtype=torch.float64).requires_grad_()
    b = randn(rng, o, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: atrous_conv2d(x, w, b, d, mode), (x, wt, b))


def _pair(rng, c=6, o=5, d=4, algorithm="taps"):
    ref = nn.Conv2d(c, o, 3, padding=d, dilation=d, bias=True)
    with torch.no_grad():
        ref.weight.copy_(randn(rng, o, c, 3, 3) * 0.3)
        ref.bias.copy_(randn(rng, o))
    mine = copy.deepcopy(ref)
    assert convert_atrous(mine, algorithm=algorithm) == 1
    return ref, mine


@pytest.mark.parametrize("algorithm", ["taps", "hybrid"])
def test_bf16_autocast_behaves_like_nn_conv2d(rng, algorithm):
    # Both run bf16 x bf16 products with fp32 accumulation and round the output once; they differ
    # by summation order only: at most ~1 bf16 ulp (2^-8) of the largest value; allow 2 (8e-3).
    ref, mine = _pair(rng, algorithm=algorithm)
    x = randn(rng, 2, 6, 9, 10)
    outs = []
    for m in (ref, mine):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert m.weight.grad.dtype == torch.float32 and xi.grad.dtype == torch.float32
        outs.append((y.float(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, rtol=8e-3, atol=8e-3 * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["taps", "hybrid"])
def test_low_precision_weights_like_amp_o2(rng, dtype, algorithm):
    ref, mine = _pair(rng, algorithm=algorithm)
    ref.to(dtype), mine.to(dtype)
    x = randn(rng, 1, 6, 7, 12).to(dtype)
    outs = []
    for m in (ref, mine):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.float().square().sum().backward()
        assert y.dtype == m.weight.grad.dtype == xi.grad.dtype == dtype
        outs.append((y.float(), xi.grad.float(), m.weight.grad.float(), m.bias.grad.float()))
    # Low-precision products with fp32 accumulation, rounded once: within a few ulps (2^-8 for
    # bf16, 2^-11 for fp16; 1.4e-3 seen for fp16 over 20 seeds) of the largest value; allow 8e-3.
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, rtol=8e-3, atol=8e-3 * r.abs().max().item())


def test_mismatched_dtypes_and_bad_shapes_are_clear_errors(rng):
    x, wt = randn(rng, 1, 3, 5, 5), randn(rng, 2, 3, 3, 3)
    with pytest.raises(TypeError, match="weight"):
        atrous_conv2d(x, wt.double(), None, 2)
    with pytest.raises(ValueError, match="weight"):
        atrous_conv2d(x, randn(rng, 2, 4, 3, 3), None, 2)
    with pytest.raises(ValueError, match="x must be"):
        atrous_conv2d(x[0], wt, None, 2)
    with pytest.raises(ValueError, match="dilation"):
        atrous_conv2d(x, wt, None, 0)
    with pytest.raises(ValueError, match="algorithm"):
        convert_atrous(nn.Conv2d(3, 3, 3, padding=2, dilation=2), algorithm="fast")


def _tiny_model(seed):
    torch.manual_seed(seed)
    return build_model("r18", base_channels=8, output_stride=8, num_classes=5)


def test_convert_keeps_parameters_state_and_rng(rng):
    model = _tiny_model(int(rng.integers(1 << 31)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    model.backbone.layer4[1].conv1.weight.requires_grad_(False)
    rng_state = torch.get_rng_state()
    n = convert_atrous(model)
    assert torch.equal(torch.get_rng_state(), rng_state)
    # r18 OS8 with contract_dilation: layer3.0 d=1, layer3.1 d=2, layer4.0 d=2, layer4.1 d=4
    # (BasicBlock dilates conv1 only), plus ASPP's three dilated branches.
    names = [k for k, m in model.named_modules() if isinstance(m, PaddingAwareConv2d)]
    assert n == len(names) == 6 and "decode_head.aspp_modules.3.conv" in names
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert not model.backbone.layer4[1].conv1.weight.requires_grad
    assert atrous.revert_atrous(model) == 6 and not any(isinstance(m, PaddingAwareConv2d) for m in model.modules())


def test_converted_model_loads_unconverted_checkpoint_strictly(tmp_path):
    src, dst = _tiny_model(1), _tiny_model(2)
    convert_atrous(dst)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    dst.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    src.load_state_dict(dst.state_dict(), strict=True)  # and back


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_levels_on_a_converted_model(rng, level):
    # core.amp: O1 = bf16 autocast with fp32 weights, O2 = bf16 model with fp32 BN and masters.
    # The numbers are checked per layer above (bf16 agreement with nn.Conv2d); a whole bf16 tiny
    # random model is 27-45% (of the largest output) away from its float64 evaluation whether
    # converted or not, so here: the converted convs run in bf16 with the bf16 rule's choices.
    from core.amp import Amp
    model = _tiny_model(7)
    assert convert_atrous(model) == 6
    amp = Amp(level, "cpu", torch.bfloat16)
    amp.prepare(model)
    seen = []
    for m in model.modules():
        if isinstance(m, PaddingAwareConv2d):
            m.register_forward_hook(lambda m, args, out: seen.append((m.choose(args[0]), out.dtype)))
    with amp.autocast():
        out = model(randn(rng, *MODEL_INPUT).to(amp.input_dtype))
    sum(v.float().square().mean() for v in out.values()).backward()
    assert len(seen) == 6 and all(dtype == torch.bfloat16 for _, dtype in seen)
    assert {a for a, _ in seen} <= {"taps", "hybrid", "plain"} and "taps" in {a for a, _ in seen}
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


def _outputs_and_grads(model, x):
    torch.manual_seed(0)  # the same Dropout2d masks in every run
    out = model(x)
    loss = sum((v.double() * torch.linspace(-1, 1, v.numel(), dtype=torch.float64).view_as(v)).sum()
               for v in out.values())
    loss.backward()
    # (in eval mode the auxiliary head does not run: its parameters get no gradient)
    return [out["out"].detach()] + [p.grad for p in model.parameters()]


# 112x208 -> 14x26 features: ASPP d=12 partly in the padding, d=24 rows never / columns partly,
# d=36 never; layer3 (d=2) and layer4 (d=4) partly.
MODEL_INPUT = (2, 3, 112, 208)


@pytest.mark.parametrize("algorithm", ["taps", "hybrid", None, "nchw"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_converted_model_matches_unconverted_float64(rng, algorithm, train):
    # In float64 the only difference is summation order: agreement to ~1e-13 shows the
    # decomposition computes the same function (and gradients) as the plain convs.
    ref = _tiny_model(int(rng.integers(1 << 31))).double().train(train)
    mine = copy.deepcopy(ref)
    convert_atrous(mine, algorithm=algorithm)
    x = randn(rng, *MODEL_INPUT, dtype=torch.float64).to(memory_format=torch.channels_last)
    for r, g in zip(_outputs_and_grads(ref, x), _outputs_and_grads(mine, x)):
        assert (r is None) == (g is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9 * r.abs().max().item())


@pytest.mark.parametrize("algorithm", ["taps", None])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_converted_model_float32_is_as_accurate_as_unconverted(rng, algorithm, train):
    # Held to the model's own float64 evaluation: no further from it than 2x the plain fp32 model's
    # error + 5e-5 (over 53 seeds the plain model was 1.5e-6 to 3.5e-4 away; the converted one
    # reached at most 0.8 of this bound), on the SiLU model of tests/smooth_model.py.
    ref = smooth(_tiny_model(int(rng.integers(1 << 31)))).train(train)
    mine = copy.deepcopy(ref)
    convert_atrous(mine, algorithm=algorithm)
    x = randn(rng, *MODEL_INPUT).to(memory_format=torch.channels_last)
    truth = _outputs_and_grads(copy.deepcopy(ref).double(), x.double())

    def error(results):
        return max(((g.double() - t).abs().max() / t.abs().max()).item()
                   for g, t in zip(results, truth) if t is not None)
    plain, converted = error(_outputs_and_grads(ref, x)), error(_outputs_and_grads(mine, x))
    assert converted <= 2 * plain + 5e-5, (converted, plain)


def test_repeated_forward_and_backward_are_bit_identical(rng):
    _, mine = _pair(rng, c=8, o=8, d=3)
    x = randn(rng, 2, 8, 11, 13).requires_grad_()
    runs = []
    for _ in range(2):
        y = mine(x)
        y.backward(torch.ones_like(y))
        runs.append((y.detach(), x.grad.clone(), mine.weight.grad.clone()))
        x.grad = mine.weight.grad = mine.bias.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_default_rule_and_plan_round_trip(rng):
    # The rule is a function of shapes, dtype and device only, so a resumed run chooses what the
    # first run chose; these are the choices bench/atrous.py measured as fastest on the Zen 4.
    rule = atrous.default_algorithm
    assert rule(2, 2048, 512, 32, 64, 36, "cpu", True) == "hybrid"             # 21% of MACs needed
    assert rule(2, 2048, 512, 32, 64, 36, "cpu", False) == "channels_last"
    assert rule(2, 2048, 512, 32, 64, 36, "cpu", True, torch.bfloat16) == "taps"
    assert rule(2, 2048, 512, 64, 128, 12, "cpu", True, torch.bfloat16) == "hybrid"  # 82%
    assert rule(2, 512, 512, 32, 64, 4, "cpu", True) == "plain"                 # 88%
    assert rule(2, 2048, 512, 32, 64, 36, "cuda", True) == "plain"
    conv = nn.Conv2d(16, 8, 3, padding=36, dilation=36)
    convert_atrous(conv)
    x = torch.zeros(2, 16, 32, 64, requires_grad=True)
    assert conv.choose(x) == "hybrid"
    with torch.no_grad():  # inference
        assert conv.choose(x) == "channels_last"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.choose(x) == "taps"
    model = _tiny_model(3)
    convert_atrous(model)
    rng_state = torch.get_rng_state()
    plan = atrous_plan.measure_plan(model, (2, 3, 32, 48), training=True, repeats=1)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert set(plan) == {k for k, m in model.named_modules() if isinstance(m, PaddingAwareConv2d)}
    assert all(a in atrous.ALGORITHMS for entry in plan.values() for a in entry.values())
    other = _tiny_model(3)
    convert_atrous(other)
    atrous_plan.set_plan(other, plan)
    assert atrous_plan.get_plan(other) == plan
    with pytest.raises(KeyError, match="backbone.nope"):
        atrous_plan.set_plan(other, {"backbone.nope": {}})
    with pytest.raises(ValueError, match="fast"):
        atrous_plan.set_plan(other, {next(iter(plan)): {"2x8x4x6->8:float32:train": "fast"}})


def test_count_skipped_macs_matches_the_issue():
    with torch.device("meta"):
        model = build_model("r50", output_stride=8)
    for crop, skipped in (((256, 512), 0.587), ((512, 1024), 0.339)):
        layers = atrous_plan.count_skipped_macs(model, (2, 3) + crop)["layers"]
        aspp = [v for k, v in layers.items() if k.startswith("decode_head.")]
        assert len(aspp) == 3
        plain = sum(p for p, _ in aspp)
        assert 2 * 2048 * 512 * 9 * (crop[0] // 8) * (crop[1] // 8) * 3 == plain
        assert abs(1 - sum(n for _, n in aspp) / plain - skipped) < 1e-3


def test_counting_works_on_any_model_the_trainer_holds():
    # O2/O3 cast the model to bf16/fp16, and a rank may hold a batch of 1 (one value per channel
    # after the ASPP's pooling); counting must neither fail on those nor change the model's mode.
    model = build_model("r18", 8, num_classes=5, base_channels=8)
    convert_atrous(model)
    expected = atrous_plan.count_skipped_macs(model, (2, 3, 64, 64))
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(model).to(dtype)
        got = atrous_plan.count_skipped_macs(low, (1, 3, 64, 64))
        assert got["needed"] * 2 == expected["needed"] and got["plain"] * 2 == expected["plain"] > 0
        assert all(m.training for m in low.modules())


def test_skipped_flops_match_torch_flop_counter(rng):
    # FlopCounterMode counts the matrix products the decomposition really runs (forward and
    # backward); the plain model's convs are counted at full size.
    # The ASPP bottleneck's split (core.blocks.split_pool_conv) skips the image-pool channels' products
    # and runs a few small ones instead (the taps' vectors and their sum over the map).
    from torch.utils.flop_counter import FlopCounterMode

    from core.heads import count_split_pool_flops
    ref = _tiny_model(int(rng.integers(1 << 31)))
    mine = copy.deepcopy(ref)
    convert_atrous(mine, algorithm="taps")
    x = randn(rng, *MODEL_INPUT)
    counted = []
    for m, split in ((ref, False), (mine, False), (mine, True)):
        m.decode_head.split_pool = split
        with FlopCounterMode(display=False) as counter:
            _outputs_and_grads(m, x)
        counted.append(counter.get_total_flops())
    skipped = atrous_plan.count_skipped_macs(mine, MODEL_INPUT)["train_step_flops_skipped"]
    assert skipped > 0 and counted[0] - counted[1] == skipped
    split_skipped = count_split_pool_flops(mine, MODEL_INPUT)
    extra = counted[0] - skipped - split_skipped - counted[2]
    assert split_skipped > 0 and -0.05 * split_skipped < extra <= 0


def test_count_macs_against_a_brute_force_count():
    # Count, for every output pixel and tap, whether the tap's input pixel is inside the image.
    for h, w, d in ((5, 7, 2), (32, 64, 36), (3, 17, 5)):
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        inside = sum(((ii + (ky - 1) * d >= 0) & (ii + (ky - 1) * d < h) &
                      (jj + (kx - 1) * d >= 0) & (jj + (kx - 1) * d < w)).sum()
                     for ky in range(3) for kx in range(3))
        assert atrous.conv_macs(2, 3, 4, h, w, d) == (2 * 3 * 4 * h * w * 9, 2 * 3 * 4 * int(inside))


def test_torch_compile_traces_once(rng):
    # aot_eager runs dynamo and AOTAutograd (which trace the autograd.Function's forward and
    # backward) without inductor's C++ build: inductor works too but compiles ~80 s on 2 busy cores.
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=3, dilation=3))
    mine = copy.deepcopy(ref)
    assert convert_atrous(mine) == 2
    mine[0].algorithm = "taps"  # the second conv keeps the rule's choice ("hybrid" when training)
    compiled = torch.compile(mine, backend="aot_eager")
    for _ in range(3):
        x = randn(rng, 1, 3, 5, 6)
        results = []
        for model in (compiled, ref):
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.square().sum().backward()
            results.append([y.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        for g, r in zip(*results):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
