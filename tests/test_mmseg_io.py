"""mmseg checkpoints in and out, with no code from the file run.

The mmseg files (tests/mmseg_files.py) are laid out as mmcv / mmengine write them: their dict
layout, an OrderedDict state dict with `_metadata`, numpy scalars, and mmengine's HistoryBuffer
objects pickled under their real module path, with mmengine not installed when they are read.
"""
import importlib.util
import os
import pickle
import pickletools
import types
import zipfile

import numpy as np
import pytest
import torch

from core import build_model
from core.mmseg_io import (CheckpointError, build_from_checkpoint, dataset_meta, load_model_weights,
                           parse_config_text, read_checkpoint)
from core.pretrained import pretrained_notice
from core.safe_pickle import Unresolved, safe_load
from data_loader.cityscapes import CLASSES, PALETTE
from mmseg_files import CONFIG_1X, mmcv_file, mmengine_file


def tiny(**kw):
    torch.manual_seed(3)
    return build_model(**{"backbone": "r18", "base_channels": 8, **kw})


def test_mmengine_file_is_what_mmengine_writes_and_loads_without_mmengine(tmp_path):
    model = tiny(output_stride=8)
    path = mmengine_file(str(tmp_path / "iter_80000.pth"), model)
    assert importlib.util.find_spec("mmengine") is None
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert "mmengine.logging.history_buffer HistoryBuffer" in globals_
    with pytest.raises(pickle.UnpicklingError):  # why a restricted unpickler is needed at all
        torch.load(path, weights_only=True)

    ckpt = read_checkpoint(path)
    assert ckpt.source == "mmseg 1.x (mmengine)"
    assert ckpt.replaced == ("mmengine.logging.history_buffer.HistoryBuffer",)
    assert ckpt.settings == {"backbone": "r18", "num_classes": 19, "base_channels": 8, "output_stride": 8}
    assert ckpt.classes == CLASSES and ckpt.palette == PALETTE
    buf = safe_load(path).obj["message_hub"]["log_scalars"]["train/lr"]
    assert isinstance(buf, Unresolved) and np.allclose(buf.state["_log_history"], [0.01, 0.009])
    fresh = build_from_checkpoint(ckpt)  # aux head dropped, every other weight from the file
    assert fresh.auxiliary_head is None
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_mmcv_file_loads_and_its_config_text_is_never_run(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    model = tiny(output_stride=16)
    path = mmcv_file(str(tmp_path / "deeplabv3_r18-d16.pth"), model, marker, legacy)
    ckpt = read_checkpoint(path)
    assert not marker.exists()
    assert ckpt.source == "mmseg 0.x (mmcv)" and ckpt.replaced == ()
    assert ckpt.settings["output_stride"] == 16  # strides (1,2,2,1) / dilations (1,1,1,2) in the config text
    assert ckpt.config["model"]["test_cfg"] == {"mode": "slide", "crop_size": (512, 1024), "stride": (341, 683)}
    assert ckpt.config["work_dir"] is None
    assert ckpt.meta["hook_msgs"]["best_score"] == np.float64(0.7632)
    assert ckpt.classes == CLASSES
    out = build_from_checkpoint(ckpt).eval()
    ref = tiny(output_stride=16, aux_head=False)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(out(x)["out"], ref.eval()(x)["out"])


def test_code_in_a_pickle_is_never_called(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class EvalEvil:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w')",)

    path = str(tmp_path / "evil.pth")
    sd = tiny().state_dict()
    torch.save({"meta": {"a": Evil(), "b": [EvalEvil()]}, "state_dict": sd}, path)
    ckpt = read_checkpoint(path)
    assert not marker.exists()
    assert set(ckpt.replaced) == {f"{os.system.__module__}.system", "builtins.eval"}
    assert isinstance(ckpt.meta["a"], Unresolved) and "system" in repr(ckpt.meta["a"])

    torch.save({"meta": {}, "state_dict": {**sd, "backbone.stem.0.weight": Evil()}}, path)
    with pytest.raises(CheckpointError, match="not tensors: backbone.stem.0.weight"):
        read_checkpoint(path)
    assert not marker.exists()


def test_other_architectures_are_clear_errors(tmp_path):
    sd = tiny().state_dict()
    psp = {k: v for k, v in sd.items() if not k.startswith("decode_head.")}
    psp.update({"decode_head.psp_modules.0.1.conv.weight": torch.zeros(1), "decode_head.bottleneck.conv.weight":
                torch.zeros(1), "decode_head.conv_seg.weight": torch.zeros(19, 4, 1, 1)})
    torch.save({"state_dict": psp}, tmp_path / "pspnet.pth")
    with pytest.raises(CheckpointError, match=r"(?s)pspnet.pth.*not DeepLabV3.*psp_modules.*ASPPHead"):
        read_checkpoint(str(tmp_path / "pspnet.pth"))
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "resnet18_v1c.pth")
    with pytest.raises(CheckpointError, match="ImageNet backbone.*--pretrained"):
        read_checkpoint(str(tmp_path / "resnet18_v1c.pth"))
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_checkpoint(str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("backbone", ["r18-v1b", "r50"])
def test_architecture_is_read_from_the_weights(tmp_path, backbone):
    model = tiny(backbone=backbone, num_classes=7, aux_head=False)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    ckpt = read_checkpoint(str(tmp_path / "bare.pth"))
    assert ckpt.source == "state dict" and not ckpt.aux_head
    assert ckpt.settings == {"backbone": backbone, "num_classes": 7, "base_channels": 8, "output_stride": 8}
    assert any("output stride" in n for n in ckpt.notes)
    assert ckpt.classes is None


def test_load_from_puts_a_whole_mmseg_model_into_a_training_model(tmp_path):
    src = tiny(output_stride=8)
    path = mmengine_file(str(tmp_path / "mm.pth"), src)
    dst = tiny(output_stride=8)
    torch.manual_seed(99)
    dst.decode_head.conv_seg.weight.data.normal_()
    lines = load_model_weights(dst, path)
    assert "mmseg 1.x" in lines[0]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k

    no_aux = {k: v for k, v in src.state_dict().items() if not k.startswith("auxiliary_head.")}
    torch.save({"state_dict": no_aux}, tmp_path / "noaux.pth")
    before = dst.auxiliary_head.conv_seg.weight.clone()
    lines = load_model_weights(dst, str(tmp_path / "noaux.pth"))
    assert any("keeps its random initialisation" in line for line in lines)
    assert torch.equal(dst.auxiliary_head.conv_seg.weight, before)

    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*--num-classes 19"):
        load_model_weights(tiny(num_classes=5), path)


def test_our_checkpoints_carry_dataset_meta_mmseg_reads_with_weights_only(tmp_path):
    model = tiny()
    meta = {"iteration": 10, "config": {"backbone": "r18", "output_stride": 8, "num_classes": 19,
                                        "base_channels": 8}, "format": 1, **dataset_meta(19)}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp_path / "iter_10.pt")
    loaded = torch.load(tmp_path / "iter_10.pt")  # torch's default (weights_only=True), as mmengine loads
    # mmseg 1.x init_model reads meta['dataset_meta']; 0.x init_segmentor meta['CLASSES'] / ['PALETTE'].
    assert loaded["meta"]["dataset_meta"]["classes"] == CLASSES
    assert loaded["meta"]["dataset_meta"]["palette"] == [list(c) for c in PALETTE]
    assert loaded["meta"]["CLASSES"] == CLASSES and len(loaded["meta"]["PALETTE"]) == 19
    ckpt = read_checkpoint(str(tmp_path / "iter_10.pt"))
    assert ckpt.source == "deeplab-trainer" and ckpt.palette == PALETTE
    other = dataset_meta(5)["dataset_meta"]
    assert len(other["classes"]) == 5 and len({tuple(c) for c in other["palette"]}) == 5


def test_config_text_literals_only():
    cfg = parse_config_text(CONFIG_1X + "\nevil = open('/etc/passwd').read()\nn = -3\nref = crop_size\n")
    assert cfg["crop_size"] == (512, 1024) and cfg["ref"] == (512, 1024) and cfg["n"] == -3
    assert cfg["evil"] is None
    assert cfg["test_pipeline"][1] == {"type": "Resize", "scale": (2048, 1024), "keep_ratio": True}
    assert parse_config_text("this is ( not python") == {}


def test_pretrained_notice_only_for_the_cityscapes_recipe_from_scratch():
    cfg = types.SimpleNamespace(preset="cityscapes", pretrained=None, load_from=None)
    assert "79.09" in pretrained_notice(cfg) and "--pretrained" in pretrained_notice(cfg)
    assert pretrained_notice(cfg, resuming=True) is None
    assert pretrained_notice(types.SimpleNamespace(preset="demo", pretrained=None, load_from=None)) is None
    assert pretrained_notice(types.SimpleNamespace(preset="cityscapes", pretrained="r.pth", load_from=None)) is None
