"""profiling/ in-process: the module meter changes no number and leaves nothing behind, its
FLOPs add up to core.mfu's count and match the convolution formula, the phase timer agrees with
the wall clock, charts, py-spy's failure report. trace.py end to end: tests/test_trace.py."""
import copy
import functools
import time
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from core import build_model
from core.mfu import count_train_step_flops
from profiling.flops import module_flops
from profiling.hooks import ModuleMeter, attached_hooks, modules_at_depth, wall_clock_ms
from profiling.phases import PhaseTimer, within_tolerance
from profiling.pyspy import PySpyRecorder
from profiling.report import bar_chart_png, stacked_bar_chart_png

TINY = functools.partial(build_model, "r18", 8, 19, base_channels=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_steps(model, x, target, steps=2):
    """SGD steps with dropout drawing from a fixed seed; returns losses, grads, weights, BN stats."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out["out"], target) + 0.4 * out["aux"].square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, grads, copy.deepcopy(model.state_dict())


def _assert_same(a, b):
    (la, ga, sa), (lb, gb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    assert [k for k in ga if not torch.equal(ga[k], gb[k])] == []
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []  # weights and BN running stats


def test_meter_is_bit_identical_times_every_module_and_detaches_completely():
    torch.manual_seed(0)
    model = TINY().train()
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
    reference = _train_steps(copy.deepcopy(model), x, target)
    traced = copy.deepcopy(model)
    inplace = {n: m.inplace for n, m in traced.named_modules() if hasattr(m, "inplace")}
    meter = ModuleMeter(traced, depth=2, read=wall_clock_ms())
    got = _train_steps(traced, x, target)
    meter.flush()
    _assert_same(got, reference)
    rows = {r["module"]: r for r in meter.table(steps=2)}
    assert set(rows) == set(modules_at_depth(traced, 2))
    for name in ("backbone.stem", "backbone.layer4", "decode_head.aspp_modules.3", "auxiliary_head.convs"):
        assert rows[name]["forward"] > 0 and rows[name]["backward"] > 0, rows[name]
        assert rows[name]["forward_calls"] == 1 and rows[name]["backward_calls"] == 1
    meter.remove()
    assert attached_hooks(traced) == []
    assert {n: m.inplace for n, m in traced.named_modules() if hasattr(m, "inplace")} == inplace
    # ...and the detached model goes on exactly like one that never had a meter.
    never = TINY().train()
    never.load_state_dict(traced.state_dict())
    _assert_same(_train_steps(traced, x, target, steps=1), _train_steps(never, x, target, steps=1))


def test_full_backward_hooks_would_break_inplace_relu_and_change_gradients():
    """Why hooks.py hooks autograd nodes instead of using torch's full backward hooks."""
    torch.manual_seed(0)
    model = TINY().train()
    x = torch.randn(2, 3, 32, 32)
    handle = model.decode_head.bottleneck.bn.register_full_backward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="modified inplace"):
        sum(v.sum() for v in model(x).values()).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)

    def grads(m):
        torch.manual_seed(1)
        sum(v.sum() for v in m(x).values()).backward()
        return {n: p.grad for n, p in m.named_parameters()}
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False  # (1) fixed; (2) remains:
    plain = grads(copy.deepcopy(model))
    hooked = copy.deepcopy(model)
    for module in modules_at_depth(hooked, 2).values():
        module.register_full_backward_hook(lambda *a: None)
    with warnings.catch_warnings():  # torch's note that the stem's full hook fires early: true, not the point
        warnings.simplefilter("ignore")
        changed = [k for k, g in grads(hooked).items() if not torch.equal(g, plain[k])]
    assert any(k.startswith("backbone.layer3") for k in changed)  # layer3's output has 3 consumers


def test_module_flops_add_up_to_mfu_count_and_match_the_conv_formula():
    flops = module_flops(TINY, 2, (64, 64), depth=2)
    rows = flops["modules"]
    assert flops["total"] == count_train_step_flops(TINY, 2, (64, 64))
    assert sum(r["forward"] + r["backward"] for r in rows.values()) == flops["total"]  # nothing outside here
    with torch.device("meta"):
        model = TINY()
    with FlopCounterMode(display=False) as forward_only:
        model.train()(torch.empty(2, 3, 64, 64, device="meta"))
    assert flops["forward_total"] == forward_only.get_total_flops()
    conv = model.decode_head.aspp_modules[2].conv  # 3x3 dilated, on the 8x8 map of a 64x64 crop (OS8)
    expected = 2 * 2 * conv.out_channels * conv.in_channels * 9 * 8 * 8
    assert rows["decode_head.aspp_modules.2"]["forward"] == expected
    assert rows["decode_head.aspp_modules.2"]["backward"] == 2 * expected  # input grad + weight grad
    # The aux head's backward is its own (2x its forward), not layer4's (torch's ModuleTracker books it there).
    aux = rows["auxiliary_head.convs"]
    assert aux["backward"] == 2 * aux["forward"] and rows["backbone.layer4"]["backward"] > 10 * aux["backward"]


@pytest.mark.parametrize("depth", [1, 4])
def test_module_flops_add_up_at_every_depth(depth):
    """Depth 1 meters the backbone, which returns a list; depth 4 meters in-place ReLUs."""
    flops = module_flops(TINY, 2, (64, 64), depth=depth)
    assert sum(r["forward"] + r["backward"] for r in flops["modules"].values()) == flops["total"]
    assert flops["total"] == count_train_step_flops(TINY, 2, (64, 64))


def test_modules_at_depth_expands_module_lists():
    names = set(modules_at_depth(TINY(), 2))
    assert {"backbone.stem", "backbone.layer1", "decode_head.image_pool", "decode_head.aspp_modules.0"} <= names
    assert "decode_head.aspp_modules" not in names and "backbone" not in names
    with pytest.raises(ValueError, match="--depth"):
        modules_at_depth(TINY(), 0)


def test_phase_timer_matches_the_wall_clock():
    phases = PhaseTimer(wall_clock_ms())
    sleeps = {"data_wait": 0.03, "input": 0.005, "forward": 0.02, "backward": 0.04, "communication": 0.002,
              "optimizer": 0.01}
    t0 = time.perf_counter()
    phases.start_step()
    for name, seconds in sleeps.items():
        time.sleep(seconds)
        phases.mark(name)
    row = phases.end_step()
    wall_ms = (time.perf_counter() - t0) * 1000
    for name, seconds in sleeps.items():
        assert 1000 * seconds <= row[name] < 1000 * seconds + 20, (name, row[name])
    assert row["step_ms"] <= wall_ms and row["within_tolerance"]
    assert phases.summary()["mean_within_tolerance"] and phases.summary()["steps"] == 1
    assert within_tolerance(100.0, 102.9) and not within_tolerance(100.0, 103.1)  # 2% of the step + 1 ms


def test_charts(tmp_path):
    path = tmp_path / "c.png"
    bar_chart_png(str(path), ["a", "b"], [2.0, 1.0], "title")
    assert Image.open(path).size[0] == 900
    stacked_bar_chart_png(str(path), ["a", "b"], {"forward": [1.0, 2.0], "backward": [2.0, 4.0]}, "t")
    colours = {c for _, c in Image.open(path).convert("RGB").getcolors(1 << 16)}
    assert (70, 110, 180) in colours and (220, 130, 50) in colours  # both segments drawn
    with pytest.raises(ValueError, match="labels"):
        bar_chart_png(str(path), ["a"], [1.0, 2.0], "t")


def test_py_spy_failures_are_reported(tmp_path):
    rec = PySpyRecorder([], str(tmp_path)).start()
    assert not rec[0]["ok"] and "--workers 0" in rec[0]["message"]
    import subprocess
    import sys
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    spy = PySpyRecorder([gone.pid], str(tmp_path))
    spy.start()
    rec = spy.stop()
    assert not rec[0]["ok"] and f"could not record loader worker pid {gone.pid}" in rec[0]["message"]
