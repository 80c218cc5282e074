"""core.norm: the memory-saving BatchNorm + activation against torch's own unfused modules
(nn.BatchNorm2d + LeakyReLU/ReLU, + the residual add), gradcheck of the torch path, what it keeps
for the backward, the model wiring (default unchanged, same keys, folding), AMP dtypes,
torch.compile without recompiles, and SyncBN over two real gloo processes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from core import build_model, fuse_for_inference
from core.backbone import Bottleneck
from core.blocks import ConvBNAct, PoolBatchNorm2d, count_batchnorms
from core.norm import NORMS, Activation, BatchNormAct2d, bn_act_train
from core.sync_bn import convert_sync_batchnorm
from launch.dist import destroy
from scripts import free_port

torch.set_num_threads(2)
CL = torch.channels_last
SLOPES = {"leaky_relu": 0.01, "identity": 1.0, "relu": 0.0}


def unfused(activation, c, momentum=0.1):
    """torch's own modules: what BatchNormAct2d must compute."""
    act = {"leaky_relu": nn.LeakyReLU(0.01), "identity": nn.Identity(), "relu": nn.ReLU()}[activation]
    return nn.BatchNorm2d(c, momentum=momentum), act


def randomize(bn, gen):
    with torch.no_grad():
        bn.weight.copy_((torch.rand(bn.num_features, generator=gen) + 0.5) * torch.where(
            torch.arange(bn.num_features) % 3 == 1, -1.0, 1.0))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.3)


def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


# ---- the op and the module against torch -------------------------------------------------------

@pytest.mark.parametrize("activation", list(SLOPES))
@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck_float64_torch_path(activation, with_residual):
    g = gen()
    x = torch.randn(3, 5, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = ((torch.rand(5, dtype=torch.float64, generator=g) + 0.5) * torch.tensor([1, -1, 1, 1, -1.0],
                                                                              dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 5, 3, 2, dtype=torch.float64, generator=g, requires_grad=True) if with_residual else None
    slope = SLOPES[activation]

    def fn(x, w, b, *rest):
        return bn_act_train(x, w, b, rest[0] if rest else None, 1e-5, slope, activation != "relu", "")[0]

    inputs = (x, w, b) + ((r,) if with_residual else ())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", list(SLOPES))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])  # C++ kernels / torch path
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_batchnorm_plus_activation(backend, activation, layout, momentum):
    g = gen()
    c = 7
    ours = BatchNormAct2d(c, momentum=momentum, activation=activation)
    bn, act = unfused(activation, c, momentum)
    randomize(bn, g)
    ours.load_state_dict(bn.state_dict())
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    for step in range(3):  # running statistics over several steps, and then eval
        x = (torch.randn(3, c, 5, 9, generator=g) * 2 + 1).contiguous(memory_format=fmt)
        dy = torch.randn(3, c, 5, 9, generator=g)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), act(bn(x2))
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
        assert ours.num_batches_tracked == bn.num_batches_tracked == step + 1
    ours.eval(), bn.eval()
    x = torch.randn(2, c, 4, 4, generator=g).contiguous(memory_format=fmt)
    torch.testing.assert_close(ours(x), act(bn(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_residual_matches_batchnorm_add_leaky_relu(backend, layout):
    g = gen()
    c = 6
    ours, (bn, act) = BatchNormAct2d(c), unfused("leaky_relu", c)
    randomize(bn, g)
    ours.load_state_dict(bn.state_dict())
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, c, 7, 5, generator=g).contiguous(memory_format=fmt)
    r = (torch.randn(2, c, 7, 5, generator=g) * 3).contiguous(memory_format=fmt)
    dy = torch.randn(2, c, 7, 5, generator=g)
    (x1, r1), (x2, r2) = [(x.clone().requires_grad_(), r.clone().requires_grad_()) for _ in range(2)]
    y1, y2 = ours(x1, r1), act(bn(x2) + r2)
    y1.backward(dy)
    y2.backward(dy)
    for a, b in [(y1, y2), (x1.grad, x2.grad), (r1.grad, r2.grad), (ours.weight.grad, bn.weight.grad)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backward_keeps_the_output_not_the_input():
    """The memory claim itself: what autograd stores for the layer is y, never x."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    for activation, keeps_input in [("leaky_relu", False), ("identity", False), ("relu", True)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = BatchNormAct2d(8, activation=activation)(x)
        big = [t for t in saved if t.numel() == x.numel()]
        assert len(big) == 1, activation
        same = big[0].untyped_storage().data_ptr() == (x if keeps_input else y).untyped_storage().data_ptr()
        assert same, activation


def test_one_value_per_channel_acts_like_pool_batchnorm(backend):
    ours, pool = BatchNormAct2d(5, activation="identity"), PoolBatchNorm2d(5)
    randomize(pool, gen())
    ours.load_state_dict(pool.state_dict())
    x = torch.randn(1, 5, 1, 1, requires_grad=True)
    torch.testing.assert_close(ours(x), pool(x))
    assert torch.equal(ours.running_var, torch.ones(5)) and ours.num_batches_tracked == 0
    leaky = BatchNormAct2d(5).train()
    leaky.load_state_dict(pool.state_dict())
    torch.testing.assert_close(leaky(x), F.leaky_relu(pool.bias.view(1, 5, 1, 1), 0.01))


@pytest.mark.parametrize("level", ["O2", "O1"])
def test_low_precision_activations_keep_their_dtype(level):
    # O2: bf16 activations, BN parameters kept fp32 (core.amp); O1: autocast around fp32 modules.
    g = gen()
    ours, (bn, act) = BatchNormAct2d(4), unfused("leaky_relu", 4)
    randomize(bn, g)
    ours.load_state_dict(bn.state_dict())
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=CL)
    x = torch.randn(2, 3, 8, 8, generator=g).contiguous(memory_format=CL)
    if level == "O2":
        conv = conv.bfloat16()
        y1, y2 = ours(conv(x.bfloat16())), act(bn(conv(x.bfloat16())))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y1, y2 = ours(conv(x)), act(bn(conv(x)))
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2.float(), rtol=0.02, atol=0.02)
    y1.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


# ---- the model -------------------------------------------------------------------------------------

def test_default_model_is_mmsegs_batchnorm_relu_network():
    model = build_model("r50", 8, num_classes=5, base_channels=8)
    assert not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert [type(m) for m in model.backbone.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert isinstance(model.decode_head.image_pool._modules["1"].bn, PoolBatchNorm2d)
    assert all(isinstance(m.act, nn.ReLU) for m in model.modules() if isinstance(m, ConvBNAct))
    # A bottleneck computes exactly mmseg's formula with its own submodules.
    block = model.backbone.layer2[0].train()
    x = torch.randn(2, block.conv1.in_channels, 9, 9)
    torch.manual_seed(0)
    got = block(x)
    relu = F.relu
    identity = block.downsample(x)
    out = relu(block.bn1(block.conv1(x)))
    out = relu(block.bn2(block.conv2(out)))
    want = relu(block.bn3(block.conv3(out)) + identity)
    assert torch.equal(got, want)


def test_state_dict_keys_are_the_same_and_load_strictly_across_norms():
    models = {n: build_model("r18", 8, num_classes=5, base_channels=8, norm=n) for n in NORMS}
    keys = {n: list(m.state_dict()) for n, m in models.items()}
    assert all(k == keys["bn"] for k in keys.values())
    for src in NORMS:
        for dst in NORMS:
            models[dst].load_state_dict(models[src].state_dict(), strict=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("r18", base_channels=8, norm="abn")


@pytest.mark.parametrize("norm", NORMS[1:])
def test_memory_saving_models_use_leaky_relu_and_fold(norm):
    g = gen()
    model = build_model("r50", 8, num_classes=5, base_channels=8, norm=norm)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert blocks[0].bn1.activation == "leaky_relu" and blocks[0].downsample[1].activation == "identity"
    assert blocks[0].bn3.activation == ("leaky_relu" if norm == "inplace-abn-residual" else "identity")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize(m, g)
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    model.eval()
    x = torch.randn(2, 3, 33, 41, generator=g)
    with torch.no_grad():
        ref = model(x)["out"]
        fuse_for_inference(model)
        fused = model(x)["out"]
    assert count_batchnorms(model.modules()) == 0
    assert isinstance(model.backbone.stem[1], Activation) and model.backbone.stem[1].activation == "leaky_relu"
    assert (fused - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize("norm", NORMS[1:])
def test_train_steps_of_a_tiny_model(norm):
    torch.manual_seed(0)
    model = build_model("r18", 8, num_classes=4, base_channels=8, norm=norm).train().to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=CL)
    y = torch.randint(0, 4, (2, 48, 48))
    losses = []
    for batch in (2, 2, 2, 1):  # the last at batch 1: the image-pool BN sees one value per channel
        out = model(x[:batch])
        loss = F.cross_entropy(out["out"], y[:batch]) + 0.4 * F.cross_entropy(out["aux"], y[:batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0]
    stem_bn = model.backbone.stem[1]
    assert stem_bn.num_batches_tracked == 4 and not torch.equal(stem_bn.running_var, torch.ones(4))


def test_compiled_model_does_not_recompile():
    import torch._dynamo as dynamo
    torch.manual_seed(0)
    net = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, padding=1), "bn": BatchNormAct2d(8),
                         "conv2": nn.Conv2d(8, 8, 3, padding=1), "bn2": BatchNormAct2d(8)}).to(memory_format=CL)

    def forward(x):
        h = net["bn"](net["conv"](x))
        return net["bn2"](net["conv2"](h), h)  # with a residual

    dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with dynamo.config.patch(error_on_recompile=True):
        for step in range(4):
            x = torch.randn(2, 3, 10, 10).contiguous(memory_format=CL)
            loss = compiled(x).square().mean()
            with torch.no_grad():
                want = forward(x).square().mean()  # eager, same weights
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert net["bn"].num_batches_tracked == 8  # compiled and eager calls both updated it


# ---- SyncBN over two real gloo processes ------------------------------------------------------------


def _sync_case(seed):
    g = torch.Generator().manual_seed(seed)
    c = 5
    state = nn.BatchNorm2d(c)
    randomize(state, g)
    x = (torch.randn(4, c, 6, 7, generator=g) * 2 + 1).contiguous(memory_format=CL)
    r = torch.randn(4, c, 6, 7, generator=g).contiguous(memory_format=CL)
    dy = torch.randn(4, c, 6, 7, generator=g)
    return state.state_dict(), x, r, dy


class TinyNet(nn.Module):
    """conv, BN + leaky ReLU, conv, BN + shortcut + leaky ReLU: with BatchNormAct2d (fused) or
    with torch's modules, same parameter names."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.bn1, self.bn2 = (BatchNormAct2d(6), BatchNormAct2d(6)) if fused else (nn.BatchNorm2d(6), nn.BatchNorm2d(6))

    def forward(self, x):
        h = self.bn1(self.conv1(x)) if self.fused else F.leaky_relu(self.bn1(self.conv1(x)), 0.01)
        o = self.conv2(h)
        return self.bn2(o, h) if self.fused else F.leaky_relu(self.bn2(o) + h, 0.01)


def _train_tiny(net, images, rank, world, steps=2):
    """SGD steps on the rank's equal share of each batch; loss = mean over the share (DDP averages)."""
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    share = images.shape[1] // world
    for step in range(steps):
        x = images[step, rank * share:(rank + 1) * share].contiguous(memory_format=CL)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return net.state_dict()


def _tiny_case(seed):
    torch.manual_seed(seed)
    state = TinyNet(False).state_dict()
    return state, torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 1))


def _rank_main(rank, world, port, seed, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, x, r, dy = _sync_case(seed)
        layer = nn.Sequential(BatchNormAct2d(5))
        layer.load_state_dict({f"0.{k}": v for k, v in state.items()})
        layer = convert_sync_batchnorm(layer)  # keeps BatchNormAct2d, switches its sync on
        assert isinstance(layer[0], BatchNormAct2d) and layer[0].sync
        lo, hi = (0, 1) if rank == 0 else (1, 4)  # unequal shares: 1 and 3 of the 4 images
        xs, rs = x[lo:hi].clone().requires_grad_(), r[lo:hi].clone().requires_grad_()
        y = layer[0](xs, rs)
        y.backward(dy[lo:hi])
        grads = {"y": y.detach(), "dx": xs.grad, "dr": rs.grad, "dw": layer[0].weight.grad,
                 "db": layer[0].bias.grad, "running_mean": layer[0].running_mean,
                 "running_var": layer[0].running_var}
        # The same under DDP, whose gradient all-reduces interleave with the layers' own.
        state, images = _tiny_case(seed)
        net = TinyNet(True)
        net.load_state_dict(state)
        grads["ddp"] = _train_tiny(convert_sync_batchnorm(net), images, rank, world)
        torch.save(grads, f"{out_path}.{rank}")
    finally:
        destroy()  # the trainer's teardown: garbage first, then the group (launch/dist.py says why)


def test_sync_bn_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    seed = torch.seed() % 2**31
    mp.spawn(_rank_main, args=(2, free_port(), seed, str(tmp_path / "r")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"r.{k}", weights_only=True) for k in range(2)]
    # One process, the concatenated batch, torch's own modules.
    state, x, r, dy = _sync_case(seed)
    bn = nn.BatchNorm2d(5)
    bn.load_state_dict(state)
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = F.leaky_relu(bn(x) + r, 0.01)
    y.backward(dy)
    halves = [slice(0, 1), slice(1, 4)]  # as the ranks split it
    for k in range(2):
        torch.testing.assert_close(got[k]["y"], y.detach()[halves[k]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[k]["dx"], x.grad[halves[k]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[k]["dr"], r.grad[halves[k]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[k]["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[k]["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
    # Affine gradients stay per rank (DDP sums/averages them): their sum is the whole batch's.
    torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0]["db"] + got[1]["db"], bn.bias.grad, rtol=1e-4, atol=1e-4)
    state, images = _tiny_case(seed)
    single = TinyNet(False)
    single.load_state_dict(state)
    want = _train_tiny(single, images, 0, 1)
    for k in range(2):
        for key, value in want.items():
            torch.testing.assert_close(got[k]["ddp"][key], value, rtol=1e-4, atol=1e-5, msg=key)
