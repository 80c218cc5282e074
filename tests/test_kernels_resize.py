"""kernels.ops.resize_crop: C++ against the numpy reference and both against cv2.resize + crop + flip."""

import cv2
import numpy as np
import pytest

from kernels import ops
from kernels import reference as ref

pytestmark = pytest.mark.usefixtures("cpp_backend")  # C++ path unless a test says otherwise


def cv2_resize_crop(src, out_size, crop, flip, interp):
    out_h, out_w = out_size
    y0, x0, h, w = crop
    flag = cv2.INTER_LINEAR if interp == "bilinear" else cv2.INTER_NEAREST
    full = cv2.resize(src, (out_w, out_h), interpolation=flag)
    window = full[y0:y0 + h, x0:x0 + w]
    window = np.ascontiguousarray(window[:, ::-1] if flip else window)
    return window.reshape((h, w) + src.shape[2:])  # cv2 drops a trailing channel axis of size 1


def random_image(rng, h, w, channels):
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def random_crop(rng, out_h, out_w):
    h = int(rng.integers(1, out_h + 1))
    w = int(rng.integers(1, out_w + 1))
    return int(rng.integers(0, out_h - h + 1)), int(rng.integers(0, out_w - w + 1)), h, w


def is_exact_half(src_shape, out_size):
    return src_shape[0] == 2 * out_size[0] and src_shape[1] == 2 * out_size[1]


def test_matches_cv2_on_random_sizes_scales_crops_and_flips(rng):
    for _ in range(60):
        channels = [None, 1, 2, 3, 4][int(rng.integers(0, 5))]
        src = random_image(rng, int(rng.integers(1, 70)), int(rng.integers(1, 70)), channels)
        scale = float(rng.choice([0.5, 2.0, rng.uniform(0.05, 3.0)]))
        out_size = (max(1, round(src.shape[0] * scale)), max(1, round(src.shape[1] * scale)))
        crop = random_crop(rng, *out_size)
        for flip in (False, True):
            for interp in ("bilinear", "nearest"):
                got = ops.resize_crop(src, out_size, crop, flip=flip, interp=interp)
                want = cv2_resize_crop(src, out_size, crop, flip, interp)
                assert got.shape == want.shape and got.dtype == np.uint8
                diff = np.abs(got.astype(int) - want).max()
                if channels == 2 and interp == "bilinear" and is_exact_half(src.shape, out_size):
                    # cv2 takes a special 2x2-area path for exact halving whose 2-channel variant
                    # rounds differently; documented as the one known difference (<= 1 level).
                    assert diff <= 1
                else:
                    assert diff == 0, (src.shape, out_size, crop, flip, interp)


@pytest.mark.parametrize("scale", [0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 0.01, 8.0])
def test_extreme_and_mmseg_scales_match_cv2(rng, scale):
    src = random_image(rng, 96, 192, 3)
    out_size = (max(1, round(96 * scale)), max(1, round(192 * scale)))
    crop = (0, 0, min(out_size[0], 48), min(out_size[1], 96))
    crop = (out_size[0] - crop[2], out_size[1] - crop[3], crop[2], crop[3])  # bottom-right corner
    for flip in (False, True):
        for interp in ("bilinear", "nearest"):
            got = ops.resize_crop(src, out_size, crop, flip=flip, interp=interp)
            np.testing.assert_array_equal(got, cv2_resize_crop(src, out_size, crop, flip, interp))


def test_cpp_equals_reference_exactly(rng):
    for _ in range(40):
        channels = [None, 1, 2, 3, 4][int(rng.integers(0, 5))]
        src = random_image(rng, int(rng.integers(1, 50)), int(rng.integers(1, 50)), channels)
        out_size = (int(rng.integers(1, 120)), int(rng.integers(1, 120)))
        crop = random_crop(rng, *out_size)
        flip = bool(rng.integers(0, 2))
        for interp in ("bilinear", "nearest"):
            got = ops.resize_crop(src, out_size, crop, flip=flip, interp=interp)
            np.testing.assert_array_equal(got, ref.resize_crop(src, out_size, crop, flip=flip, interp=interp))


def test_reference_matches_cv2(rng):
    src = random_image(rng, 37, 61, 3)
    for out_size in [(18, 30), (74, 122), (50, 17)]:
        crop = random_crop(rng, *out_size)
        for interp in ("bilinear", "nearest"):
            np.testing.assert_array_equal(ref.resize_crop(src, out_size, crop, True, interp),
                                          cv2_resize_crop(src, out_size, crop, True, interp))


@pytest.mark.parametrize("src_hw,out_size", [((1, 1), (1, 1)), ((1, 1), (5, 9)), ((7, 1), (3, 1)),
                                             ((1, 13), (1, 29)), ((5, 5), (1, 1))])
def test_tiny_and_single_pixel_shapes(rng, src_hw, out_size):
    src = random_image(rng, *src_hw, 3)
    crop = (0, 0) + out_size
    for interp in ("bilinear", "nearest"):
        np.testing.assert_array_equal(ops.resize_crop(src, out_size, crop, interp=interp),
                                      cv2_resize_crop(src, out_size, crop, False, interp))


@pytest.mark.parametrize("value", [0, 255])
def test_constant_images_stay_constant(value):
    src = np.full((33, 47, 3), value, np.uint8)
    for out_size in [(16, 23), (66, 94), (100, 31)]:
        got = ops.resize_crop(src, out_size, (0, 0) + out_size, flip=True)
        assert (got == value).all()


def test_nearest_on_label_maps_matches_cv2(rng):
    label = rng.integers(0, 34, (64, 128), dtype=np.uint8)
    label[:, :5] = 255
    for out_size in [(32, 64), (77, 155), (128, 256), (90, 33)]:
        crop = random_crop(rng, *out_size)
        for flip in (False, True):
            np.testing.assert_array_equal(ops.resize_crop(label, out_size, crop, flip, "nearest"),
                                          cv2_resize_crop(label, out_size, crop, flip, "nearest"))


def test_results_do_not_depend_on_thread_count(rng):
    src = random_image(rng, 200, 300, 3)
    for out_size, interp in [((300, 450), "bilinear"), ((100, 150), "bilinear"), ((300, 450), "nearest")]:
        crop = (7, 11, out_size[0] - 20, out_size[1] - 30)
        results = [ops.resize_crop(src, out_size, crop, True, interp, num_threads=n) for n in (1, 2, 3, 8)]
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])


def test_writes_into_out_and_returns_it(rng):
    src = random_image(rng, 40, 60, 3)
    out = np.empty((10, 20, 3), np.uint8)
    result = ops.resize_crop(src, (80, 120), (5, 6, 10, 20), out=out)
    assert result is out
    np.testing.assert_array_equal(out, cv2_resize_crop(src, (80, 120), (5, 6, 10, 20), False, "bilinear"))
