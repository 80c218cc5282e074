"""Cityscapes label definitions and the file index of a Cityscapes-layout dataset.

Label facts (names, ids, trainIds, colours) follow the official cityscapesscripts
`helpers/labels.py` table; 19 classes are trained, everything else maps to 255 (ignored).

Layout:
    ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
SPLITS = ("train", "val", "test")


class Label(NamedTuple):
    name: str
    id: int
    train_id: int  # 255 = ignored in training, -1 = never drawn (license plate)
    color: tuple  # RGB


# The official table (cityscapesscripts helpers/labels.py): name, id, trainId, colour.
LABELS = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, -1, (0, 0, 142)),
)
NAME_TO_LABEL = {label.name: label for label in LABELS}

_TRAIN_LABELS = sorted((l for l in LABELS if 0 <= l.train_id < IGNORE_INDEX), key=lambda l: l.train_id)
CLASSES = tuple(l.name for l in _TRAIN_LABELS)
PALETTE = tuple(l.color for l in _TRAIN_LABELS)
NUM_CLASSES = len(CLASSES)

# id -> trainId lookup; every id that is not in the table maps to 255 here, and
# VALID_LABEL_IDS says which ids may appear in a *_labelIds.png at all.
ID_TO_TRAINID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
VALID_LABEL_IDS = np.zeros(256, dtype=bool)
for _label in LABELS:
    if _label.id >= 0:
        ID_TO_TRAINID[_label.id] = _label.train_id
        VALID_LABEL_IDS[_label.id] = True
VALID_TRAIN_IDS = np.zeros(256, dtype=bool)
VALID_TRAIN_IDS[:NUM_CLASSES] = True
VALID_TRAIN_IDS[IGNORE_INDEX] = True


class DatasetError(ValueError):
    """A dataset file is missing, unpaired, malformed or holds values outside the label table."""


def check_label_values(label: np.ndarray, path: str, valid: np.ndarray = VALID_TRAIN_IDS, kind="trainId") -> None:
    """Raise DatasetError naming `path` if `label` holds a value that `valid` (bool[256]) rejects."""
    counts = np.bincount(label.reshape(-1), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        raise DatasetError(
            f"{path}: label values {bad.tolist()[:8]} are not valid Cityscapes {kind}s "
            f"(expected {'0..18 or 255' if kind == 'trainId' else 'ids 0..33'})"
        )


def png_size(path: str) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk, without decoding the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _list_split(top: str, suffix: str) -> dict[str, str]:
    """Map 'city/stem' -> absolute path for every <city>/<stem><suffix> below `top`."""
    found = {}
    for city in sorted(os.listdir(top)):
        city_dir = os.path.join(top, city)
        if not os.path.isdir(city_dir):
            continue
        for name in sorted(os.listdir(city_dir)):
            if name.endswith(suffix):
                found[f"{city}/{name[: -len(suffix)]}"] = os.path.join(city_dir, name)
    return found


class CityscapesIndex(Sequence):
    """The (image_path, label_path) pairs of one split, sorted by city and file name.

    Checks at construction (cheap: directory listings and PNG headers only): the split folders
    exist, every image has its label and vice versa, and each pair has the same size. Label
    values are checked when a label is decoded (`check_label_values`).
    `check_sizes=False` skips reading the PNG headers.
    """

    def __init__(self, root: str, split: str, check_sizes: bool = True):
        if split not in SPLITS:
            raise DatasetError(f"split={split!r}: expected one of {SPLITS}")
        self.root = os.path.abspath(root)
        self.split = split
        image_dir = os.path.join(self.root, "leftImg8bit", split)
        label_dir = os.path.join(self.root, "gtFine", split)
        for d in (image_dir, label_dir):
            if not os.path.isdir(d):
                raise DatasetError(f"{d}: missing folder (expected a Cityscapes layout under {self.root})")
        images = _list_split(image_dir, IMAGE_SUFFIX)
        labels = _list_split(label_dir, LABEL_SUFFIX)
        if not images:
            raise DatasetError(f"{image_dir}: no *{IMAGE_SUFFIX} files")
        for key, path in images.items():
            if key not in labels:
                expected = os.path.join(label_dir, key + LABEL_SUFFIX)
                hint = ""
                if os.path.exists(os.path.join(label_dir, key + POLYGONS_SUFFIX)) or os.path.exists(
                    os.path.join(label_dir, key + LABEL_IDS_SUFFIX)
                ):
                    hint = f" (run `python -m data_loader.convert {self.root}` to create it)"
                raise DatasetError(f"{path}: no label image {expected}{hint}")
        for key, path in labels.items():
            if key not in images:
                raise DatasetError(f"{path}: label has no image {os.path.join(image_dir, key + IMAGE_SUFFIX)}")
        self.keys = list(images)
        self.samples = [(images[k], labels[k]) for k in self.keys]
        self.sizes = None
        if check_sizes:
            self.sizes = []
            for image_path, label_path in self.samples:
                image_hw, label_hw = png_size(image_path), png_size(label_path)
                if image_hw != label_hw:
                    raise DatasetError(
                        f"{label_path}: size {label_hw[1]}x{label_hw[0]} differs from its image "
                        f"{image_path} ({image_hw[1]}x{image_hw[0]})"
                    )
                self.sizes.append(image_hw)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def __repr__(self) -> str:
        return f"CityscapesIndex(root={self.root!r}, split={self.split!r}, samples={len(self)})"
