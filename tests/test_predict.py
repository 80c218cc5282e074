"""launch/predict.py on real files: its submission-format output scored by the official
cityscapesscripts evaluation equals the project's own `--eval-only` mIoU; the PNGs read back with
Pillow hold what they should; batching, sizes, slide mode and opt levels; clear errors."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core.inference import Segmenter, collect_inputs, trainid_to_labelid
from core.mmseg_io import read_checkpoint
from data_loader.cityscapes import LABELS, PALETTE
from data_loader.decode import read_image_rgb
from inference_data import fitted_model, make_dataset, save_project_checkpoint
from launch import predict
from mmseg_files import mmengine_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    root = make_dataset(str(tmp_path_factory.mktemp("cityscapes")))
    ckpt = save_project_checkpoint(fitted_model(root), str(tmp_path_factory.mktemp("ckpt") / "iter_1.pt"))
    return root, ckpt


def cityscapes_miou(gt_root, labelid_dir):
    """cityscapesscripts' evalPixelLevelSemanticLabeling on our labelIds folder (mIoU, per-class)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    args = ev.CArgs()
    for k, v in vars(ev.args).items():
        setattr(args, k, v)
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True  # no instanceIds in the set
    args.predictionPath, args.predictionWalk = labelid_dir, None
    gts = sorted(glob.glob(os.path.join(gt_root, "gtFine", "val", "*", "*_gtFine_labelIds.png")))
    preds = [ev.getPrediction(args, g) for g in gts]
    result = ev.evaluateImgLists(preds, gts, args)
    return 100 * result["averageScoreClasses"], result["classScores"]


def test_submission_scored_by_cityscapesscripts_equals_eval_only(data, tmp_path):
    root, ckpt = data
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", ckpt, os.path.join(root, "leftImg8bit", "val"), "--out", str(out),
                         "--threads", "1"]) == 0
    official, per_class = cityscapes_miou(root, str(out / "labelIds"))
    # Non-trivial: several classes found partly (neither all wrong nor perfect).
    assert sum(0.05 < v < 0.95 for v in per_class.values() if v == v) >= 3, per_class

    work = tmp_path / "eval"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "run.py"), "--eval-only", "--checkpoint", ckpt,
                          "--data", root, "--eval-scale", "none", "--workers", "0", "--threads", "1",
                          "--work-dir", str(work), "--no-tensorboard"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    ours = json.load(open(work / "eval_iter_1.json"))["mIoU"]
    print(f"cityscapesscripts mIoU {official:.4f}  project --eval-only mIoU {ours:.4f}")
    assert abs(official - ours) <= 0.01


def test_pngs_hold_train_ids_label_ids_and_blended_colours(data, tmp_path):
    root, ckpt = data
    image = sorted(glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")))[0]
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", ckpt, image, "--out", str(out), "--show", "--opacity", "0.25",
                         "--threads", "1"]) == 0
    name = os.path.splitext(os.path.basename(image))[0] + ".png"
    rgb = np.asarray(Image.open(image).convert("RGB"))
    train = Image.open(out / "trainIds" / name)
    assert train.mode == "L" and train.size == (rgb.shape[1], rgb.shape[0])
    train = np.asarray(train)
    assert set(np.unique(train)) <= set(range(19)) and len(np.unique(train)) >= 2
    label = np.asarray(Image.open(out / "labelIds" / name))
    id_of = {l.train_id: l.id for l in LABELS if 0 <= l.train_id < 255}  # the official table, by hand
    assert np.array_equal(label, np.vectorize(id_of.get)(train).astype(np.uint8))
    colour = np.asarray(PALETTE, np.float64)[train]
    expected = np.floor(0.75 * rgb + 0.25 * colour + 0.5)
    overlay = np.asarray(Image.open(out / "overlay" / name).convert("RGB")).astype(np.float64)
    assert np.abs(overlay - expected).max() <= 1  # float32 blend vs float64
    show = np.asarray(Image.open(out / "show" / name).convert("RGB"))
    assert show.shape == (rgb.shape[0], 3 * rgb.shape[1], 3) and np.array_equal(show[:, :rgb.shape[1]], rgb)
    # The same prediction as the Segmenter API gives directly.
    seg = Segmenter(read_checkpoint(ckpt), scale=None)
    assert np.array_equal(seg.predict([read_image_rgb(image)])[0], train)


def test_any_size_batches_scale_and_slide(data):
    root, ckpt = data
    images = [read_image_rgb(p) for p in sorted(glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")))[:3]]
    images[1] = np.ascontiguousarray(images[1][5:55, 10:110])  # 100x50: another size in the same batch
    ckpt = read_checkpoint(ckpt)
    whole = Segmenter(ckpt, scale=None)
    one_by_one = [whole.predict([im])[0] for im in images]
    batched = whole.predict(images)
    for im, a, b in zip(images, one_by_one, batched):
        assert a.shape == im.shape[:2] and np.array_equal(a, b)
    resized = Segmenter(ckpt, scale=(256, 128)).predict(images)  # model sees 2x, output at image size
    assert [p.shape for p in resized] == [im.shape[:2] for im in images]
    assert not np.array_equal(resized[0], one_by_one[0])
    # One tile covering the whole 64x128 image is whole-image inference.
    single_tile = Segmenter(ckpt, scale=None, mode="slide", tile=(64, 128)).predict([images[0]])[0]
    assert np.array_equal(single_tile, one_by_one[0])
    tiled = Segmenter(ckpt, scale=None, mode="slide", tile=(32, 64), stride=(21, 42)).predict([images[0]])[0]
    assert tiled.shape == images[0].shape[:2] and (tiled == one_by_one[0]).mean() > 0.5
    # Low precision: bf16 weights (O2) agree with fp32 on most pixels.
    low = Segmenter(ckpt, scale=None, opt_level="O2", amp_dtype="bfloat16").predict([images[0]])[0]
    assert (low == one_by_one[0]).mean() > 0.9


def test_mmseg_1x_checkpoint_predicts_and_evaluates_like_the_same_weights_in_ours(data, tmp_path):
    from core.amp import Amp
    from core.engine import evaluate
    from core.mmseg_io import build_from_checkpoint
    from data_loader.loader import build_val_loader
    root, ckpt = data
    ours = read_checkpoint(ckpt)
    mm = read_checkpoint(mmengine_file(str(tmp_path / "mm.pth"), fitted_model(root)))
    image = read_image_rgb(sorted(glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")))[0])
    a, b = (Segmenter(c, scale=None).predict([image])[0] for c in (mm, ours))
    assert np.array_equal(a, b)
    # What --eval-only runs on a checkpoint (build_from_checkpoint + the engine's evaluate).
    matrices = []
    for c in (ours, mm):
        loader = build_val_loader(root, "val", workers=0)
        try:
            amp = Amp("O0", "cpu", torch.bfloat16)
            matrices.append(evaluate(build_from_checkpoint(c), loader, torch.device("cpu"), amp, 19))
        finally:
            loader.close()
    assert matrices[0].sum() > 0 and np.array_equal(matrices[0], matrices[1])


def test_bad_inputs_are_named_and_the_rest_is_written(data, tmp_path, capsys):
    root, ckpt = data
    good = sorted(glob.glob(os.path.join(root, "leftImg8bit", "val", "*", "*.png")))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", ckpt, *good, str(bad), "--out", str(out), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 images could not be read" in err and "broken.png" in err
    assert len(os.listdir(out / "trainIds")) == 2

    assert predict.main(["--checkpoint", ckpt, str(tmp_path / "missing*.jpg"), "--out", str(out)]) == 2
    assert "matches no files" in capsys.readouterr().err
    other = tmp_path / "psp.pth"
    torch.save({"decode_head.psp_modules.0.weight": torch.zeros(1),
                "decode_head.conv_seg.weight": torch.zeros(1)}, other)
    assert predict.main(["--checkpoint", str(other), *good, "--out", str(out)]) == 2
    assert "not DeepLabV3" in capsys.readouterr().err


def test_inputs_from_folders_globs_and_files(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    for p in ("a/x/one.png", "a/two.jpg", "b.png", "notes.txt"):
        (tmp_path / p).write_bytes(b"")
    items = collect_inputs([str(tmp_path / "a"), str(tmp_path / "*.png")])
    assert [n for _, n in items] == ["two", os.path.join("x", "one"), "b"]
    (tmp_path / "a" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="both be written as b.png"):
        collect_inputs([str(tmp_path / "b.png"), str(tmp_path / "a" / "b.png")])
    assert trainid_to_labelid()[[0, 10, 18, 255]].tolist() == [7, 23, 33, 0]
