"""ops.bn_act_*: the C++ kernels against kernels.reference_bn on fresh random inputs (odd channel
counts, one pixel, constant channels, extreme values), thread-count determinism, in-place
forward, every validation error on both backends, and the whole pipeline against torch's own
batch_norm + leaky_relu autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _C, ops, reference_bn

SHAPES = [(1, 1), (1, 5), (7, 3), (33, 17), (257, 37), (3000, 64)]  # [M pixels, C channels]
MODES = [(0.01, True), (1.0, True), (0.0, False), (0.01, False)]  # (slope, src_is_output)


def on(backend_name, fn):
    previous = kernels.reference_enabled()
    kernels.use_reference(backend_name == "reference")
    try:
        return fn()
    finally:
        kernels.use_reference(previous)


def tensor(rng, shape, scale=1.0, offset=0.0):
    return torch.from_numpy((rng.standard_normal(shape) * scale + offset).astype(np.float32))


def params(rng, c):
    """weight with |w| in [0.5, 1.5] and both signs (negative gammas must invert too), bias."""
    sign = np.where(np.arange(c) % 3 == 1, -1.0, 1.0)
    w = torch.from_numpy((rng.uniform(0.5, 1.5, c) * sign).astype(np.float32))
    return w, tensor(rng, (c,), 0.3)


def pipeline(x, w, b, slope, from_output, residual, dy, threads=None, eps=1e-5):
    """stats -> forward -> reduce -> dx on the current backend (a training step of the layer)."""
    mean, var = ops.bn_act_stats(x, num_threads=threads)
    m, invstd = mean.float(), torch.rsqrt(var + eps).float()
    y = ops.bn_act_forward(x, m, invstd, w, b, slope, residual, num_threads=threads)
    src = y if from_output else x
    dres = None if residual is None else torch.empty_like(x)
    sum_g, sum_gx = ops.bn_act_backward_reduce(src, dy, m, invstd, w, b, slope, from_output, residual, dres,
                                               num_threads=threads)
    n = x.shape[0]
    dx = ops.bn_act_backward(src, dy, m, invstd, w, b, (sum_g / n).float(), (sum_gx / n).float(), slope,
                             from_output, residual, num_threads=threads)
    return {"mean": mean, "var": var, "y": y, "sum_g": sum_g, "sum_gx": sum_gx, "dx": dx, "dres": dres}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("slope,from_output", MODES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpp_matches_reference(rng, shape, slope, from_output, with_residual):
    m, c = shape
    x = tensor(rng, shape, 2.0, 0.5)
    w, b = params(rng, c)
    dy = tensor(rng, shape)
    r = tensor(rng, shape) if with_residual else None
    got = on("cpp", lambda: pipeline(x, w, b, slope, from_output, r, dy))
    want = on("reference", lambda: pipeline(x, w, b, slope, from_output, r, dy))
    # Statistics: both in double (shifted sums in C++, torch.var_mean in float64 for the reference).
    torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["var"], want["var"], rtol=1e-10, atol=1e-12)
    for key in ("y", "dx", "sum_g", "sum_gx"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)

    # Given the same per-channel inputs, every elementwise result is the same float arithmetic:
    # bit for bit. The two sums differ only by summation order (and the reference rounding g*x_hat
    # to float before its double sum).
    mean, invstd = want["mean"].float(), torch.rsqrt(want["var"] + 1e-5).float()
    both = lambda fn: (on("cpp", fn), on("reference", fn))  # noqa: E731
    y_cpp, y_ref = both(lambda: ops.bn_act_forward(x, mean, invstd, w, b, slope, r))
    assert torch.equal(y_cpp, y_ref)
    src = y_ref if from_output else x
    d_cpp, d_ref = torch.empty_like(x), torch.empty_like(x)
    sg_cpp, sgx_cpp = on("cpp", lambda: ops.bn_act_backward_reduce(src, dy, mean, invstd, w, b, slope, from_output,
                                                                   r, None if r is None else d_cpp))
    sg_ref, sgx_ref = on("reference", lambda: ops.bn_act_backward_reduce(src, dy, mean, invstd, w, b, slope,
                                                                         from_output, r, None if r is None else d_ref))
    xh, g = reference_bn.grad_terms(src, dy, mean, invstd, w, b, slope, from_output, r)
    abs_g, abs_gx = g.double().abs().sum(0), (g.double() * xh.double()).abs().sum(0)
    assert ((sg_cpp - sg_ref).abs() <= 1e-12 * abs_g).all()
    assert ((sgx_cpp - sgx_ref).abs() <= 2e-7 * abs_gx + 1e-12).all()
    if r is not None:
        assert torch.equal(d_cpp, d_ref) and torch.equal(d_cpp, g)
    mg, mgx = (sg_ref / m).float(), (sgx_ref / m).float()
    dx_cpp, dx_ref = both(lambda: ops.bn_act_backward(src, dy, mean, invstd, w, b, mg, mgx, slope, from_output, r))
    assert torch.equal(dx_cpp, dx_ref)


@pytest.mark.parametrize("with_residual", [False, True])
def test_pipeline_matches_torch_autograd(rng, backend, with_residual):
    """Independent source: F.batch_norm (training) + leaky_relu and autograd, in float64."""
    m, c, slope, eps = 501, 13, 0.01, 1e-5
    x, dy = tensor(rng, (m, c), 3.0, -1.0), tensor(rng, (m, c))
    w, b = params(rng, c)
    r = tensor(rng, (m, c)) if with_residual else None
    got = pipeline(x, w, b, slope, True, r, dy, eps=eps)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    rd = None if r is None else r.double().requires_grad_()
    v = F.batch_norm(xd, None, None, wd, bd, True, 0.0, eps)
    yd = F.leaky_relu(v if rd is None else v + rd, slope)
    yd.backward(dy.double())
    torch.testing.assert_close(got["y"].double(), yd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["dx"].double(), xd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["sum_gx"], wd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["sum_g"], bd.grad, rtol=1e-5, atol=1e-5)
    if rd is not None:
        torch.testing.assert_close(got["dres"].double(), rd.grad, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_thread_count(rng, cpp_backend):
    x, dy, r = tensor(rng, (4099, 21), 5.0, 3.0), tensor(rng, (4099, 21)), tensor(rng, (4099, 21))
    w, b = params(rng, 21)
    runs = [pipeline(x, w, b, 0.01, True, r, dy, threads=t) for t in (1, 2, 3)]
    for other in runs[1:]:
        for key in runs[0]:
            assert torch.equal(runs[0][key], other[key]), key


def test_baseline_loops_give_the_avx2_loops_results(rng, cpp_backend):
    x, dy, r = tensor(rng, (1031, 19), 3.0, 1.0), tensor(rng, (1031, 19)), tensor(rng, (1031, 19))
    w, b = params(rng, 19)
    runs = []
    try:
        for force in (False, True):
            _C._bn_act_force_baseline(force)
            runs.append([pipeline(x, w, b, slope, out, r if k else None, dy)
                         for k, (slope, out) in enumerate(MODES)])
    finally:
        _C._bn_act_force_baseline(False)
    for fast, base in zip(*runs):
        for key in fast:
            assert (fast[key] is None and base[key] is None) or torch.equal(fast[key], base[key]), key


@pytest.mark.parametrize("case", ["one_pixel", "constant", "large_offset", "huge", "tiny"])
def test_statistics_at_the_edges_match_float64(rng, backend, case):
    c = 9
    if case == "one_pixel":
        x = tensor(rng, (1, c), 4.0)
    elif case == "constant":
        x = tensor(rng, (200, c))
        x[:, 2] = 7.25
        x[:, 5] = -3e5
    elif case == "large_offset":  # spread 1 on top of 1e6: float32 E[x^2] - E[x]^2 would lose it all
        x = tensor(rng, (300, c), 1.0, 1e6)
    elif case == "huge":
        x = tensor(rng, (100, c), 1e30)
    else:
        x = tensor(rng, (100, c), 1e-40)  # float32 subnormals
    mean, var = ops.bn_act_stats(x)
    x64 = x.numpy().astype(np.float64)
    want_mean = x64.mean(0)
    want_var = ((x64 - want_mean) ** 2).mean(0)  # two-pass, numpy, float64
    # Both sides sum n float64 terms; recursive summation errs by at most (n - 1) u sum|x| (Higham, Accuracy
    # and Stability of Numerical Algorithms, eq. 4.4; summing x - x[0] only lowers it), so a mean near zero
    # amid values near 1 cannot be held to a fixed relative tolerance. Float32 sums would miss it by ~1e8.
    u, n = np.finfo(np.float64).eps / 2, x64.shape[0]
    bound = 2 * n * u * np.abs(x64).mean(0)
    assert (np.abs(mean.numpy() - want_mean) <= bound).all(), (mean.numpy() - want_mean, bound)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-9, atol=1e-300)
    if case in ("one_pixel", "constant"):
        zero = [True] * c if case == "one_pixel" else [j in (2, 5) for j in range(c)]
        assert (var.numpy()[zero] == 0).all()
        # Variance 0: x_hat is 0, the layer emits act(bias) and the backward is finite.
        w, b = params(rng, c)
        out = pipeline(x, w, b, 0.01, True, None, tensor(rng, x.shape))
        assert all(torch.isfinite(t).all() for t in out.values() if t is not None)


def test_zero_weight_channel_recovers_dx_and_gives_zero_dweight(rng, backend):
    m, c = 64, 4
    x, dy = tensor(rng, (m, c)), tensor(rng, (m, c))
    w, b = params(rng, c)
    w[1] = 0.0
    out = pipeline(x, w, b, 0.01, True, None, dy)
    want = pipeline(x, w, b, 0.01, False, None, dy)  # from the input: exact
    assert torch.isfinite(out["dx"]).all()
    torch.testing.assert_close(out["dx"], want["dx"], rtol=1e-4, atol=1e-5)
    assert out["sum_gx"][1] == 0 and want["sum_gx"][1] != 0


def test_forward_in_place(rng, backend):
    x, r = tensor(rng, (50, 7)), tensor(rng, (50, 7))
    w, b = params(rng, 7)
    mean, invstd = torch.zeros(7), torch.full((7,), 0.5)
    want = ops.bn_act_forward(x, mean, invstd, w, b, 0.01, r)
    got = ops.bn_act_forward(x, mean, invstd, w, b, 0.01, r, out=x)
    assert got is x and torch.equal(x, want)


# ---- validation: each bad argument is rejected by both backends, naming it -----------------------

def _good(rng):
    x = tensor(rng, (6, 3))
    ch = torch.ones(3)
    return {"x": x, "ch": ch, "y": tensor(rng, (6, 3)), "dy": tensor(rng, (6, 3))}


BAD = [
    ("stats x not a tensor", lambda g: ops.bn_act_stats(g["x"].numpy()), TypeError, "x must be a torch.Tensor"),
    ("stats x dtype", lambda g: ops.bn_act_stats(g["x"].double()), TypeError, "x must have dtype float32"),
    ("stats x ndim", lambda g: ops.bn_act_stats(g["x"].reshape(-1)), ValueError, "x must have 2 dimensions"),
    ("stats x empty", lambda g: ops.bn_act_stats(g["x"][:0]), ValueError, r"x must be \[M, C\] with M, C >= 1"),
    ("stats x strided", lambda g: ops.bn_act_stats(g["x"].t()), ValueError, "x must be C-contiguous"),
    ("stats threads", lambda g: ops.bn_act_stats(g["x"], num_threads=0), ValueError, "num_threads must be >= 1"),
    ("fwd mean shape", lambda g: ops.bn_act_forward(g["x"], torch.ones(4), g["ch"], g["ch"], g["ch"]),
     ValueError, r"mean must have shape \(3,\)"),
    ("fwd invstd dtype", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"].half(), g["ch"], g["ch"]),
     TypeError, "invstd must have dtype float32"),
    ("fwd weight shape", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], torch.ones(1, 3), g["ch"]),
     ValueError, r"weight must have shape \(3,\)"),
    ("fwd bias", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], g["ch"], [1.0, 2.0, 3.0]),
     TypeError, "bias must be a torch.Tensor"),
    ("fwd slope", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], g["ch"], g["ch"], -0.5),
     ValueError, "slope must be a finite number >= 0"),
    ("fwd residual shape", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], g["ch"], g["ch"], 0.01,
                                                        torch.ones(5, 3)), ValueError, r"residual must have shape \(6, 3\)"),
    ("fwd out overlaps", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], g["ch"], g["ch"], 0.01,
                                                      g["y"], out=g["y"]), ValueError, "out must not overlap residual"),
    ("fwd out part of x", lambda g: ops.bn_act_forward(g["x"][:3], g["ch"], g["ch"], g["ch"], g["ch"], 0.01,
                                                       out=g["x"][1:4]), ValueError, "out must be x itself or not overlap it"),
    ("fwd out shape", lambda g: ops.bn_act_forward(g["x"], g["ch"], g["ch"], g["ch"], g["ch"], out=torch.empty(3, 6)),
     ValueError, r"out must have shape \(6, 3\)"),
    ("reduce dy shape", lambda g: ops.bn_act_backward_reduce(g["y"], g["dy"][:5], g["ch"], g["ch"], g["ch"], g["ch"]),
     ValueError, r"dy must have shape \(6, 3\)"),
    ("reduce relu from output", lambda g: ops.bn_act_backward_reduce(g["y"], g["dy"], g["ch"], g["ch"], g["ch"],
                                                                     g["ch"], 0.0, True),
     ValueError, "slope must be > 0 when src_is_output=True"),
    ("reduce dresidual overlaps dy", lambda g: ops.bn_act_backward_reduce(g["y"], g["dy"], g["ch"], g["ch"], g["ch"],
                                                                          g["ch"], 0.01, True, g["x"], g["dy"]),
     ValueError, "dresidual must not overlap dy"),
    ("reduce src not a tensor", lambda g: ops.bn_act_backward_reduce(None, g["dy"], g["ch"], g["ch"], g["ch"], g["ch"]),
     TypeError, "src must be a torch.Tensor"),
    ("dx mean_g shape", lambda g: ops.bn_act_backward(g["y"], g["dy"], g["ch"], g["ch"], g["ch"], g["ch"],
                                                      torch.ones(2), g["ch"]), ValueError, r"mean_g must have shape \(3,\)"),
    ("dx mean_g_xhat dtype", lambda g: ops.bn_act_backward(g["y"], g["dy"], g["ch"], g["ch"], g["ch"], g["ch"],
                                                           g["ch"], g["ch"].double()),
     TypeError, "mean_g_xhat must have dtype float32"),
    ("dx out is dy", lambda g: ops.bn_act_backward(g["y"], g["dy"], g["ch"], g["ch"], g["ch"], g["ch"], g["ch"],
                                                   g["ch"], out=g["dy"]), ValueError, "out must not overlap dy"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_named_by_both_backends(rng, backend, name, call, exc, message):
    with pytest.raises(exc, match=message):
        call(_good(rng))


def test_cpp_checks_the_numpy_arrays_itself(rng):
    x = tensor(rng, (4, 2)).numpy()
    ch = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        _C.bn_act_stats([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x must have dtype float32"):
        _C.bn_act_stats(x.astype(np.float64))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        _C.bn_act_stats(np.asfortranarray(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _C.bn_act_stats(x, 0)
    frozen = np.zeros_like(x)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _C.bn_act_forward(x, ch, ch, ch, ch, 0.01, None, frozen)
    with pytest.raises(ValueError, match="slope must be a finite number >= 0"):
        _C.bn_act_forward(x, ch, ch, ch, ch, float("nan"))
    with pytest.raises(ValueError, match="dresidual must be writeable"):
        _C.bn_act_backward_reduce(x, x.copy(), ch, ch, ch, ch, 0.01, True, x.copy(), frozen)
