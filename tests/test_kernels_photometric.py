"""kernels.ops.photometric against a transcription of mmseg's PhotoMetricDistortion (numpy + cv2)."""

import cv2
import numpy as np
import pytest

from kernels import _C, ops
from kernels import reference as ref

# OpenCV's HSV->BGR uses fused multiply-adds on AVX2/FMA CPUs (our kernels reproduce that path);
# elsewhere cv2 itself rounds a few pixels differently, by at most one level.
def cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


CV2_USES_FMA = cpu_has_avx2_fma()
TOLERANCE_VS_CV2 = 0 if CV2_USES_FMA else 1


@pytest.fixture(autouse=True)
def vector_hsv_after_each_test(cpp_backend):
    yield
    _C._force_scalar_hsv(False)


@pytest.fixture(params=["simd", "scalar"])
def hsv_code(request):
    """Run a test with the CPU's best HSV code and again with the portable scalar code."""
    _C._force_scalar_hsv(request.param == "scalar")
    yield request.param
    _C._force_scalar_hsv(False)


def mmseg_photometric(img, brightness, contrast, saturation, hue, contrast_first):
    """mmseg 1.x PhotoMetricDistortion.transform with its random draws given (None = not drawn)."""
    def convert(x, alpha=1, beta=0):
        x = x.astype(np.float32) * alpha + beta
        x = np.clip(x, 0, 255)
        return x.astype(np.uint8)

    if brightness is not None:
        img = convert(img, beta=brightness)
    if contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    if saturation is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=saturation)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    return img


def random_draws(rng):
    """Parameters as mmseg draws them (each step with probability 0.5)."""
    coin = lambda: bool(rng.integers(0, 2))  # noqa: E731
    return dict(brightness=float(rng.uniform(-32, 32)) if coin() else None,
                contrast=float(rng.uniform(0.5, 1.5)) if coin() else None,
                saturation=float(rng.uniform(0.5, 1.5)) if coin() else None,
                hue=int(rng.integers(-18, 18)) if coin() else None,
                contrast_first=coin())


def run_op(img, p, **kwargs):
    return ops.photometric(img, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["contrast_first"], **kwargs)


def every_colour():
    c = np.arange(256, dtype=np.uint8)
    img = np.empty((256, 256, 256, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = c[:, None, None], c[None, :, None], c[None, None, :]
    return img.reshape(4096, 4096, 3)


ALL_COLOURS = None


def assert_close_to_cv2(got, want):
    assert np.abs(got.astype(int) - want).max() <= TOLERANCE_VS_CV2


ROUND_TRIP = dict(brightness=None, contrast=None, saturation=1.0, hue=None, contrast_first=True)
HUE_ONLY = dict(brightness=None, contrast=None, saturation=None, hue=-18, contrast_first=True)
FULL_CHAIN = dict(brightness=-31.3, contrast=1.37, saturation=0.77, hue=9, contrast_first=False)


@pytest.mark.parametrize("code,params", [("simd", ROUND_TRIP), ("simd", HUE_ONLY), ("simd", FULL_CHAIN),
                                         ("scalar", FULL_CHAIN)])
def test_every_bgr_colour_matches_mmseg(code, params):
    global ALL_COLOURS
    if ALL_COLOURS is None:
        ALL_COLOURS = every_colour()
    _C._force_scalar_hsv(code == "scalar")
    got = run_op(ALL_COLOURS, params, num_threads=2)
    assert_close_to_cv2(got, mmseg_photometric(ALL_COLOURS, **params))


def test_random_draws_match_mmseg_and_reference(rng, hsv_code):
    for _ in range(25):
        img = rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)
        p = random_draws(rng)
        got = run_op(img, p)
        np.testing.assert_array_equal(got, ref.photometric(img, p["brightness"], p["contrast"], p["saturation"],
                                                           p["hue"], p["contrast_first"]))
        assert_close_to_cv2(got, mmseg_photometric(img, **p))


def test_reference_hsv_to_bgr_matches_cv2_on_random_triples(rng):
    n = 1 << 20
    hsv = np.stack([rng.integers(0, 180, n), rng.integers(0, 256, n), rng.integers(0, 256, n)], -1)
    hsv = hsv.astype(np.uint8).reshape(1024, 1024, 3)
    got = ref.hsv_to_bgr(hsv[..., 0], hsv[..., 1], hsv[..., 2])
    assert_close_to_cv2(got, cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("params", [
    dict(brightness=32.0, contrast=1.5, saturation=1.5, hue=18, contrast_first=True),
    dict(brightness=-32.0, contrast=0.5, saturation=0.5, hue=-18, contrast_first=False),
    dict(brightness=300.0, contrast=40.0, saturation=-3.0, hue=1000, contrast_first=True),
])
def test_edge_values_and_out_of_range_draws(value, params):
    img = np.full((3, 17, 3), value, np.uint8)
    img[1, ::2] = [0, 128, 255]
    assert_close_to_cv2(run_op(img, params), mmseg_photometric(img, **params))


def test_nothing_drawn_is_a_copy(rng):
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = ops.photometric(img)
    np.testing.assert_array_equal(out, img)
    assert out is not img


@pytest.mark.parametrize("width", [1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 257])
def test_widths_around_block_boundaries(rng, hsv_code, width):
    img = rng.integers(0, 256, (3, width, 3), dtype=np.uint8)
    p = dict(brightness=5.5, contrast=0.9, saturation=1.2, hue=-4, contrast_first=True)
    assert_close_to_cv2(run_op(img, p), mmseg_photometric(img, **p))


def test_results_do_not_depend_on_thread_count(rng):
    img = rng.integers(0, 256, (300, 301, 3), dtype=np.uint8)
    p = dict(brightness=-7.5, contrast=1.2, saturation=0.6, hue=11, contrast_first=False)
    results = [run_op(img, p, num_threads=n) for n in (1, 2, 3, 8)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_in_place_and_out(rng):
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = dict(brightness=10.0, contrast=None, saturation=0.8, hue=3, contrast_first=True)
    want = mmseg_photometric(img, **p)
    out = np.empty_like(img)
    assert run_op(img, p, out=out) is out
    assert_close_to_cv2(out, want)
    assert run_op(img, p, out=img) is img
    assert_close_to_cv2(img, want)


def test_reports_hsv_implementation():
    assert _C.hsv_implementation() in ("avx2", "scalar")
    _C._force_scalar_hsv(True)
    assert _C.hsv_implementation() == "scalar"
