"""label_lookup, label_histogram and confusion_matrix: C++ against the reference and against
independent numpy/torch formulas (normalize has its own file, test_kernels_normalize.py)."""

import numpy as np
import pytest
import torch

from kernels import ops
from kernels import reference as ref

pytestmark = pytest.mark.usefixtures("cpp_backend")  # C++ path unless a test says otherwise


# --- label_lookup ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (7, 13), (3, 5, 17), (300, 301)])
def test_lookup_equals_fancy_indexing(rng, shape):
    label = rng.integers(0, 256, shape, dtype=np.uint8)
    table = rng.integers(0, 256, 256, dtype=np.uint8)
    got = ops.label_lookup(label, table)
    np.testing.assert_array_equal(got, table[label])
    np.testing.assert_array_equal(got, ref.label_lookup(label, table))


def test_lookup_in_place_out_and_threads(rng):
    label = rng.integers(0, 256, (400, 500), dtype=np.uint8)
    table = rng.permutation(256).astype(np.uint8)
    want = table[label]
    for n in (1, 2, 3, 8):
        np.testing.assert_array_equal(ops.label_lookup(label, table, num_threads=n), want)
    out = np.empty_like(label)
    assert ops.label_lookup(label, table, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert ops.label_lookup(label, table, out=label) is label
    np.testing.assert_array_equal(label, want)


# --- label_histogram ---------------------------------------------------------------------------

def test_histogram_counts_window_and_zeroes_ignore(rng):
    label = rng.integers(0, 256, (61, 77), dtype=np.uint8)
    label[:, :9] = 255
    for window in [None, (0, 0, 61, 77), (5, 3, 20, 31), (60, 76, 1, 1), (10, 10, 0, 5)]:
        got = ops.label_histogram(label, window)
        y0, x0, h, w = window or (0, 0, 61, 77)
        want = np.bincount(label[y0:y0 + h, x0:x0 + w].ravel(), minlength=256)
        want[255] = 0
        assert got.dtype == np.int64 and got.shape == (256,)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, ref.label_histogram(label, window))


def test_histogram_other_ignore_index(rng):
    label = rng.integers(0, 4, (9, 9), dtype=np.uint8)
    got = ops.label_histogram(label, ignore_index=2)
    assert got[2] == 0 and got.sum() == (label != 2).sum()
    np.testing.assert_array_equal(ops.label_histogram(label, ignore_index=-1), np.bincount(label.ravel(), minlength=256))


# --- confusion_matrix --------------------------------------------------------------------------

def numpy_confusion(pred, label, k, ignore):
    keep = label != ignore
    return np.bincount(label[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


@pytest.mark.parametrize("pred_dtype", [np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("label_dtype", [np.uint8, np.int32, np.int64])
def test_confusion_all_dtype_pairs(rng, pred_dtype, label_dtype):
    label = rng.integers(0, 19, (37, 41)).astype(label_dtype)
    label[::4, ::3] = 255
    pred = rng.integers(0, 19, (37, 41)).astype(pred_dtype)
    got = ops.confusion_matrix(pred, label, 19)
    assert got.dtype == np.int64 and got.shape == (19, 19)
    np.testing.assert_array_equal(got, numpy_confusion(pred, label, 19, 255))
    np.testing.assert_array_equal(got, ref.confusion_matrix(pred, label, 19))


def test_confusion_threads_torch_inputs_and_other_ignore(rng):
    label = rng.integers(-1, 150, 500_000).astype(np.int64)
    pred = rng.integers(0, 150, 500_000).astype(np.int64)
    want = numpy_confusion(pred, label, 150, -1)
    for n in (1, 2, 3, 8):
        np.testing.assert_array_equal(ops.confusion_matrix(pred, label, 150, ignore_index=-1, num_threads=n), want)
    got = ops.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 150, ignore_index=-1)
    np.testing.assert_array_equal(got, want)


def test_confusion_single_class_and_empty():
    assert ops.confusion_matrix(np.zeros(5, np.uint8), np.zeros(5, np.uint8), 1).tolist() == [[5]]
    assert ops.confusion_matrix(np.zeros(0, np.uint8), np.zeros(0, np.uint8), 3).sum() == 0


def test_confusion_reports_first_bad_value_for_any_thread_count(rng):
    label = rng.integers(0, 19, 300_000).astype(np.uint8)
    pred = rng.integers(0, 19, 300_000).astype(np.uint8)
    label[250_000] = 40
    pred[200_000] = 19
    label[100_000] = 255  # ignored pixels are never checked
    pred[100_000] = 200
    messages = set()
    for n in (1, 2, 4):
        with pytest.raises(ValueError, match="pred has value 19 at flat index 200000") as info:
            ops.confusion_matrix(pred, label, 19, num_threads=n)
        messages.add(str(info.value))
    with pytest.raises(ValueError) as info:
        ref.confusion_matrix(pred, label, 19)
    messages.add(str(info.value))
    assert len(messages) == 1
    pred[200_000] = 0
    with pytest.raises(ValueError, match="label has value 40 at flat index 250000"):
        ops.confusion_matrix(pred, label, 19, num_threads=3)
