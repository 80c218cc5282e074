"""Cityscapes label table and the file index: every broken layout is an error naming the file."""
import os

import cv2
import numpy as np
import pytest

from data_loader.cityscapes import CLASSES, ID_TO_TRAINID, PALETTE, CityscapesIndex, DatasetError
from data_loader.synthetic import generate
from data_loader.worker import PngSource


@pytest.fixture()
def root(tmp_path):
    return generate(str(tmp_path / "cs"), num_train=3, num_val=1, size=(64, 32), seed=1)


def _label_path(root, split="train"):
    return CityscapesIndex(root, split)[0][1]


def test_label_table_matches_the_official_cityscapes_definition():
    assert CLASSES == ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                       "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                       "motorcycle", "bicycle")
    assert PALETTE[0] == (128, 64, 128) and PALETTE[10] == (70, 130, 180) and PALETTE[18] == (119, 11, 32)
    # id -> trainId: road 7->0, sky 23->10, bicycle 33->18; void / ignored ids -> 255
    assert ID_TO_TRAINID[7] == 0 and ID_TO_TRAINID[23] == 10 and ID_TO_TRAINID[33] == 18
    assert all(ID_TO_TRAINID[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30))
    assert sorted(set(ID_TO_TRAINID[:34].tolist()) - {255}) == list(range(19))


def test_index_pairs_images_with_labels_sorted(root):
    index = CityscapesIndex(root, "train")
    assert len(index) == 3
    for image_path, label_path in index:
        assert image_path.endswith("_leftImg8bit.png") and label_path.endswith("_gtFine_labelTrainIds.png")
        assert os.path.basename(image_path)[: -len("_leftImg8bit.png")] == \
            os.path.basename(label_path)[: -len("_gtFine_labelTrainIds.png")]
    assert index.sizes == [(32, 64)] * 3
    assert [s[0] for s in index.samples] == sorted(s[0] for s in index.samples)


def test_missing_split_folder_names_it(root):
    with pytest.raises(DatasetError, match=r"leftImg8bit/test: missing folder"):
        CityscapesIndex(root, "test")
    with pytest.raises(DatasetError, match="split='tran'"):
        CityscapesIndex(root, "tran")


def test_image_without_label_names_both_files(root):
    label = _label_path(root)
    os.remove(label)
    with pytest.raises(DatasetError, match="no label image .*" + os.path.basename(label) + ".*data_loader.convert"):
        CityscapesIndex(root, "train")


def test_label_without_image_names_the_label(root):
    image, label = CityscapesIndex(root, "train")[1]
    os.remove(image)
    with pytest.raises(DatasetError, match=os.path.basename(label) + ": label has no image"):
        CityscapesIndex(root, "train")


def test_size_mismatch_names_the_label(root):
    label = _label_path(root)
    cv2.imwrite(label, np.zeros((32, 63), np.uint8))
    with pytest.raises(DatasetError, match=os.path.basename(label) + ": size 63x32 differs from its image"):
        CityscapesIndex(root, "train")


def test_label_value_outside_the_table_names_the_file_when_decoded(root):
    index = CityscapesIndex(root, "train")
    label_path = index[2][1]
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    label[3, 4] = 19  # trainIds are 0..18 and 255
    cv2.imwrite(label_path, label)
    source = PngSource(index.samples)
    source.load(0)
    with pytest.raises(DatasetError, match=os.path.basename(label_path) + r": label values \[19\]"):
        source.load(2)


def test_unreadable_png_names_the_file(root):
    index = CityscapesIndex(root, "train")
    with open(index[0][0], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DatasetError, match=os.path.basename(index[0][0])):
        CityscapesIndex(root, "train")
