"""The bfloat16 Winograd F(2x2, 3x3) transforms (kernels/csrc/winograd_bf16.cpp) against their torch
reference (kernels/reference_winograd.py: bit for bit where the float32 arithmetic is the same)
and against a float64 hand evaluation of Lavin & Gray's F(2x2, 3x3) tile by tile, within the one
bfloat16 rounding the kernels promise; chunks, odd channel counts, dilations, argument errors."""
import numpy as np
import pytest
import torch

import kernels
from kernels import ops
from kernels import reference_winograd as ref
from test_kernels_winograd import _chunks, _gather, _grid, _tiles

# Lavin & Gray (CVPR 2016), F(2x2, 3x3), points 0, +-1, infinity: written out again here so that
# the hand evaluation does not read the matrices from the code under test
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
SHAPES = [(1, 8, 8, 3, 1), (2, 9, 13, 5, 1), (1, 1, 1, 1, 1), (1, 17, 10, 64, 2), (2, 11, 7, 65, 3),
          (1, 5, 3, 130, 4), (1, 3, 4, 7, 6)]
# bfloat16 keeps 8 significant bits: one rounding to nearest is within 2^-8 of the value (relative)
HALF_ULP = 2.0 ** -8


def bf16(rng, *shape, scale=1.0):
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32)).bfloat16()


def f64(t):
    return t.double().numpy()


def _within_one_rounding(got, exact):
    """got (bf16) is exact rounded once (plus float32-level error before the rounding)."""
    err = np.abs(f64(got) - exact)
    return bool((err <= HALF_ULP * np.abs(exact) * (1 + 1e-4) + 1e-30).all())


def _hand_input(x, d, row0, rows):
    n, h, w, c = x.shape
    return np.stack([np.einsum("ai,ijc,bj->abc", BT, _gather(x, d, *t, size=4, offset=-1, m=2), BT).reshape(16, c)
                     for t in _tiles(n, h, w, d, row0, rows, m=2)], axis=1)


def _hand_output(m, bias, d, row0, rows, y):
    n, h, w, o = y.shape
    for t, (img, p, q, ta, tb) in enumerate(_tiles(n, h, w, d, row0, rows, m=2)):
        z = np.einsum("ai,ijo,bj->abo", AT, m[:, t].reshape(4, 4, o), AT) + bias
        for i in range(2):
            for j in range(2):
                yy, xx = p + d * (2 * ta + i), q + d * (2 * tb + j)
                if yy < h and xx < w:
                    y[img, yy, xx] = z[i, j]
    return y


@pytest.mark.parametrize("n,h,w,c,d", SHAPES)
def test_input_transform_matches_hand_evaluation_and_reference(rng, n, h, w, c, d):
    x = bf16(rng, n, h, w, c)
    th, _ = _grid(h, w, d, 2)
    for row0, rows in _chunks(th):
        got = ops.winograd2_input(x, d, row0, rows)
        assert got.dtype == torch.bfloat16 and got.shape == (16, n * d * d * rows * _grid(h, w, d, 2)[1], c)
        assert _within_one_rounding(got, _hand_input(f64(x), d, row0, rows))
        # each entry is +-a +-b of two float32 sums of two bf16 values, then one rounding: bit-exact
        assert torch.equal(got, ref.winograd2_input(x, d, row0, rows))


@pytest.mark.parametrize("n,h,w,c,d", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_output_transform_matches_hand_evaluation_and_reference(rng, n, h, w, c, d, with_bias):
    th, tw = _grid(h, w, d, 2)
    bias = torch.from_numpy(rng.standard_normal(c).astype(np.float32)) if with_bias else None
    for row0, rows in _chunks(th):
        m = bf16(rng, 16, n * d * d * rows * tw, c)
        got = ops.winograd2_output(m, bias, d, row0, rows, torch.full((n, h, w, c), 3.0, dtype=torch.bfloat16))
        want = _hand_output(f64(m), 0.0 if bias is None else bias.double().numpy(), d, row0, rows,
                            np.full((n, h, w, c), 3.0))
        assert _within_one_rounding(got, want)  # also: pixels of other chunks keep their 3.0
        # the reference sums the three terms of a row of A^T in matmul's order: at most one bf16 step apart
        other = ref.winograd2_output(m, bias, d, row0, rows, torch.full((n, h, w, c), 3.0, dtype=torch.bfloat16))
        apart = np.abs(f64(got) - f64(other))
        assert (apart <= 2 * HALF_ULP * np.abs(f64(other)) + 1e-30).all()  # one bf16 step
        assert (apart == 0).mean() > 0.99


def test_edge_values_round_like_torch(rng):
    # large magnitudes (four of them still sum below float32's overflow), bf16 subnormals, and sums
    # that tie between two bf16 values (1 + 2^-8, 1 + 2^-7 + 2^-8): the one rounding of the result is
    # torch's (nearest, ties to even), bit for bit
    x = torch.tensor([8e37, -8e37, 1e-38, -1e-39, 0.0, 1.0, 2.0 ** -8, 1.0 + 2.0 ** -7, -2.0 ** -126],
                     dtype=torch.float32).bfloat16()
    x = x[torch.from_numpy(rng.integers(0, len(x), 2 * 7 * 6 * 9))].view(2, 7, 6, 9)
    got = ops.winograd2_input(x, 1, 0, 4)
    assert torch.isfinite(got).all() and torch.equal(got, ref.winograd2_input(x, 1, 0, 4))


def test_zeros_stay_exact_and_threads_do_not_change_results(rng):
    assert torch.count_nonzero(ops.winograd2_input(torch.zeros(2, 9, 11, 70, dtype=torch.bfloat16), 2, 0, 3)) == 0
    x = bf16(rng, 2, 23, 19, 70)
    one = ops.winograd2_input(x, 1, 0, 12, num_threads=1)
    assert torch.equal(one, ops.winograd2_input(x, 1, 0, 12, num_threads=3))
    m = bf16(rng, 16, one.shape[1], 70)
    y1 = ops.winograd2_output(m, None, 1, 0, 12, torch.empty(2, 23, 19, 70, dtype=torch.bfloat16), num_threads=1)
    assert torch.equal(y1, ops.winograd2_output(m, None, 1, 0, 12, torch.empty_like(y1), num_threads=3))


@pytest.mark.parametrize("use_ref", [False, True], ids=["cpp", "reference"])
def test_bad_arguments_name_what_was_expected(use_ref):
    previous = kernels.reference_enabled()
    kernels.use_reference(use_ref)
    try:
        x = torch.zeros(1, 8, 8, 3, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="x must have dtype bfloat16, got float32"):
            ops.winograd2_input(x.float(), 1, 0, 1)
        with pytest.raises(ValueError, match="x must have 4 dimensions"):
            ops.winograd2_input(x[0], 1, 0, 1)
        with pytest.raises(ValueError, match="dilation must be an int >= 1"):
            ops.winograd2_input(x, 0, 0, 1)
        with pytest.raises(ValueError, match=r"tile rows \[row0, row0 \+ rows\) = \[3, 5\) must lie within \[0, 4\)"):
            ops.winograd2_input(x, 1, 3, 2)
        with pytest.raises(ValueError, match="must have shape"):
            ops.winograd2_input(x, 1, 0, 4, out=torch.zeros(16, 3, 3, dtype=torch.bfloat16))
        y = torch.zeros(1, 8, 8, 4, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="m must have shape"):
            ops.winograd2_output(torch.zeros(16, 3, 4, dtype=torch.bfloat16), None, 1, 0, 4, y)
        with pytest.raises(TypeError, match="m must have dtype bfloat16"):
            ops.winograd2_output(torch.zeros(16, 16, 4), None, 1, 0, 4, y)
        with pytest.raises(TypeError, match="bias must have dtype float32"):
            ops.winograd2_output(torch.zeros(16, 16, 4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16),
                                 1, 0, 4, y)
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            ops.winograd2_input(x, 1, 0, 1, num_threads=0)
    finally:
        kernels.use_reference(previous)


def test_the_cpp_op_rejects_arrays_that_are_not_bf16_bits():
    from kernels import _C
    with pytest.raises(TypeError, match=r"x must hold bfloat16 bits as int16 .* got dtype float32"):
        _C.winograd2_input(np.zeros((1, 4, 4, 2), np.float32), 1, 0, 1)
