"""Backend selection (C++ / reference, KERNELS_REFERENCE, unbuilt extension) and argument
validation: every bad argument is rejected by both backends with an error naming it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from kernels import _C, ops

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)


def run_python(code, cwd, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "KERNELS_REFERENCE"}
    env.update(env_extra)
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_use_reference_switches_backend():
    previous = kernels.reference_enabled()
    try:
        kernels.use_reference(True)
        assert kernels.reference_enabled() and ops.backend() == "reference"
        kernels.use_reference(False)
        assert not kernels.reference_enabled() and ops.backend() == "cpp"
    finally:
        kernels.use_reference(previous)
    with pytest.raises(TypeError, match="flag"):
        kernels.use_reference("yes")


@pytest.mark.parametrize("value,expected", [("1", "reference"), ("0", "cpp"), ("", "cpp")])
def test_environment_variable_selects_backend_in_a_fresh_process(value, expected):
    result = run_python("from kernels import ops; print(ops.backend())", REPO, {"KERNELS_REFERENCE": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_invalid_environment_value_is_an_error():
    result = run_python("import kernels", REPO, {"KERNELS_REFERENCE": "maybe"})
    assert result.returncode != 0 and "KERNELS_REFERENCE" in result.stderr


def test_unbuilt_extension_raises_with_build_hint_unless_reference_forced():
    # An unbuilt extension, as after a plain checkout. Blocking the module in sys.modules makes the
    # import fail for real whatever finders are installed (an editable install's finder would
    # otherwise locate the .so of the source tree even from a copy of the package).
    code = ("import sys; sys.modules['kernels._C'] = None\n"
            "import numpy as np; from kernels import ops\n"
            "t = np.arange(256, dtype=np.uint8)[::-1].copy()\n"
            "print(ops.backend(), ops.label_lookup(np.array([0, 1, 255], np.uint8), t).tolist())")
    result = run_python(code, REPO, {})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "pip install -e ." in result.stderr
    forced = run_python(code, REPO, {"KERNELS_REFERENCE": "1"})
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip().split(maxsplit=1) == ["reference", "[255, 254, 0]"]


# --- validation: (op, arguments, exception, text the message must contain) ----------------------

def img(h=8, w=8, c=3, dtype=np.uint8):
    return np.zeros((h, w, c), dtype)


def lab(h=8, w=8, dtype=np.uint8):
    return np.zeros((h, w), dtype)


TABLE = np.arange(256, dtype=np.uint8)
READ_ONLY = lab()
READ_ONLY.flags.writeable = False
SHARED = np.zeros((8, 8, 3), np.uint8)
SQUARE = np.array([[0, 0], [5, 0], [5, 5]], float)

CASES = [
    ("resize_crop", lambda: ([[1, 2]], (4, 4), (0, 0, 2, 2)), {}, TypeError, "src"),
    ("resize_crop", lambda: (img(dtype=np.float32), (4, 4), (0, 0, 2, 2)), {}, TypeError, "src"),
    ("resize_crop", lambda: (np.zeros((2, 2, 2, 3), np.uint8), (4, 4), (0, 0, 2, 2)), {}, ValueError, "src"),
    ("resize_crop", lambda: (img(c=5), (4, 4), (0, 0, 2, 2)), {}, ValueError, "src"),
    ("resize_crop", lambda: (img()[:, ::2], (4, 4), (0, 0, 2, 2)), {}, ValueError, "src"),
    ("resize_crop", lambda: (img(h=0), (4, 4), (0, 0, 2, 2)), {}, ValueError, "src"),
    ("resize_crop", lambda: (img(), (0, 4), (0, 0, 1, 1)), {}, ValueError, "out_size"),
    ("resize_crop", lambda: (img(), (4,), (0, 0, 1, 1)), {}, TypeError, "out_size"),
    ("resize_crop", lambda: (img(), (4.5, 4), (0, 0, 1, 1)), {}, TypeError, "out_size"),
    ("resize_crop", lambda: (img(), (4, 4), (3, 0, 2, 2)), {}, ValueError, "crop"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 0, 2)), {}, ValueError, "crop"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2)), {}, TypeError, "crop"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"interp": "cubic"}, ValueError, "interp"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"flip": "yes"}, TypeError, "flip"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"out": np.zeros((2, 3, 3), np.uint8)}, ValueError, "out"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"out": np.zeros((2, 2, 3), np.int16)}, TypeError, "out"),
    ("resize_crop", lambda: (SHARED, (4, 4), (0, 0, 2, 2)), {"out": SHARED.reshape(-1)[:12].reshape(2, 2, 3)}, ValueError, "out"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"num_threads": 0}, ValueError, "num_threads"),
    ("resize_crop", lambda: (img(), (4, 4), (0, 0, 2, 2)), {"num_threads": 1.5}, TypeError, "num_threads"),
    ("label_histogram", lambda: (lab(dtype=np.int32),), {}, TypeError, "label"),
    ("label_histogram", lambda: (img(),), {}, ValueError, "label"),
    ("label_histogram", lambda: (lab(), (0, 0, 9, 1)), {}, ValueError, "window"),
    ("label_histogram", lambda: (lab(), (0, 0, 1)), {}, TypeError, "window"),
    ("label_histogram", lambda: (lab(),), {"ignore_index": "255"}, TypeError, "ignore_index"),
    ("photometric", lambda: (lab(),), {}, ValueError, "img"),
    ("photometric", lambda: (img(c=4),), {}, ValueError, "img"),
    ("photometric", lambda: (img(dtype=np.float32),), {}, TypeError, "img"),
    ("photometric", lambda: (img(),), {"brightness_delta": "1"}, TypeError, "brightness_delta"),
    ("photometric", lambda: (img(),), {"contrast_alpha": float("nan")}, ValueError, "contrast_alpha"),
    ("photometric", lambda: (img(),), {"saturation_alpha": 1e39}, ValueError, "saturation_alpha"),
    ("photometric", lambda: (img(),), {"hue_delta": 1.5}, TypeError, "hue_delta"),
    ("photometric", lambda: (img(),), {"contrast_first": 1}, TypeError, "contrast_first"),
    ("photometric", lambda: (img(),), {"out": img(w=9)}, ValueError, "out"),
    ("normalize", lambda: (img(dtype=np.float32), MEAN, STD), {}, TypeError, "img"),
    ("normalize", lambda: (img(c=4), MEAN, STD), {}, ValueError, "img"),
    ("normalize", lambda: (lab(), MEAN, STD), {}, ValueError, "img"),
    ("normalize", lambda: (torch.zeros(8, 8, 3, dtype=torch.uint8).transpose(0, 1), MEAN, STD), {}, ValueError, "img"),
    ("normalize", lambda: ([1, 2, 3], MEAN, STD), {}, TypeError, "img"),
    ("normalize", lambda: (img(), (1.0, 2.0), STD), {}, ValueError, "mean"),
    ("normalize", lambda: (img(), MEAN, (1.0, 0.0, 1.0)), {}, ValueError, "std"),
    ("normalize", lambda: (img(), MEAN, STD), {"dtype": torch.float16}, ValueError, "dtype"),
    ("normalize", lambda: (img(), MEAN, STD), {"out": torch.empty(3, 8, 9)}, ValueError, "out"),
    ("normalize", lambda: (img(), MEAN, STD), {"out": np.empty((3, 8, 8), np.float32)}, TypeError, "out"),
    ("normalize", lambda: (img(), MEAN, STD), {"to_rgb": None}, TypeError, "to_rgb"),
    ("label_lookup", lambda: (lab(dtype=np.int64), TABLE), {}, TypeError, "label"),
    ("label_lookup", lambda: (lab(), TABLE[:255]), {}, ValueError, "table"),
    ("label_lookup", lambda: (lab(), TABLE.astype(np.int32)), {}, TypeError, "table"),
    ("label_lookup", lambda: (lab(), TABLE), {"out": lab(w=9)}, ValueError, "out"),
    ("label_lookup", lambda: (lab(), TABLE), {"out": READ_ONLY}, ValueError, "out"),
    ("confusion_matrix", lambda: (lab(dtype=np.float32), lab(), 19), {}, TypeError, "pred"),
    ("confusion_matrix", lambda: (lab(), lab(dtype=np.int16), 19), {}, TypeError, "label"),
    ("confusion_matrix", lambda: (lab(), lab(w=9), 19), {}, ValueError, "pred and label"),
    ("confusion_matrix", lambda: (lab(), lab(), 0), {}, ValueError, "num_classes"),
    ("confusion_matrix", lambda: (lab(), lab(), 2.5), {}, TypeError, "num_classes"),
    ("confusion_matrix", lambda: (lab(), lab() + 19, 19), {}, ValueError, "label has value 19"),
    ("confusion_matrix", lambda: (lab() + 30, lab(), 19), {}, ValueError, "pred has value 30"),
    ("fill_polygons", lambda: (img(), [SQUARE], [1]), {}, ValueError, "canvas"),
    ("fill_polygons", lambda: (READ_ONLY, [SQUARE], [1]), {}, ValueError, "canvas"),
    ("fill_polygons", lambda: (lab(), SQUARE, [1]), {}, TypeError, "polygons"),
    ("fill_polygons", lambda: (lab(), [np.zeros((3, 3))], [1]), {}, ValueError, "polygons[0]"),
    ("fill_polygons", lambda: (lab(), [SQUARE, SQUARE[:1]], [1, 2]), {}, ValueError, "polygons[1]"),
    ("fill_polygons", lambda: (lab(), [SQUARE * np.nan], [1]), {}, ValueError, "polygons[0]"),
    ("fill_polygons", lambda: (lab(), [SQUARE], [1, 2]), {}, ValueError, "values"),
    ("fill_polygons", lambda: (lab(), [SQUARE], [256]), {}, ValueError, "values[0]"),
    ("fill_polygons", lambda: (lab(), [SQUARE], [1.5]), {}, TypeError, "values[0]"),
]


@pytest.mark.parametrize("op,make_args,kwargs,error,text", CASES,
                         ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments_are_rejected_naming_them(backend, op, make_args, kwargs, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        getattr(ops, op)(*make_args(), **kwargs)


def test_fill_polygons_leaves_canvas_untouched_on_bad_input(backend):
    canvas = lab()
    with pytest.raises(ValueError):
        ops.fill_polygons(canvas, [SQUARE, SQUARE[:1]], [7, 7])
    assert not canvas.any()


# The extension validates on its own too (for callers that skip kernels.ops).
DIRECT_CASES = [
    (lambda: _C.resize_crop(img(), 4, 4, 0, 0, 2, 2, False, "bilinear", None, -1), ValueError, "num_threads"),
    (lambda: _C.resize_crop(img(), 4, 4, 3, 3, 2, 2, False, "bilinear", None, 1), ValueError, "crop"),
    (lambda: _C.resize_crop("x", 4, 4, 0, 0, 2, 2, False, "bilinear", None, 1), TypeError, "src"),
    (lambda: _C.photometric(img(), float("inf"), None, None, None, True, None, 1), ValueError, "brightness_delta"),
    (lambda: _C.normalize(np.zeros((1, 8, 8, 3), np.uint8), [1.0, 2.0], [1.0, 1.0, 1.0], True, False,
                          np.empty((1, 3, 8, 8), np.float32), 1), ValueError, "mean"),
    (lambda: _C.normalize(np.zeros((1, 8, 8, 3), np.uint8), [1.0] * 3, [1.0] * 3, True, False,
                          np.empty((1, 3, 8, 8), np.float64), 1), TypeError, "out"),
    (lambda: _C.normalize(np.zeros((1, 8, 8, 3), np.uint8), [1.0] * 3, [1.0] * 3, True, True,
                          np.empty((1, 3, 8, 8), np.float32), 1), TypeError, "out"),
    (lambda: _C.normalize(np.zeros((8, 8, 3), np.uint8), [1.0] * 3, [1.0] * 3, True, False,
                          np.empty((1, 3, 8, 8), np.float32), 1), ValueError, "img"),
    (lambda: _C.label_histogram(lab(), 0, 0, 9, 9, False, 255), ValueError, "window"),
    (lambda: _C.confusion_matrix(lab(dtype=np.float64), lab(), 3, 255, 1), TypeError, "pred"),
    (lambda: _C.confusion_matrix(lab(), lab(), 70000, 255, 1), ValueError, "num_classes"),
    (lambda: _C.fill_polygons(lab(), [SQUARE.astype(np.int32)], [1]), TypeError, r"polygons\[0\]"),
    (lambda: _C.fill_polygons(lab(), [np.asfortranarray(np.zeros((2, 2)))], [1]), ValueError, r"polygons\[0\]"),
    (lambda: _C.fill_polygons(lab(), [SQUARE], [np.int64(3)]), TypeError, r"values\[0\]"),
    (lambda: _C.label_lookup(lab(), TABLE, lab()[:, :4], 1), ValueError, "out"),
]


@pytest.mark.parametrize("call,error,text", DIRECT_CASES, ids=[str(i) for i in range(len(DIRECT_CASES))])
def test_extension_validates_its_own_arguments(call, error, text):
    with pytest.raises(error, match=text):
        call()
