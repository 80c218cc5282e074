"""python -m data_loader.convert: polygons JSON / labelIds -> labelTrainIds, run as a real subprocess."""
import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_loader.convert import ConvertConfig, convert
from data_loader.polygons import polygons_to_label
from data_loader.synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_convert(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "data_loader.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def write_json(path, objects, width=40, height=20):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"imgWidth": width, "imgHeight": height, "objects": objects}, f)


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_json_follows_json2labelimg_semantics(tmp_path):
    path = str(tmp_path / "gtFine" / "train" / "c" / "c_000000_000001_gtFine_polygons.json")
    write_json(path, [
        {"label": "road", "polygon": rect(0, 10, 39, 19)},
        {"label": "car", "polygon": rect(2, 2, 12, 12)},
        {"label": "license plate", "polygon": rect(5, 8, 8, 10)},  # id -1: never drawn
        {"label": "persongroup", "polygon": rect(20, 2, 24, 12)},  # unknown group -> person
        {"label": "polegroup", "polygon": rect(30, 2, 31, 12)},  # a real label (trainId 255)
        {"label": "sky", "polygon": rect(20, 0, 39, 1)},
        {"label": "car", "deleted": 1, "polygon": rect(14, 14, 18, 18)},  # skipped
    ])
    result = run_convert(str(tmp_path), "--nproc", "1")
    assert result.returncode == 0, result.stderr
    out = cv2.imread(path.replace("_polygons.json", "_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (20, 40) and out.dtype == np.uint8
    assert out[0, 0] == 255  # background: 'unlabeled' -> 255
    assert out[15, 16] == 0  # road under the deleted car
    assert out[9, 6] == 13  # car under the license plate
    assert out[5, 22] == 11  # persongroup drawn as person
    assert out[5, 30] == 255  # polegroup
    assert out[0, 25] == 10  # sky
    assert "converted 1 files, skipped 0" in result.stdout


def test_unknown_label_fails_naming_the_file(tmp_path):
    path = str(tmp_path / "gtFine" / "val" / "c" / "c_000000_000002_gtFine_polygons.json")
    write_json(path, [{"label": "spaceship", "polygon": rect(0, 0, 5, 5)}])
    result = run_convert(str(tmp_path), "--nproc", "1")
    assert result.returncode == 1
    assert path in result.stderr and "unknown label 'spaceship'" in result.stderr
    assert not os.path.exists(path.replace("_polygons.json", "_labelTrainIds.png"))


def test_label_ids_path_and_invalid_ids(tmp_path):
    folder = tmp_path / "gtFine" / "train" / "c"
    folder.mkdir(parents=True)
    ids = np.array([[0, 7, 8, 23], [26, 33, 18, 1]], np.uint8)
    good = str(folder / "c_000000_000001_gtFine_labelIds.png")
    cv2.imwrite(good, ids)
    convert(ConvertConfig(str(tmp_path), nproc=1))
    out = cv2.imread(good.replace("_labelIds", "_labelTrainIds"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(out, [[255, 0, 1, 10], [13, 18, 255, 255]])
    bad = str(folder / "c_000000_000002_gtFine_labelIds.png")
    cv2.imwrite(bad, np.full((2, 4), 40, np.uint8))
    with pytest.raises(ValueError, match=bad + r": label values \[40\]"):
        convert(ConvertConfig(str(tmp_path), nproc=1))


def test_parallel_convert_reproduces_the_dataset_skips_and_forces(tmp_path):
    root = generate(str(tmp_path / "cs"), num_train=5, num_val=2, size=(96, 48), seed=4)
    targets = sorted(glob.glob(os.path.join(root, "gtFine", "*", "*", "*_labelTrainIds.png")))
    expected = {p: cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in targets}
    for p in targets:
        os.remove(p)
    # one sample only has labelIds (no JSON): converted through the id -> trainId table
    json_only = targets[0].replace("_labelTrainIds.png", "_polygons.json")
    os.remove(json_only)

    result = run_convert(root, "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert "converted 7 files, skipped 0" in result.stdout
    for p in targets:
        np.testing.assert_array_equal(cv2.imread(p, cv2.IMREAD_UNCHANGED), expected[p], err_msg=p)

    cv2.imwrite(targets[1], np.zeros((48, 96), np.uint8))  # an existing output is not touched...
    result = run_convert(root, "--nproc", "2")
    assert "converted 0 files, skipped 7" in result.stdout
    assert cv2.imread(targets[1], cv2.IMREAD_UNCHANGED).max() == 0
    result = run_convert(root, "--nproc", "2", "--force")  # ...unless --force
    assert "converted 7 files, skipped 0" in result.stdout
    np.testing.assert_array_equal(cv2.imread(targets[1], cv2.IMREAD_UNCHANGED), expected[targets[1]])
    assert not glob.glob(os.path.join(root, "gtFine", "*", "*", "*.tmp*"))


def test_kernel_polygon_fill_is_pixel_identical_to_pillow(tmp_path):
    root = generate(str(tmp_path / "cs"), num_train=4, num_val=0, size=(128, 64), seed=7)
    for path in sorted(glob.glob(os.path.join(root, "gtFine", "train", "*", "*_polygons.json"))):
        np.testing.assert_array_equal(polygons_to_label(path, backend="kernel"),
                                      polygons_to_label(path, backend="pillow"), err_msg=path)
