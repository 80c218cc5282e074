"""Loading pretrained backbones and mmseg checkpoints from local files; the device interface."""
import collections

import pytest
import torch

from core import build_model
from core.device import Device, get_device
from core.pretrained import load_model_checkpoint


def _randomized(sd):
    g = torch.Generator().manual_seed(11)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def test_loads_mmcv_v1c_layout_with_fc_and_wrapper(tmp_path):
    src = build_model("r18", base_channels=8).backbone.state_dict()
    sd = _randomized(src)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 64), torch.randn(1000)  # ImageNet classifier
    path = tmp_path / "resnet18_v1c.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": sd}, path)
    model = build_model("r18", base_channels=8, pretrained=str(path))
    got = model.backbone.state_dict()
    for k in src:
        assert torch.equal(got[k], sd[k]), k


def test_loads_torchvision_layout_into_v1b(tmp_path):
    sd = _randomized(build_model("r18-v1b", base_channels=8).backbone.state_dict())
    assert "conv1.weight" in sd and "layer1.0.conv1.weight" in sd and "bn1.running_mean" in sd
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, 64), torch.randn(10)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(collections.OrderedDict(sd), path)
    model = build_model("r18-v1b", base_channels=8, pretrained=str(path))
    assert torch.equal(model.backbone.conv1.weight, sd["conv1.weight"])


def test_mismatch_lists_missing_and_unexpected(tmp_path):
    sd = build_model("r18-v1b", base_channels=8).backbone.state_dict()
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        build_model("r18", base_channels=8, pretrained=str(path))
    msg = str(info.value)
    assert str(path) in msg and "missing keys: " in msg and "stem.0.weight" in msg
    assert "unexpected keys: " in msg and "conv1.weight" in msg and "r50-v1b" in msg


def test_shape_mismatch_is_reported(tmp_path):
    sd = build_model("r18", base_channels=16).backbone.state_dict()
    path = tmp_path / "wide.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch keys: layer1.0.bn1.bias: checkpoint \(16,\) vs backbone \(8,\)"):
        build_model("r18", base_channels=8, pretrained=str(path))


def test_missing_corrupt_and_pickled_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("r18", base_channels=8, pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth"):
        build_model("r18", base_channels=8, pretrained=str(bad))
    evil = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"x": collections.Counter("abc")}}, evil)  # arbitrary object: refused
    with pytest.raises(ValueError, match="pickled.pth"):
        build_model("r18", base_channels=8, pretrained=str(evil))


def test_whole_mmseg_checkpoint_loads_strictly(tmp_path):
    model = build_model("r18", base_channels=8, num_classes=19)
    sd = _randomized(model.state_dict())
    path = tmp_path / "deeplabv3_r18-d8.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": sd}, path)
    fresh = build_model("r18", base_channels=8, num_classes=19)
    load_model_checkpoint(fresh, str(path))
    assert torch.equal(fresh.decode_head.conv_seg.weight, sd["decode_head.conv_seg.weight"])
    no_aux = build_model("r18", base_channels=8, num_classes=19, aux_head=False)
    with pytest.raises(ValueError, match="unexpected keys: auxiliary_head"):
        load_model_checkpoint(no_aux, str(path))


def test_cpu_device_interface():
    dev = get_device("cpu")
    assert dev.type == "cpu" and dev.dist_backend == "gloo" and dev.autocast_dtype == torch.bfloat16
    assert dev.torch_device == torch.device("cpu")
    with dev.timer() as t:
        torch.ones(100).sum()
    assert t.elapsed_ms >= 0
    assert dev.max_memory_bytes() > 10 * 2**20
    dev.synchronize()


def test_npu_and_unknown_devices_fail_clearly():
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="torch_npu"):
        get_device("npu")
    with pytest.raises(ValueError, match="cpu, cuda, npu"):
        Device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_without_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match="cuda"):
        get_device("cuda")
