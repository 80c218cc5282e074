"""The synthetic default dataset: Cityscapes layout, consistent labels, deterministic, cached atomically."""
import glob
import hashlib
import os

import cv2
import numpy as np
import pytest

from data_loader.cityscapes import ID_TO_TRAINID, CityscapesIndex
from data_loader.polygons import polygons_to_label
from data_loader.synthetic import default_dataset, generate


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.*"), recursive=True)):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def test_layout_and_label_consistency(tmp_path):
    root = generate(str(tmp_path / "a"), num_train=4, num_val=2, size=(128, 64), seed=0)
    train, val = CityscapesIndex(root, "train"), CityscapesIndex(root, "val")
    assert (len(train), len(val)) == (4, 2)
    assert train.sizes == [(64, 128)] * 4
    seen = set()
    for image_path, label_path in list(train) + list(val):
        image = cv2.imread(image_path)
        assert image.shape == (64, 128, 3)
        train_ids = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        ids = cv2.imread(label_path.replace("_labelTrainIds", "_labelIds"), cv2.IMREAD_UNCHANGED)
        json_path = label_path.replace("_labelTrainIds.png", "_polygons.json")
        # the three label files agree: JSON rasterised == labelIds, labelIds mapped == labelTrainIds
        np.testing.assert_array_equal(polygons_to_label(json_path, "ids"), ids)
        np.testing.assert_array_equal(ID_TO_TRAINID[ids], train_ids)
        seen |= set(np.unique(train_ids).tolist())
        assert image.std() > 10  # textured, not flat colour
    assert {0, 1, 2, 10} <= seen  # road, sidewalk, building, sky in every scene set


def test_classes_are_separable_by_colour(tmp_path):
    # "learnable": the mean colour of road, building and sky differ clearly
    root = generate(str(tmp_path / "a"), num_train=6, num_val=0, size=(128, 64), seed=2)
    means = {c: [] for c in (0, 2, 10)}
    for image_path, label_path in CityscapesIndex(root, "train"):
        image = cv2.imread(image_path).astype(float)
        label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        for c in means:
            if (label == c).any():
                means[c].append(image[label == c].mean(0))
    centres = {c: np.mean(v, 0) for c, v in means.items()}
    assert np.linalg.norm(centres[0] - centres[10]) > 40 and np.linalg.norm(centres[2] - centres[10]) > 40


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate(str(tmp_path / "a"), num_train=3, num_val=1, size=(96, 48), seed=5)
    b = generate(str(tmp_path / "b"), num_train=3, num_val=1, size=(96, 48), seed=5)
    c = generate(str(tmp_path / "c"), num_train=3, num_val=1, size=(96, 48), seed=6)
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)
    # a sample does not depend on how many others are generated
    d = generate(str(tmp_path / "d"), num_train=1, num_val=0, size=(96, 48), seed=5)
    first = CityscapesIndex(a, "train")[0][0]
    with open(first, "rb") as f1, open(first.replace(a, d), "rb") as f2:
        assert f1.read() == f2.read()


def test_default_dataset_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    root = default_dataset(num_train=2, num_val=1, size=(64, 32))
    assert os.path.dirname(root) == str(tmp_path / "cache") and os.path.basename(root).startswith("synthetic-")
    assert len(CityscapesIndex(root, "train")) == 2 and len(CityscapesIndex(root, "val")) == 1
    stamp = os.stat(os.path.join(root, "synthetic.json")).st_mtime_ns
    assert default_dataset(num_train=2, num_val=1, size=(64, 32)) == root  # reused, not regenerated
    assert os.stat(os.path.join(root, "synthetic.json")).st_mtime_ns == stamp
    other = default_dataset(cache_dir=str(tmp_path / "elsewhere"), num_train=2, num_val=1, size=(64, 32), seed=1)
    assert other.startswith(str(tmp_path / "elsewhere")) and os.path.basename(other) != os.path.basename(root)
    assert [n for n in os.listdir(tmp_path / "cache") if ".tmp" in n] == []  # no temp folders left behind
    with pytest.raises(TypeError, match="unknown parameters"):
        default_dataset(num_trian=2)


def test_a_crash_mid_generation_leaves_no_dataset(tmp_path, monkeypatch):
    import data_loader.synthetic as synthetic

    calls = []

    def failing(root, split, index, size, seed):
        calls.append(index)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(root, split, index, size, seed)

    real = synthetic.generate_sample
    monkeypatch.setattr(synthetic, "generate_sample", failing)
    with pytest.raises(OSError, match="disk full"):
        default_dataset(cache_dir=str(tmp_path), num_train=3, num_val=0, size=(64, 32))
    assert os.listdir(tmp_path) == []  # neither a final folder nor a temp folder
    monkeypatch.setattr(synthetic, "generate_sample", real)
    root = default_dataset(cache_dir=str(tmp_path), num_train=3, num_val=0, size=(64, 32))
    assert len(CityscapesIndex(root, "train")) == 3
