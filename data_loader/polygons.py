"""Cityscapes *_polygons.json -> label image, with cityscapesscripts' json2labelImg semantics.

Facts followed (cityscapesscripts preparation/json2labelImg.py and helpers/annotation.py):
objects are drawn in file order, later ones over earlier ones; an object with a true 'deleted'
field is skipped; a label not in the table but ending in 'group' (e.g. 'cargroup') maps to its
base label; any other unknown label is an error; labels with a negative id (license plate) are
not drawn; the background is 'unlabeled' (id 0, trainId 255); polygons are filled with Pillow's
ImageDraw.polygon.
"""
from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from .cityscapes import NAME_TO_LABEL, DatasetError

ENCODINGS = ("ids", "trainIds")


def resolve_label(name: str, path: str):
    """The Label a polygon's label string stands for ('xgroup' -> 'x' when 'xgroup' is unknown)."""
    if name not in NAME_TO_LABEL and name.endswith("group"):
        name = name[: -len("group")]
    if name not in NAME_TO_LABEL:
        raise DatasetError(f"{path}: unknown label {name!r} (not in the Cityscapes label table)")
    return NAME_TO_LABEL[name]


def load_polygons(path: str, encoding: str = "trainIds"):
    """Parse a polygons JSON into (height, width, polygons, values) ready to draw in order.

    polygons: list of float64 arrays [N,2] of (x, y); values: list of ints for `encoding`.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: expected one of {ENCODINGS}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        height, width = int(doc["imgHeight"]), int(doc["imgWidth"])
        objects = doc["objects"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a Cityscapes polygons file ({type(e).__name__}: {e})") from None
    polygons, values = [], []
    for i, obj in enumerate(objects):
        if obj.get("deleted", 0):
            continue
        label = resolve_label(str(obj["label"]), path)
        if label.id < 0:
            continue
        points = np.asarray(obj["polygon"], dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            raise DatasetError(f"{path}: object {i} ({obj['label']!r}) has an empty polygon")
        polygons.append(points)
        values.append(label.id if encoding == "ids" else label.train_id)
    return height, width, polygons, values


def background_value(encoding: str) -> int:
    label = NAME_TO_LABEL["unlabeled"]
    return label.id if encoding == "ids" else label.train_id


def draw_pillow(height: int, width: int, polygons, values, background: int) -> np.ndarray:
    image = Image.new("L", (width, height), background)
    drawer = ImageDraw.Draw(image)
    for points, value in zip(polygons, values):
        # Cityscapes coordinates are integers; pass them as Python numbers like the original tool.
        drawer.polygon([tuple(p) for p in points.tolist()], fill=int(value))
    return np.asarray(image, dtype=np.uint8).copy()


def draw_kernel(height: int, width: int, polygons, values, background: int) -> np.ndarray:
    from kernels import ops

    canvas = np.full((height, width), background, dtype=np.uint8)
    ops.fill_polygons(canvas, polygons, [int(v) for v in values])
    return canvas


def polygons_to_label(path: str, encoding: str = "trainIds", backend: str = "kernel") -> np.ndarray:
    """Rasterise one polygons JSON into a uint8 [H,W] label image."""
    height, width, polygons, values = load_polygons(path, encoding)
    if backend == "pillow":
        return draw_pillow(height, width, polygons, values, background_value(encoding))
    if backend == "kernel":
        return draw_kernel(height, width, polygons, values, background_value(encoding))
    raise ValueError(f"backend={backend!r}: expected 'pillow' or 'kernel'")
