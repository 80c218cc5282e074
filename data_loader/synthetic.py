"""A learnable synthetic street-scene dataset in the exact Cityscapes layout (the embedded default).

Each scene is a list of labelled polygons (sky, road in perspective, sidewalks, terrain, buildings,
trees, poles with signs or traffic lights, cars, persons, sometimes an ego-vehicle hood) written as
a cityscapes *_polygons.json; labelIds / labelTrainIds are rasterised from that JSON with the
json2labelImg semantics (data_loader.polygons), and the image is rendered from the same polygons
with per-class colour, texture and noise. Everything is a function of (seed, split, index), so any
subset of a dataset is identical to the same files of a larger one.

    python -m data_loader.synthetic ROOT [--num-train 40] [--num-val 10] [--size 512 256] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .cityscapes import ID_TO_TRAINID, IMAGE_SUFFIX, LABEL_IDS_SUFFIX, LABEL_SUFFIX, POLYGONS_SUFFIX
from .polygons import draw_pillow, load_polygons

GENERATOR_VERSION = 1  # bump when the rendering changes so cached datasets are regenerated
CITIES = {"train": ("synthaachen", "synthbremen"), "val": ("synthfrankfurt",), "test": ("synthberlin",)}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
DEFAULT_PARAMS = {"num_train": 40, "num_val": 10, "size": (512, 256), "seed": 0}

# Base RGB colour and texture amplitude of each rendered label.
_LOOK = {
    "sky": ((135, 175, 225), 3.0),
    "road": ((88, 86, 92), 9.0),
    "sidewalk": ((165, 145, 150), 12.0),
    "terrain": ((125, 150, 75), 20.0),
    "building": ((125, 108, 98), 10.0),
    "vegetation": ((62, 112, 45), 30.0),
    "pole": ((105, 105, 110), 6.0),
    "traffic sign": ((215, 195, 40), 6.0),
    "traffic light": ((35, 35, 35), 4.0),
    "car": ((0, 0, 0), 6.0),  # colour drawn per car
    "person": ((0, 0, 0), 10.0),  # colour drawn per person
    "license plate": ((230, 230, 225), 3.0),
    "ego vehicle": ((25, 25, 30), 3.0),
}
# A standing person's outline in a unit box (x right, y down), and a car seen from behind.
_PERSON = [(0.42, 0.0), (0.58, 0.0), (0.62, 0.12), (0.9, 0.2), (0.95, 0.55), (0.8, 0.55), (0.75, 0.35),
           (0.72, 1.0), (0.55, 1.0), (0.5, 0.62), (0.45, 1.0), (0.28, 1.0), (0.25, 0.35), (0.2, 0.55),
           (0.05, 0.55), (0.1, 0.2), (0.38, 0.12)]
_CAR = [(0.0, 0.45), (0.15, 0.05), (0.85, 0.05), (1.0, 0.45), (1.0, 0.95), (0.85, 0.95), (0.85, 1.0),
        (0.7, 1.0), (0.7, 0.95), (0.3, 0.95), (0.3, 1.0), (0.15, 1.0), (0.15, 0.95), (0.0, 0.95)]


def _poly(points) -> list:
    return [[int(round(x)), int(round(y))] for x, y in points]


def _shape(template, x, y, w, h) -> list:
    return _poly([(x + u * w, y + v * h) for u, v in template])


def _blob(rng, cx, cy, rx, ry, n=14) -> list:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.75, 1.15, n)
    return _poly(zip(cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)))


def make_scene(rng: np.random.Generator, width: int, height: int) -> list:
    """The scene's objects in drawing order: dicts with label, polygon (int [x, y] list), look data."""
    W, H = width, height
    y_h = H * rng.uniform(0.38, 0.5)  # horizon
    vp = W * rng.uniform(0.4, 0.6)  # vanishing point x
    xl, xr = W * rng.uniform(-0.15, 0.15), W * rng.uniform(0.85, 1.15)
    half = W * 0.012
    objects = [{"label": "sky", "polygon": _poly([(0, 0), (W, 0), (W, y_h + 2), (0, y_h + 2)])}]
    objects.append({"label": "road", "polygon": _poly([(xl, H), (xr, H), (vp + half, y_h), (vp - half, y_h)])})
    side = W * rng.uniform(0.25, 0.45)
    outer_l = ((xl - side, H), (vp - 2.5 * half, y_h))
    outer_r = ((xr + side, H), (vp + 2.5 * half, y_h))
    objects.append({"label": "sidewalk", "polygon": _poly([outer_l[0], (xl, H), (vp - half, y_h), outer_l[1]])})
    objects.append({"label": "sidewalk", "polygon": _poly([(xr, H), outer_r[0], outer_r[1], (vp + half, y_h)])})
    if rng.random() < 0.5:  # a grass strip beyond the left sidewalk
        objects.append({"label": "terrain", "polygon": _poly([(outer_l[0][0] - side * 0.5, H), outer_l[0],
                                                              outer_l[1], (outer_l[1][0] - half, y_h)])})

    def ground_y(x, left):  # where the outer sidewalk edge meets the facades, clipped to the image
        (x0, y0), (x1, y1) = outer_l if left else outer_r
        t = (x - x0) / (x1 - x0) if x1 != x0 else 1.0
        return float(np.clip(y0 + t * (y1 - y0), y_h, H))

    for left in (True, False):  # building facades converging to the vanishing point
        x = 0.0 if left else W
        while (left and x < vp - 3 * half) or (not left and x > vp + 3 * half):
            step = W * rng.uniform(0.08, 0.22)
            x_next = min(x + step, vp - 3 * half) if left else max(x - step, vp + 3 * half)
            top0 = H * rng.uniform(-0.2, 0.25)
            top = lambda xx: y_h - (y_h - top0) * abs(vp - xx) / max(vp, W - vp)  # noqa: E731
            objects.append({"label": "building", "polygon": _poly(
                [(x, top(x)), (x_next, top(x_next)), (x_next, ground_y(x_next, left)), (x, ground_y(x, left))]),
                "tint": rng.uniform(0.75, 1.25, 3)})
            x = x_next

    things = []  # (depth y, objects) drawn far to near
    for _ in range(rng.integers(2, 6)):  # trees, poles with signs, persons on the sidewalks
        y = rng.uniform(y_h + 0.08 * (H - y_h), H * 1.05)
        s = (y - y_h) / (H - y_h)
        left = rng.random() < 0.5
        edge = (xl + (vp - xl) * (1 - s)) if left else (xr + (vp - xr) * (1 - s))
        x = edge + (-1 if left else 1) * side * s * rng.uniform(0.2, 0.8)
        kind = rng.choice(["tree", "tree", "pole", "person", "person"])
        if kind == "tree":
            trunk = max(2.0, W * 0.01 * s)
            crown = H * 0.25 * s
            things.append((y, [
                {"label": "vegetation", "polygon": _poly([(x - trunk, y), (x + trunk, y), (x + trunk, y - crown),
                                                          (x - trunk, y - crown)])},
                {"label": "vegetation", "polygon": _blob(rng, x, y - crown * 1.6, crown * 0.9, crown * 0.8)}]))
        elif kind == "pole":
            pw, ph = max(2.0, W * 0.006 * s), H * 0.75 * s
            group = [{"label": "pole", "polygon": _poly([(x - pw, y), (x + pw, y), (x + pw, y - ph), (x - pw, y - ph)])}]
            r = max(3.0, W * 0.025 * s)
            if rng.random() < 0.5:
                group.append({"label": "traffic sign", "polygon": _blob(rng, x, y - ph - r * 0.5, r, r, n=10)})
            else:
                group.append({"label": "traffic light", "polygon": _poly(
                    [(x - r * 0.6, y - ph - 2.4 * r), (x + r * 0.6, y - ph - 2.4 * r), (x + r * 0.6, y - ph), (x - r * 0.6, y - ph)]),
                    "lamp": int(rng.integers(3))})
            things.append((y, group))
        else:
            ph = H * 0.42 * s
            label = "persongroup" if rng.random() < 0.15 else "person"
            things.append((y, [{"label": label, "polygon": _shape(_PERSON, x - ph * 0.2, y - ph, ph * 0.4, ph),
                                "color": rng.integers(20, 235, 3)}]))
    for _ in range(rng.integers(1, 5)):  # cars on the road
        y = rng.uniform(y_h + 0.1 * (H - y_h), H * 1.1)
        s = (y - y_h) / (H - y_h)
        road_l, road_r = xl + (vp - half - xl) * (1 - s), xr + (vp + half - xr) * (1 - s)
        cw = W * 0.32 * s
        ch = cw * rng.uniform(0.5, 0.7)
        x = rng.uniform(road_l - cw * 0.3, road_r - cw * 0.7)
        label = "cargroup" if rng.random() < 0.1 else "car"
        group = [{"label": label, "polygon": _shape(_CAR, x, y - ch, cw, ch), "color": rng.integers(10, 245, 3)}]
        if rng.random() < 0.5:  # plates have id -1: rendered in the image, never drawn into labels
            group.append({"label": "license plate", "polygon": _poly(
                [(x + cw * 0.4, y - ch * 0.3), (x + cw * 0.6, y - ch * 0.3), (x + cw * 0.6, y - ch * 0.18), (x + cw * 0.4, y - ch * 0.18)])})
        things.append((y, group))
    for _, group in sorted(things, key=lambda t: t[0]):
        objects.extend(group)
    if rng.random() < 0.3:  # a deleted annotation: skipped by json2labelImg, not rendered either
        objects.append({"label": "car", "deleted": 1, "polygon": _blob(rng, W * 0.5, H * 0.7, W * 0.1, H * 0.1)})
    if rng.random() < 0.3:
        hood = H * rng.uniform(0.05, 0.12)
        objects.append({"label": "ego vehicle", "polygon": _poly([(0, H), (W, H), (W * 0.85, H - hood), (W * 0.15, H - hood)])})
    return objects


def render(objects: list, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Render the scene as uint8 RGB [H,W,3]: per-object colour, per-class texture, global noise."""
    drawn = [o for o in objects if not o.get("deleted")][:254]
    index_img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(index_img)
    for i, obj in enumerate(drawn, start=1):
        draw.polygon([tuple(p) for p in obj["polygon"]], fill=i)
    index = np.asarray(index_img)
    colours = np.zeros((len(drawn) + 1, 3), np.float32)
    amplitude = np.zeros(len(drawn) + 1, np.float32)
    for i, obj in enumerate(drawn, start=1):
        base_name = obj["label"][:-5] if obj["label"].endswith("group") else obj["label"]
        base, amp = _LOOK[base_name]
        colour = np.asarray(obj.get("color", base), np.float32) * obj.get("tint", 1.0)
        colours[i] = colour * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8, 3)
        amplitude[i] = amp
    img = colours[index]
    ys, xs = np.mgrid[0:height, 0:width]
    labels_of = np.array([""] + [o["label"] for o in drawn], dtype=object)
    is_kind = lambda name: np.isin(index, [i for i, n in enumerate(labels_of) if n == name])  # noqa: E731
    sky = is_kind("sky")
    img[sky] += (ys[sky, None] / height) * 60.0  # brighter towards the horizon
    period = max(4, width // 64)
    windows = is_kind("building") & ((xs // period) % 2 == 0) & ((ys // period) % 3 == 0)
    img[windows] *= 0.55
    road = is_kind("road")
    (bx0, by), (bx1, _), (tx0, ty), (tx1, _) = next(o for o in drawn if o["label"] == "road")["polygon"]
    t = (ys - ty) / max(by - ty, 1)  # 0 at the horizon, 1 at the bottom edge
    centre = (tx0 + tx1) / 2 + t * ((bx0 + bx1) / 2 - (tx0 + tx1) / 2)
    lane = road & (np.abs(xs - centre) < np.maximum(0.5, t * width / 150)) & ((ys // max(2, height // 24)) % 2 == 0)
    img[lane] = 235.0
    low = cv2.resize(rng.normal(0, 1, (max(2, height // 32), max(2, width // 32))).astype(np.float32),
                     (width, height), interpolation=cv2.INTER_LINEAR)
    high = rng.normal(0, 1, (height, width)).astype(np.float32)
    img += (amplitude[index] * (0.6 * high + 0.8 * low))[..., None]
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array):
        raise OSError(f"{path}: cannot write")


def generate_sample(root: str, split: str, index: int, size=(512, 256), seed: int = 0) -> str:
    """Write image, polygons JSON, labelIds and labelTrainIds of one sample; returns its stem."""
    width, height = size
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_000019"
    image_dir = os.path.join(root, "leftImg8bit", split, city)
    label_dir = os.path.join(root, "gtFine", split, city)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    objects = make_scene(rng, width, height)
    json_path = os.path.join(label_dir, stem + POLYGONS_SUFFIX)
    doc = {"imgHeight": height, "imgWidth": width,
           "objects": [{"label": o["label"], "polygon": o["polygon"], **({"deleted": 1} if o.get("deleted") else {})}
                       for o in objects]}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    h, w, polygons, values = load_polygons(json_path, "ids")
    label_ids = draw_pillow(h, w, polygons, values, background=0)
    _write_png(os.path.join(label_dir, stem + LABEL_IDS_SUFFIX), label_ids)
    _write_png(os.path.join(label_dir, stem + LABEL_SUFFIX), ID_TO_TRAINID[label_ids])
    rgb = render(objects, rng, width, height)
    _write_png(os.path.join(image_dir, stem + IMAGE_SUFFIX), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return stem


def generate(root: str, num_train: int, num_val: int, size=(512, 256), seed: int = 0, num_test: int = 0) -> str:
    """Write a synthetic dataset in the Cityscapes layout under `root`; size is (width, height)."""
    width, height = (int(v) for v in size)
    if width < 16 or height < 16:
        raise ValueError(f"size={size}: expected (width, height) of at least 16x16")
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if n < 0:
            raise ValueError(f"{name}={n}: expected >= 0")
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        for i in range(count):
            generate_sample(root, split, i, (width, height), seed)
    return root


def cache_root(cache_dir: str | None = None) -> str:
    """The project's cache directory: `cache_dir` if given, else $DEEPLAB_CACHE, else
    $XDG_CACHE_HOME/deeplab-trainer, else ~/.cache/deeplab-trainer. Everything the project caches
    (the synthetic sets, the measured peak FLOP/s) lives under it."""
    if cache_dir:
        return cache_dir
    if os.environ.get("DEEPLAB_CACHE"):
        return os.environ["DEEPLAB_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deeplab-trainer")


def default_dataset(cache_dir: str | None = None, **overrides) -> str:
    """Root of the embedded default dataset, generated once per parameter set into the cache.

    The folder is written under a temporary name and renamed into place, so a crash never leaves
    a half dataset, and concurrent callers (several ranks) all end up with one complete copy.
    """
    unknown = set(overrides) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(f"default_dataset: unknown parameters {sorted(unknown)}; expected {sorted(DEFAULT_PARAMS)}")
    params = {**DEFAULT_PARAMS, **overrides, "version": GENERATOR_VERSION}
    params["size"] = [int(v) for v in params["size"]]
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    parent = cache_root(cache_dir)
    final = os.path.join(parent, f"synthetic-{digest}")
    marker = os.path.join(final, "synthetic.json")
    if os.path.exists(marker):
        return final
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".synthetic-{digest}.tmp-", dir=parent)
    try:
        generate(tmp, params["num_train"], params["num_val"], tuple(params["size"]), params["seed"])
        with open(os.path.join(tmp, "synthetic.json"), "w", encoding="utf-8") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; a stale partial folder has no marker
            if not os.path.exists(marker):
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_loader.synthetic", description="Generate a synthetic Cityscapes-layout dataset.")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=DEFAULT_PARAMS["num_train"])
    p.add_argument("--num-val", type=int, default=DEFAULT_PARAMS["num_val"])
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=list(DEFAULT_PARAMS["size"]))
    p.add_argument("--seed", type=int, default=DEFAULT_PARAMS["seed"])
    a = p.parse_args(argv)
    generate(a.root, a.num_train, a.num_val, tuple(a.size), a.seed)
    print(f"wrote {a.num_train} train / {a.num_val} val samples of {a.size[0]}x{a.size[1]} to {a.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
