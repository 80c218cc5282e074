"""launch/run.py with mmseg checkpoints: --eval-only of an mmseg 1.x file (read without mmengine,
no code run) scores exactly as our own checkpoint of the same weights; --load-from starts
training from a whole mmseg model; our checkpoints carry mmseg's dataset_meta; V1b backbones and
the "no --pretrained" notice of the Cityscapes recipe."""
import json

import pytest
import torch

from core import build_model
from data_loader.cityscapes import CLASSES
from mmseg_files import mmcv_file, mmengine_file
from test_launch_run import TINY, run

SMALL = ["--base-channels", "8", "--threads", "1", "--workers", "1", "--no-tensorboard", "--eval-scale", "none"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("r18", output_stride=8, num_classes=19, aux_head=True, base_channels=8)


@pytest.mark.parametrize("kind", ["1.x", "0.x"])
def test_eval_only_scores_an_mmseg_file_as_our_own_checkpoint_of_the_same_weights(tmp_path, kind):
    # 1.x: mmengine's file (meta holds mmengine objects). 0.x: a model-zoo file whose meta['config']
    # is the config's text, here describing an output-stride-16 model: rebuilt from that text, which
    # is read and never executed (it would create `marker`).
    stride = 16 if kind == "0.x" else 8
    torch.manual_seed(0)
    model = build_model("r18", output_stride=stride, num_classes=19, aux_head=True, base_channels=8)
    marker = tmp_path / "code-ran"
    mmseg = (mmcv_file(str(tmp_path / "mmseg.pth"), model, marker=str(marker), legacy=True) if kind == "0.x"
             else mmengine_file(str(tmp_path / "mmseg.pth"), model))
    ours = tmp_path / "ours.pt"
    torch.save({"meta": {"iteration": 0, "config": {"backbone": "r18", "output_stride": stride, "num_classes": 19,
                                                    "base_channels": 8}}, "state_dict": model.state_dict()}, ours)
    results = []
    for name, path in (("m", mmseg), ("o", str(ours))):
        proc = run(["--eval-only", "--checkpoint", path, "--work-dir", str(tmp_path / name), *SMALL,
                    "--eval-max-images", "3"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.load(open(next((tmp_path / name).glob("eval_*.json")))))
    assert results[0]["per_class"] == results[1]["per_class"] and results[0]["mIoU"] == results[1]["mIoU"]
    assert not marker.exists()


def test_load_from_an_mmseg_file_starts_training_from_its_weights(tmp_path):
    model = tiny_model(seed=7)
    path = mmengine_file(str(tmp_path / "mmseg.pth"), model)
    # A learning rate of zero: after one step the weights are still the file's (BN statistics move).
    proc = run(TINY + ["--iters", "1", "--lr", "1e-30", "--min-lr", "0", "--weight-decay", "0", "--momentum", "0",
                       "--load-from", path, "--work-dir", str(tmp_path / "w")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"load-from {path}: mmseg 1.x (mmengine) checkpoint" in proc.stdout
    state = torch.load(tmp_path / "w" / "iter_1.pt", weights_only=True)
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and value.ndim == 4:  # every conv weight came from the file
            torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=1e-12, msg=key)
    # and our checkpoints carry mmseg's class metadata, loadable with weights_only
    assert state["meta"]["dataset_meta"]["classes"] == CLASSES and state["meta"]["CLASSES"] == CLASSES


def test_v1b_backbone_and_the_pretrained_notice_of_the_cityscapes_recipe(tmp_path):
    from data_loader.synthetic import generate
    root = generate(str(tmp_path / "data"), num_train=2, num_val=1, size=(128, 64), seed=5)
    proc = run(["--data", root, "--backbone", "r18-v1b", "--crop", "32x64", "--scale", "128x64", "--iters", "1",
                "--global-batch", "2", "--no-evaluate", "--work-dir", str(tmp_path / "w"), *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImageNet-pretrained" in proc.stdout and "79.09" in proc.stdout  # the cityscapes preset, from scratch
    state = torch.load(tmp_path / "w" / "iter_1.pt", weights_only=True)
    assert "backbone.conv1.weight" in state["state_dict"] and state["meta"]["config"]["backbone"] == "r18-v1b"
