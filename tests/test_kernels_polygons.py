"""kernels.ops.fill_polygons against Pillow's ImageDraw.polygon (the reference calls Pillow itself)."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kernels import ops

pytestmark = pytest.mark.usefixtures("cpp_backend")  # C++ path unless a test says otherwise


def pillow_fill(canvas, polygons, values):
    """What cityscapesscripts' json2labelImg does: ImageDraw.polygon(points, fill=value) in order."""
    image = Image.fromarray(canvas.copy())
    draw = ImageDraw.Draw(image)
    for poly, value in zip(polygons, values):
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=value)
    return np.asarray(image)


def assert_same_as_pillow(shape, polygons, values, background=0):
    canvas = np.full(shape, background, np.uint8)
    want = pillow_fill(canvas, polygons, values)
    got = ops.fill_polygons(canvas, polygons, values)
    assert got is canvas
    mismatch = np.argwhere(got != want)
    assert mismatch.size == 0, f"{len(mismatch)} pixels differ, first at (y, x) {mismatch[:5].tolist()}: {polygons}"


def test_random_float_polygons(rng):
    for _ in range(300):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        polygons = [rng.uniform(-10, 60, (int(rng.integers(2, 12)), 2)) for _ in range(int(rng.integers(1, 4)))]
        assert_same_as_pillow(shape, polygons, [int(v) for v in rng.integers(0, 256, len(polygons))])


def test_random_integer_polygons_with_shared_rows(rng):
    # Small integer grids make many vertices share rows and columns: horizontal edges, corners
    # meeting on a row, vertical edges, collinear points.
    for _ in range(400):
        shape = (int(rng.integers(1, 20)), int(rng.integers(1, 20)))
        polygons = [rng.integers(-3, 22, (int(rng.integers(2, 9)), 2)).astype(np.float64)
                    for _ in range(int(rng.integers(1, 4)))]
        assert_same_as_pillow(shape, polygons, [int(v) for v in rng.integers(1, 256, len(polygons))])


def test_rectilinear_polygons_with_consecutive_horizontal_segments():
    staircase = [(1, 1), (4, 1), (8, 1), (8, 5), (5, 5), (2, 5), (2, 9), (1, 9)]
    reversed_runs = [(9, 2), (6, 2), (3, 2), (3, 7), (9, 7)]
    back_and_forth = [(2, 3), (8, 3), (5, 3), (5, 8), (2, 8)]  # a run that turns back on itself
    closed = [(1, 1), (6, 1), (6, 6), (1, 6), (1, 1)]  # last vertex repeats the first
    for poly in (staircase, reversed_runs, back_and_forth, closed):
        assert_same_as_pillow((12, 12), [np.array(poly, float)], [7])


@pytest.mark.parametrize("poly", [
    [(2, 2), (9, 6)],                          # two points: a line
    [(3, 3), (3, 3), (3, 3)],                  # one repeated point
    [(0, 5), (10, 5)],                          # horizontal line
    [(4, 0), (4, 10)],                          # vertical line
    [(1, 1), (8, 8), (8, 1), (1, 8)],           # self-intersecting bow tie
    [(5, 0), (7, 4), (11, 4), (8, 7), (9, 11), (5, 8), (1, 11), (2, 7), (-1, 4), (3, 4)],  # star
    [(-0.9, -0.9), (5.9, -0.2), (5.5, 6.99), (-0.5, 6.5)],  # truncation toward zero near 0
    [(-20, -20), (40, -15), (35, 40), (-30, 30)],           # covers the canvas and beyond
    [(20, 20), (30, 20), (25, 30)],                         # entirely outside
    [(-5, 3), (4, -7), (12, 3), (4, 14)],                    # crosses every border
])
def test_degenerate_and_clipped_shapes(poly):
    assert_same_as_pillow((10, 10), [np.array(poly, float)], [200], background=3)


def test_later_polygons_overwrite_earlier_ones():
    polygons = [np.array([(0, 0), (9, 0), (9, 9), (0, 9)], float), np.array([(2, 2), (6, 2), (6, 6)], float)]
    canvas = ops.fill_polygons(np.zeros((10, 10), np.uint8), polygons, [1, 2])
    assert (canvas == 2).sum() > 0 and (canvas == 1).sum() > 0
    assert_same_as_pillow((10, 10), polygons, [1, 2])
    assert_same_as_pillow((10, 10), polygons[::-1], [2, 1])


def test_cityscapes_sized_label_map(rng):
    # A 1024x2048 canvas with polygons of the size and vertex count Cityscapes annotations have.
    polygons = []
    for _ in range(60):
        centre = rng.uniform([0, 0], [2048, 1024])
        radius = rng.uniform(5, 400)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 80))))
        radii = radius * rng.uniform(0.3, 1.0, angles.size)
        polygons.append(np.round(centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]))
    assert_same_as_pillow((1024, 2048), polygons, [int(v) for v in rng.integers(0, 34, len(polygons))])


def test_accepts_lists_and_integer_arrays():
    polygons = [[(1, 1), (7, 2), (4, 8)], np.array([[0, 0], [3, 0], [0, 3]], dtype=np.int32)]
    assert_same_as_pillow((10, 10), polygons, [5, 9])


def test_row_bands_of_any_thread_count_match_pillow(rng):
    # Bands start in the middle of polygons, so each band rebuilds its active edges from scratch.
    polygons = [rng.uniform(-20, 320, (int(rng.integers(3, 30)), 2)) for _ in range(12)]
    polygons.append(rng.integers(0, 300, (40, 2)).astype(np.float64))
    values = [int(v) for v in rng.integers(0, 256, len(polygons))]
    want = pillow_fill(np.zeros((300, 280), np.uint8), polygons, values)
    for threads in (1, 2, 3, 5):
        got = ops.fill_polygons(np.zeros((300, 280), np.uint8), polygons, values, num_threads=threads)
        np.testing.assert_array_equal(got, want)
