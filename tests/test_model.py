"""The DeepLabV3 model: shapes, parameter count, mmseg key names, BN folding, padded pooling."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import build_model, fuse_for_inference
from core.blocks import PoolBatchNorm2d, count_batchnorms, mean_over_valid
from core.heads import ASPPHead

torch.set_num_threads(2)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Random affine params and running statistics, so folding is tested on non-trivial BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("backbone,os_", list(itertools.product(
    ["r18", "r34", "r50", "r101", "r18-v1b", "r50-v1b"], [8, 16])))
def test_output_shape_every_variant(backbone, os_):
    model = build_model(backbone, output_stride=os_, num_classes=5, base_channels=8)
    x = torch.randn(2, 3, 37, 50)  # odd size: logits must still come back at input resolution
    model.train()
    out = model(x)
    assert out["out"].shape == (2, 5, 37, 50)
    assert out["aux"].shape == (2, 5, 37, 50)
    feats = model.backbone(x)
    stride = [f.shape[-1] for f in feats]
    assert stride[-1] == -(-50 // os_)  # ceil(W / output_stride)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 5, 37, 50)


def test_parameter_count_r50_d8():
    # mmseg DeepLabV3 R50-D8: about 68.1M parameters with the FCN aux head, 65.7M without.
    with_aux = build_model("r50", 8, 19, aux_head=True)
    no_aux = build_model("r50", 8, 19, aux_head=False)
    assert sum(p.numel() for p in with_aux.parameters()) == 68_113_030
    assert sum(p.numel() for p in no_aux.parameters()) == 65_748_339


def test_mmseg_key_names():
    sd = build_model("r50", 8, 19).state_dict()
    for key in ["backbone.stem.0.weight", "backbone.stem.1.running_var", "backbone.stem.3.weight",
                "backbone.stem.4.weight", "backbone.stem.6.weight", "backbone.stem.7.num_batches_tracked",
                "backbone.layer1.0.conv1.weight", "backbone.layer1.0.bn1.weight",
                "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.running_mean",
                "backbone.layer4.2.conv3.weight", "backbone.layer4.2.bn3.bias",
                "decode_head.image_pool.1.conv.weight", "decode_head.image_pool.1.bn.running_mean",
                "decode_head.aspp_modules.0.conv.weight", "decode_head.aspp_modules.3.bn.weight",
                "decode_head.bottleneck.conv.weight", "decode_head.bottleneck.bn.running_var",
                "decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
                "auxiliary_head.convs.0.conv.weight", "auxiliary_head.convs.0.bn.weight",
                "auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]:
        assert key in sd, key
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"backbone", "decode_head", "auxiliary_head"}
    blocks = {(k.split(".")[1], int(k.split(".")[2])) for k in sd if k.startswith("backbone.layer")}
    per_layer = {f"layer{i}": 1 + max(b for name, b in blocks if name == f"layer{i}") for i in range(1, 5)}
    assert per_layer == {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    # Shapes of the R50-D8 recipe: ASPP 2048 -> 512 with 3x3 atrous branches, bottleneck 5*512 -> 512.
    assert sd["decode_head.aspp_modules.1.conv.weight"].shape == (512, 2048, 3, 3)
    assert sd["decode_head.aspp_modules.0.conv.weight"].shape == (512, 2048, 1, 1)
    assert sd["decode_head.bottleneck.conv.weight"].shape == (512, 2560, 3, 3)
    assert sd["auxiliary_head.convs.0.conv.weight"].shape == (256, 1024, 3, 3)
    assert sd["backbone.stem.0.weight"].shape == (32, 3, 3, 3)
    assert "backbone.conv1.weight" in build_model("r50-v1b").state_dict()


def test_dilations_and_contract_dilation():
    m = build_model("r50", 8)
    d = lambda name: m.get_submodule(name).dilation  # noqa: E731
    assert d("backbone.layer3.0.conv2") == (1, 1) and d("backbone.layer3.1.conv2") == (2, 2)
    assert d("backbone.layer4.0.conv2") == (2, 2) and d("backbone.layer4.2.conv2") == (4, 4)
    assert [a.conv.dilation[0] for a in m.decode_head.aspp_modules] == [1, 12, 24, 36]
    m16 = build_model("r50", 16)
    assert [a.conv.dilation[0] for a in m16.decode_head.aspp_modules] == [1, 6, 12, 18]
    assert m16.get_submodule("backbone.layer3.0.conv2").stride == (2, 2)
    assert m16.get_submodule("backbone.layer4.0.conv2").dilation == (1, 1)
    assert m16.get_submodule("backbone.layer4.1.conv2").dilation == (2, 2)


def test_classifier_init_std():
    m = build_model("r50", 8, 19)
    w = m.decode_head.conv_seg.weight
    assert abs(w.std().item() - 0.01) < 0.001 and m.decode_head.conv_seg.bias.abs().max() == 0


@pytest.mark.parametrize("backbone", ["r18", "r50-v1b"])
def test_fuse_for_inference_matches_unfused(backbone):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = build_model(backbone, 8, num_classes=7, base_channels=16)
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(2, 3, 41, 33, generator=gen)
    with torch.no_grad():
        ref = model(x)["out"]
        names_before = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        fuse_for_inference(model)
        fused = model(x)["out"]
    names_after = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert names_after == names_before  # mmseg names (conv1, stem.0, ...) stay
    assert count_batchnorms(model.modules()) == 0
    rel = (fused - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, rel


def test_convbnact_fuse_matches():
    from core.blocks import ConvBNAct
    gen = torch.Generator().manual_seed(3)
    block = ConvBNAct(5, 9, 3, dilation=2)
    _randomize_bn(block, gen)
    block.eval()
    x = torch.randn(1, 5, 13, 11, generator=gen)
    with torch.no_grad():
        ref = block(x)
        out = block.fuse()(x)
    assert isinstance(block.bn, nn.Identity) and block.conv.bias is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_padded_pooling_equals_unpadded():
    gen = torch.Generator().manual_seed(7)
    head = ASPPHead(16, 8, 3, dilations=(1, 2, 3, 4))
    _randomize_bn(head, gen)
    head.eval()
    sizes = [(5, 7), (9, 4)]
    padded = torch.randn(2, 16, 11, 12, generator=gen) * 10  # padding region holds garbage
    with torch.no_grad():
        got = head.image_pool(padded, torch.tensor(sizes))
        for b, (h, w) in enumerate(sizes):
            alone = padded[b:b + 1, :, :h, :w]
            want = head.image_pool(alone)
            torch.testing.assert_close(got[b:b + 1, :, :h, :w], want, rtol=1e-5, atol=1e-6)
    assert got.shape == padded.shape[:1] + (8,) + padded.shape[2:]


def test_mean_over_valid_is_static_shape_masked_mean():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    got = mean_over_valid(x, torch.tensor([[2, 3], [4, 5]]))
    torch.testing.assert_close(got[0, :, 0, 0], x[0, :, :2, :3].mean(dim=(1, 2)))
    torch.testing.assert_close(got[1, :, 0, 0], x[1].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="valid_hw"):
        mean_over_valid(x, torch.tensor([2, 3]))
    cl = x.contiguous(memory_format=torch.channels_last)  # summed over the rows of its NHWC view
    torch.testing.assert_close(mean_over_valid(cl, torch.tensor([[2, 3], [4, 5]])), got)
    torch.testing.assert_close(mean_over_valid(cl, None), x.mean(dim=(2, 3), keepdim=True))


def test_model_valid_hw_maps_to_feature_grid():
    model = build_model("r18", 8, 4, base_channels=8).eval()
    x = torch.randn(1, 3, 64, 64)
    x[:, :, 40:, :] = 0
    with torch.no_grad():
        a = model(x, valid_hw=torch.tensor([[40, 64]]))["out"]
        b = model(x)["out"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_batch1_training_step():
    torch.manual_seed(0)
    model = build_model("r18", 8, num_classes=4, base_channels=8).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(1, 3, 48, 48)
    y = torch.randint(0, 4, (1, 48, 48))
    before = model.decode_head.conv_seg.weight.detach().clone()
    for _ in range(2):
        out = model(x)
        loss = F.cross_entropy(out["out"], y) + 0.4 * F.cross_entropy(out["aux"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.decode_head.conv_seg.weight)
    # The image-pool BN saw one value per channel and so left its running statistics alone.
    bn = model.decode_head.image_pool._modules["1"].bn
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_pool_batchnorm_is_plain_bn_from_batch_2():
    gen = torch.Generator().manual_seed(1)
    a, b = PoolBatchNorm2d(6), nn.BatchNorm2d(6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6, 1, 1, generator=gen)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)
    with pytest.raises(ValueError):
        b(x[:1])  # what PoolBatchNorm2d exists for
    assert torch.isfinite(a(x[:1])).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backbone"):
        build_model("r49")
    with pytest.raises(ValueError, match="output_stride"):
        build_model("r18", output_stride=32)
    model = build_model("r18", base_channels=8)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 4, 16, 16))


def test_pool_batchnorm_batch1_keeps_low_precision_dtype():
    # At O2 the BN parameters stay fp32 while activations are bf16: the output must stay bf16,
    # or the next (bf16) conv fails.
    bn = PoolBatchNorm2d(4).train()
    x = torch.randn(1, 4, 1, 1, dtype=torch.bfloat16)
    assert bn(x).dtype == torch.bfloat16
