"""The Winograd transforms (kernels/csrc/winograd.cpp: input, output, output gradient) against their torch reference
(kernels/reference_winograd.py) and against a float64 hand evaluation of Lavin & Gray's
formulas tile by tile; chunks of tile rows, odd channel counts (across the C++ 64-channel
blocks), dilations larger than the map, and argument errors on both backends."""
import numpy as np
import pytest
import torch

import kernels
from kernels import ops
from kernels import reference_winograd as ref

# Lavin & Gray (CVPR 2016), F(4x4, 3x3), points 0, +-1, +-2, infinity: written out here again so
# that the hand evaluation does not read the matrices from the code under test
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)

# (n, h, w, c, dilation): tiles that fit, leave remainders, exceed the map; uneven phase grids;
# channel counts below, at and across the kernel's 64-channel blocks
SHAPES = [(1, 8, 8, 3, 1), (2, 9, 13, 5, 1), (1, 1, 1, 1, 1), (1, 17, 10, 64, 2), (2, 11, 7, 65, 3),
          (1, 5, 3, 130, 4), (1, 3, 4, 7, 6), (1, 30, 22, 9, 5)]


def _grid(h, w, d, m=4):
    return -(-(-(-h // d)) // m), -(-(-(-w // d)) // m)


def _chunks(th):
    """Every way the caller may cut the tile rows: whole, first row alone, last row alone."""
    return sorted({(0, th), (0, 1), (th - 1, 1)})


def _tiles(n, h, w, d, row0, rows, m=4):
    """(image, phase row, phase column, tile row, tile column) in the kernels' tile order (m x m output tiles)."""
    _, tw = _grid(h, w, d, m)
    return [(img, p, q, ta, tb) for img in range(n) for p in range(d) for q in range(d)
            for ta in range(row0, row0 + rows) for tb in range(tw)]


def _gather(a, d, img, p, q, ta, tb, size, offset, m=4):
    """The size x size tile of a [N, H, W, C] whose first pixel is (p + d(m ta + offset), q + d(m tb + offset)),
    0 outside the image."""
    _, h, w, c = a.shape
    tile = np.zeros((size, size, c))
    for i in range(size):
        for j in range(size):
            yy, xx = p + d * (m * ta + i + offset), q + d * (m * tb + j + offset)
            if 0 <= yy < h and 0 <= xx < w:
                tile[i, j] = a[img, yy, xx]
    return tile


def _hand_input(x, d, row0, rows):
    n, h, w, c = x.shape
    return np.stack([np.einsum("ai,ijc,bj->abc", BT, _gather(x, d, *t, size=6, offset=-1), BT).reshape(36, c)
                     for t in _tiles(n, h, w, d, row0, rows)], axis=1)


def _hand_output(m, bias, d, row0, rows, y):
    n, h, w, o = y.shape
    for t, (img, p, q, ta, tb) in enumerate(_tiles(n, h, w, d, row0, rows)):
        z = np.einsum("ai,ijo,bj->abo", AT, m[:, t].reshape(6, 6, o), AT) + bias
        for i in range(4):
            for j in range(4):
                yy, xx = p + d * (4 * ta + i), q + d * (4 * tb + j)
                if yy < h and xx < w:
                    y[img, yy, xx] = z[i, j]
    return y


def _hand_output_grad(dy, d, row0, rows):
    n, h, w, o = dy.shape
    return np.stack([np.einsum("ia,ijo,jb->abo", AT, _gather(dy, d, *t, size=4, offset=0), AT).reshape(36, o)
                     for t in _tiles(n, h, w, d, row0, rows)], axis=1)


def _close(a, b):
    scale = max(1.0, float(np.abs(b).max()))
    return float(np.abs(np.asarray(a, np.float64) - b).max()) <= 2e-6 * scale


@pytest.mark.parametrize("n,h,w,c,d", SHAPES)
def test_input_transform_matches_hand_evaluation_and_reference(rng, n, h, w, c, d):
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    x[0, 0, 0, 0] = 1e4  # an edge value: the scale passes through
    xt = torch.from_numpy(x)
    th, _ = _grid(h, w, d)
    for row0, rows in _chunks(th):
        want = _hand_input(x.astype(np.float64), d, row0, rows)
        got = ops.winograd_input(xt, d, row0, rows)
        assert got.shape == want.shape and _close(got, want), (row0, rows)
        out = torch.full(want.shape, float("nan"))  # a given out is written whole
        assert ops.winograd_input(xt, d, row0, rows, out) is out and _close(out, want)
        assert _close(ref.winograd_input(xt, d, row0, rows), want)


@pytest.mark.parametrize("n,h,w,c,d", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_output_transform_matches_hand_evaluation_and_reference(rng, n, h, w, c, d, with_bias):
    o = c  # output channels: the same odd counts
    th, tw = _grid(h, w, d)
    bias = rng.standard_normal(o).astype(np.float32) if with_bias else None
    y = torch.full((n, h, w, o), float("nan"))
    y_ref = y.clone()
    want = np.full((n, h, w, o), np.nan)
    for row0, rows in [(r, 1) for r in range(th)]:  # every tile row once: every pixel written once
        m = rng.standard_normal((36, n * d * d * rows * tw, o)).astype(np.float32)
        bt = None if bias is None else torch.from_numpy(bias)
        assert ops.winograd_output(torch.from_numpy(m), bt, d, row0, rows, y) is y
        ref.winograd_output(torch.from_numpy(m), bt, d, row0, rows, y_ref)
        _hand_output(m.astype(np.float64), 0.0 if bias is None else bias.astype(np.float64), d, row0, rows, want)
    assert not np.isnan(want).any() and not torch.isnan(y).any()
    assert _close(y, want) and _close(y_ref, want)


@pytest.mark.parametrize("n,h,w,c,d", SHAPES)
def test_output_gradient_transform_matches_hand_evaluation_reference_and_is_the_adjoint(rng, n, h, w, c, d):
    dy = rng.standard_normal((n, h, w, c)).astype(np.float32)
    dyt = torch.from_numpy(dy)
    th, tw = _grid(h, w, d)
    for row0, rows in _chunks(th):
        want = _hand_output_grad(dy.astype(np.float64), d, row0, rows)
        got = ops.winograd_output_grad(dyt, d, row0, rows)
        assert got.shape == want.shape and _close(got, want), (row0, rows)
        assert _close(ref.winograd_output_grad(dyt, d, row0, rows), want)
    # <winograd_output(m), dy> = <m, winograd_output_grad(dy)> over the whole map: the adjoint
    m = rng.standard_normal((36, n * d * d * th * tw, c)).astype(np.float32)
    y = ops.winograd_output(torch.from_numpy(m), None, d, 0, th, torch.zeros(n, h, w, c))
    lhs = float((y.double() * dyt.double()).sum())
    rhs = float((torch.from_numpy(m).double() * ops.winograd_output_grad(dyt, d, 0, th).double()).sum())
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-3)


def test_zeros_stay_exact_and_threads_do_not_change_results(rng):
    x = torch.zeros(2, 9, 11, 70)
    assert torch.count_nonzero(ops.winograd_input(x, 2, 0, 2)) == 0
    x = torch.from_numpy(rng.standard_normal((2, 23, 19, 70)).astype(np.float32))
    one = ops.winograd_input(x, 1, 0, 6, num_threads=1)
    assert torch.equal(one, ops.winograd_input(x, 1, 0, 6, num_threads=3))
    m = torch.from_numpy(rng.standard_normal((36, one.shape[1], 70)).astype(np.float32))
    y1 = ops.winograd_output(m, None, 1, 0, 6, torch.empty(2, 23, 19, 70), num_threads=1)
    assert torch.equal(y1, ops.winograd_output(m, None, 1, 0, 6, torch.empty(2, 23, 19, 70), num_threads=3))


@pytest.mark.parametrize("use_ref", [False, True], ids=["cpp", "reference"])
def test_bad_arguments_name_what_was_expected(use_ref):
    previous = kernels.reference_enabled()
    kernels.use_reference(use_ref)
    try:
        x = torch.zeros(1, 8, 8, 3)
        with pytest.raises(TypeError, match="x must have dtype float32"):
            ops.winograd_input(x.double(), 1, 0, 1)
        with pytest.raises(ValueError, match="x must have 4 dimensions"):
            ops.winograd_input(torch.zeros(8, 8, 3), 1, 0, 1)
        with pytest.raises(ValueError, match="x must be contiguous"):
            ops.winograd_input(torch.zeros(1, 3, 8, 8).permute(0, 2, 3, 1), 1, 0, 1)
        with pytest.raises(ValueError, match="dilation must be an int >= 1"):
            ops.winograd_input(x, 0, 0, 1)
        with pytest.raises(ValueError, match=r"tile rows \[row0, row0 \+ rows\) = \[1, 3\) must lie within \[0, 2\)"):
            ops.winograd_input(x, 1, 1, 2)
        with pytest.raises(ValueError, match=r"must have shape"):
            ops.winograd_input(x, 1, 0, 2, out=torch.zeros(36, 3, 3))
        y = torch.zeros(1, 8, 8, 4)
        with pytest.raises(ValueError, match=r"m must have shape"):
            ops.winograd_output(torch.zeros(36, 3, 4), None, 1, 0, 2, y)
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)|bias must have 1"):
            ops.winograd_output(torch.zeros(36, 4, 4), torch.zeros(5), 1, 0, 2, y)
        with pytest.raises(TypeError, match="m must have dtype float32"):
            ops.winograd_output(torch.zeros(36, 4, 4, dtype=torch.float64), None, 1, 0, 2, y)
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            ops.winograd_input(x, 1, 0, 1, num_threads=0)
        with pytest.raises(TypeError, match="dy must have dtype float32"):
            ops.winograd_output_grad(x.double(), 1, 0, 1)
        with pytest.raises(ValueError, match=r"tile rows \[row0, row0 \+ rows\) = \[2, 3\)"):
            ops.winograd_output_grad(x, 1, 2, 1)
    finally:
        kernels.use_reference(previous)
