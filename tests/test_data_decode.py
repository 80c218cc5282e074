"""PNG decoding (pyspng when installed, else OpenCV) is bit-identical to cv2.imread."""
import cv2
import numpy as np
import pytest
from PIL import Image

from data_loader.cityscapes import DatasetError
from data_loader.decode import read_image_bgr, read_image_rgb, read_label


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_colour_png_matches_cv2_imread(tmp_path, rng):
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image)
    np.testing.assert_array_equal(read_image_bgr(path), cv2.imread(path))
    np.testing.assert_array_equal(read_image_rgb(path), cv2.imread(path)[:, :, ::-1])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_other_png_kinds_decode_like_opencv(tmp_path, rng, mode):
    base = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    image = Image.fromarray(base)
    if mode == "I;16":
        image = Image.fromarray((base[:, :, 0].astype(np.uint16) * 257))
    else:
        image = image.convert(mode)
    path = str(tmp_path / f"b_{mode.replace(';', '')}.png")
    image.save(path)
    np.testing.assert_array_equal(read_image_bgr(path), cv2.imread(path))


def test_label_png_matches_imread_unchanged(tmp_path, rng):
    label = rng.integers(0, 19, (40, 30), dtype=np.uint8)
    label[:5] = 255
    path = str(tmp_path / "l.png")
    cv2.imwrite(path, label)
    out = read_label(path)
    assert out.shape == (40, 30) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.imread(path, cv2.IMREAD_UNCHANGED))


def test_colour_label_and_garbage_are_rejected_with_the_path(tmp_path):
    path = str(tmp_path / "rgb_label.png")
    cv2.imwrite(path, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="rgb_label.png: a label map must be a single-channel 8-bit PNG"):
        read_label(path)
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="garbage.png: cannot decode"):
        read_image_rgb(str(bad))
    with pytest.raises(DatasetError, match="missing.png: cannot read"):
        read_label(str(tmp_path / "missing.png"))


def test_top_rows_decode_equals_the_full_decode(tmp_path, rng):
    from data_loader.decode import read_image_rgb_top

    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    image[:, :, 1] //= 4  # some structure so PNG filters vary between rows
    path = str(tmp_path / "t.png")
    cv2.imwrite(path, image)
    full = read_image_rgb(path)
    for rows in (1, 7, 33, 50, 64):
        top = read_image_rgb_top(path, rows)
        assert top.shape == full.shape
        np.testing.assert_array_equal(top[:rows], full[:rows])
    grey = str(tmp_path / "g.png")
    cv2.imwrite(grey, image[:, :, 0])  # not RGB: decoded in full, like cv2.imread
    np.testing.assert_array_equal(read_image_rgb_top(grey, 5), cv2.imread(grey)[:, :, ::-1])
    with pytest.raises(DatasetError, match="missing.png"):
        read_image_rgb_top(str(tmp_path / "missing.png"), 5)
