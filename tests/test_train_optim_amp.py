"""Poly LR, the opt-level table (what each level does to the model), non-finite steps, and the
loss-curve parity of O1/O2/O3 against O0 (bf16 on CPU)."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

from blocks_data import blocks_dataset
from core import build_model
from core.amp import OPT_LEVELS, Amp
from core.engine import train_one_step
from data_loader.loader import Batch
from core.losses import seg_loss
from core.optim import PolyLR, build_sgd

CPU = torch.device("cpu")


def tiny_model():
    torch.manual_seed(0)
    return build_model("r18", 8, num_classes=5, base_channels=8, dropout=0.0).to(memory_format=torch.channels_last)


def test_poly_lr_matches_the_closed_form():
    opt = build_sgd([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = PolyLR(opt, max_iters=40000, power=0.9, min_lr=1e-4)
    assert sched.set_iteration(0) == pytest.approx(0.01)
    assert sched.set_iteration(20000) == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5 ** 0.9)
    assert sched.set_iteration(39999) == pytest.approx(1e-4 + (0.01 - 1e-4) * (1 / 40000) ** 0.9)
    assert sched.set_iteration(40000) == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    again = PolyLR(build_sgd([nn.Parameter(torch.zeros(1))], lr=0.01), 40000)
    again.load_state_dict(sched.state_dict())
    assert again.iteration == 40000 and again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    g = opt.param_groups[0]
    assert (g["momentum"], g["weight_decay"]) == (0.9, 5e-4)


def test_opt_level_table_decides_dtypes():
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    for level in ("O0", "O1", "O2", "O3"):
        model = tiny_model()
        amp = Amp(level, "cpu", torch.bfloat16)
        amp.prepare(model)
        conv = model.backbone.stem[0].weight
        bn = model.backbone.stem[1].weight
        with amp.autocast():
            out = model(x.to(amp.input_dtype))["out"]
        spec = OPT_LEVELS[level]
        assert conv.dtype == (torch.bfloat16 if spec.cast_model else torch.float32), level
        assert bn.dtype == (torch.bfloat16 if level == "O3" else torch.float32), level
        assert out.dtype == (torch.float32 if level == "O0" else torch.bfloat16), level
        assert all(p.dtype == torch.float32 for p in amp.optim_params) == (level != "O3"), level
        assert not amp.scaler.is_enabled()  # bf16 needs no loss scale
        state = amp.model_state_dict(model)
        assert all(v.dtype in (torch.float32, torch.int64) for v in state.values()), level


def test_o2_steps_fp32_masters_and_copies_them_down():
    images, labels = blocks_dataset(2)
    model = tiny_model()
    amp = Amp("O2", "cpu", torch.bfloat16)
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    before = [p.detach().clone() for p in amp.optim_params]
    train_one_step(model, Batch(images, labels, {}), amp, opt, seg_loss, CPU)
    masters = amp.optim_params
    assert any(not torch.equal(a, b) for a, b in zip(before, masters))
    for p, m in zip(model.parameters(), masters):
        assert torch.equal(p.detach(), m.detach().to(p.dtype))
    # the checkpointed weights are the fp32 masters, not the rounded bf16 copies
    conv_name = "backbone.stem.0.weight"
    assert torch.equal(amp.model_state_dict(model)[conv_name], masters[0].detach())


def test_non_finite_loss_skips_the_step():
    images, labels = blocks_dataset(2)
    model = tiny_model()
    amp = Amp("O0", "cpu", torch.bfloat16)
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(outputs, label):
        loss, parts = seg_loss(outputs, label)
        return loss * float("nan"), parts

    result = train_one_step(model, Batch(images, labels, {}), amp, opt, nan_loss, CPU)
    assert result.skipped and not result.stop
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    ok = train_one_step(model, Batch(images, labels, {}), amp, opt, seg_loss, CPU, stop_requested=True)
    assert not ok.skipped and ok.stop
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_float16_uses_a_dynamic_loss_scale_that_backs_off_on_overflow():
    images, labels = blocks_dataset(2)
    model = tiny_model()
    amp = Amp("O1", "cpu", torch.float16, init_scale=2.0 ** 127)  # scaled grads overflow to inf
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    assert amp.scaler.is_enabled()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_one_step(model, Batch(images, labels, {}), amp, opt, seg_loss, CPU)
    assert result.skipped
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert amp.scaler.get_scale() == 2.0 ** 126
    assert amp.state_dict()["scaler"]["scale"] == 2.0 ** 126
    restored = Amp("O1", "cpu", torch.float16)
    restored.load_state_dict(amp.state_dict())
    assert restored.scaler.get_scale() == 2.0 ** 126


def _loss_curve(level, images, labels, steps):
    model = tiny_model()
    amp = Amp(level, "cpu", torch.bfloat16)
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    sched = PolyLR(opt, steps)
    loss_fn = functools.partial(seg_loss, aux_weight=0.4)
    losses = []
    for it in range(steps):
        sched.set_iteration(it)
        i = (2 * it) % len(images)
        losses.append(train_one_step(model, Batch(images[i:i + 2], labels[i:i + 2], {}), amp, opt, loss_fn, CPU).loss)
    return np.array(losses)


def test_mixed_precision_levels_track_fp32_loss_curve():
    torch.set_num_threads(1)
    steps = 30
    images, labels = blocks_dataset(16)
    ref = _loss_curve("O0", images, labels, steps)
    assert ref[-5:].mean() < 0.8 * ref[:5].mean()  # it learns, so the comparison means something
    for level in ("O1", "O2", "O3"):
        got = _loss_curve(level, images, labels, steps)
        err = float(np.mean(np.abs(got - ref) / np.abs(ref)))
        print(f"{level} vs O0 mean relative loss error over {steps} steps (bf16): {err:.4f}")
        assert err <= 0.05, level


def test_device_side_normalisation_matches_mmseg_on_both_paths():
    from core.engine import MEAN_RGB, STD_RGB, normalize_with_torch, to_model_input
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=g)  # BGR
    rgb = image.flip(-1).permute(0, 3, 1, 2).double()
    ref = (rgb - torch.tensor(MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD_RGB, dtype=torch.float64).view(1, 3, 1, 1)
    for x in (to_model_input(image, CPU), normalize_with_torch(image)):  # CPU kernel / accelerator code
        assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)
    assert to_model_input(image, CPU, torch.bfloat16).dtype == torch.bfloat16
    assert to_model_input(image, CPU, channels_last=False).is_contiguous()
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(image.float(), CPU)


def test_o2_trains_with_one_image_per_process():
    # batch 1 per rank is the 8-GPU recipe (global batch 8); the image-pool BN sees one value there
    images, labels = blocks_dataset(1)
    model = tiny_model()
    amp = Amp("O2", "cpu", torch.bfloat16)
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    result = train_one_step(model, Batch(images, labels, {}), amp, opt, seg_loss, CPU)
    assert not result.skipped and np.isfinite(result.loss)


def test_o2_trains_at_batch_1_with_bn_kept_fp32():
    # Batch 1 sends the ASPP image-pool BN down its one-value path; with fp32 BN parameters and
    # bf16 activations every BN must hand the next (bf16) conv a bf16 tensor.
    images, labels = blocks_dataset(1)
    model = tiny_model()
    amp = Amp("O2", "cpu", torch.bfloat16)
    amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    result = train_one_step(model, Batch(images, labels, {}), amp, opt, seg_loss, CPU)
    assert not result.skipped and np.isfinite(result.loss)
