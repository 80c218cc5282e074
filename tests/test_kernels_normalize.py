"""ops.normalize: the C++ kernel against an independent torch formula and kernels.reference, in
both output memory formats (NCHW planes and channels_last / NHWC), float32 and bfloat16."""

import numpy as np
import pytest
import torch

import kernels
from kernels import _C, ops
from kernels import reference as ref

pytestmark = pytest.mark.usefixtures("cpp_backend")  # C++ path unless a test says otherwise

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["cpp", "reference"])
def backend(request):
    kernels.use_reference(request.param == "reference")
    return request.param


def torch_normalize(img, to_rgb, dtype, mean=MEAN, std=STD):
    """The usual torch formulation, independent of kernels.reference."""
    x = torch.as_tensor(img)
    x = x[..., [2, 1, 0]] if to_rgb else x
    x = x.movedim(-1, -3).float()
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).to(dtype)


def random_image(rng, shape):
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img.reshape(-1, 3)[0] = 0
    img.reshape(-1, 3)[-1] = 255
    return img


def assert_nhwc(x, shape, dtype):
    assert x.shape == shape and x.dtype == dtype
    b, _, h, w = shape
    assert x.is_contiguous(memory_format=CL)
    # The bytes themselves are in NHWC order.
    assert torch.equal(x.permute(0, 2, 3, 1).reshape(-1), torch.as_strided(x, (b * h * w * 3,), (1,)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (2, 9, 33, 3), (1, 64, 100, 3)])
@pytest.mark.parametrize("to_rgb", [True, False])
def test_matches_torch_bitwise(rng, dtype, shape, to_rgb):
    img = random_image(rng, shape)
    got = ops.normalize(img, MEAN, STD, to_rgb=to_rgb, dtype=dtype)
    want = torch_normalize(img, to_rgb, dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(got, ref.normalize(img, MEAN, STD, to_rgb=to_rgb, dtype=dtype))


# Widths below, at and across the 8-pixel vector block, odd everything, B = 1 and B > 1.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 1, 7, 3), (2, 3, 8, 3), (1, 5, 9, 3), (3, 2, 17, 3),
                                   (2, 13, 31, 3), (1, 64, 100, 3)])
@pytest.mark.parametrize("to_rgb", [True, False])
def test_channels_last_matches_nchw_and_reference(rng, dtype, shape, to_rgb):
    img = random_image(rng, shape)
    got = ops.normalize(img, MEAN, STD, to_rgb=to_rgb, dtype=dtype, memory_format=CL)
    b, h, w, _ = shape
    assert_nhwc(got, (b, 3, h, w), dtype)
    assert torch.equal(got, ops.normalize(img, MEAN, STD, to_rgb=to_rgb, dtype=dtype))
    assert torch.equal(got, torch_normalize(img, to_rgb, dtype))
    want = ref.normalize(img, MEAN, STD, to_rgb=to_rgb, dtype=dtype, memory_format=CL)
    assert_nhwc(want, (b, 3, h, w), dtype)
    assert torch.equal(got, want)


def test_bf16_rounds_every_byte_like_torch(rng):
    # All 256 values per channel, with mean/std pairs that put results on bf16 ties, random ones
    # (negative std included), and extreme ones where 1/std over- or underflows float32.
    img = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 1, 256, 3)
    pairs = [(MEAN, STD), ((0.0, 0.5, 128.0), (1.0, 3.0, 0.125)), ((0.0, 0.5, 128.0), (1e-39, 3e38, -0.1))]
    for _ in range(20):
        mean, std = rng.uniform(-300, 300, 3), rng.uniform(0.01, 300, 3) * rng.choice([-1, 1], 3)
        pairs.append((tuple(mean.tolist()), tuple(std.tolist())))  # Python floats: float32 tensors in torch
    for mean, std in pairs:
        for dtype in DTYPES:
            want = torch_normalize(img, False, dtype, mean, std)
            for memory_format in (torch.contiguous_format, CL):
                got = ops.normalize(img, mean, std, to_rgb=False, dtype=dtype, memory_format=memory_format)
                assert torch.equal(got, want), (mean, std, dtype, memory_format)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_counts_give_identical_bits(rng, dtype):
    # 2 x 100 x 523 pixels: enough for three 32K-pixel chunks, odd width so rows end mid-block
    # and chunk edges fall inside vector blocks of the flat NHWC loop.
    img = torch.from_numpy(random_image(rng, (2, 100, 523, 3)))
    want = torch_normalize(img.numpy(), True, dtype)
    for memory_format in (torch.contiguous_format, CL):
        for n in (1, 2, 3):
            got = ops.normalize(img, MEAN, STD, dtype=dtype, num_threads=n, memory_format=memory_format)
            assert got.is_contiguous(memory_format=memory_format) and torch.equal(got, want), (memory_format, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffers_in_both_layouts(rng, backend, dtype):
    img = torch.from_numpy(random_image(rng, (3, 40, 50, 3)))
    want = torch_normalize(img.numpy(), True, dtype)
    out = torch.empty((3, 3, 40, 50), dtype=dtype)
    assert ops.normalize(img, MEAN, STD, dtype=dtype, out=out) is out
    assert torch.equal(out, want)
    out_cl = torch.empty((3, 3, 40, 50), dtype=dtype, memory_format=CL)
    assert ops.normalize(img, MEAN, STD, dtype=dtype, out=out_cl, memory_format=CL) is out_cl
    assert_nhwc(out_cl, (3, 3, 40, 50), dtype)
    assert torch.equal(out_cl, want)
    single = ops.normalize(img[0], MEAN, STD, dtype=dtype)  # unbatched [H,W,3] -> [3,H,W]
    assert single.shape == (3, 40, 50) and torch.equal(single, want[0])


def bad_out_cases():
    nchw = torch.empty((2, 3, 4, 5))
    nhwc = torch.empty((2, 3, 4, 5), memory_format=CL)
    return [
        (dict(out=nhwc), "out must be a CPU torch.float32 tensor .* memory_format=torch.contiguous_format.*"
                         "pass memory_format=torch.channels_last"),
        (dict(out=nchw, memory_format=CL), "out .* contiguous in memory_format=torch.channels_last"),
        (dict(out=nhwc.bfloat16(), memory_format=CL), "out must be a CPU torch.float32"),
        (dict(out=torch.empty((2, 3, 4, 6), memory_format=CL), memory_format=CL), r"out .* shape \(2, 3, 4, 5\)"),
        (dict(out=torch.empty((2, 3, 4, 10))[..., ::2], memory_format=CL), "out .* strides"),
        (dict(memory_format=torch.preserve_format), "memory_format must be torch.contiguous_format or"),
        (dict(memory_format="channels_last"), "memory_format must be"),
    ]


@pytest.mark.parametrize("case", range(len(bad_out_cases())))
def test_bad_out_and_memory_format_are_rejected_naming_them(backend, case):
    kwargs, message = bad_out_cases()[case]
    img = np.zeros((2, 4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        ops.normalize(img, MEAN, STD, **kwargs)


def test_channels_last_needs_a_batch(backend):
    with pytest.raises(ValueError, match=r"memory_format=torch.channels_last needs a batched img \[B,H,W,3\]"):
        ops.normalize(np.zeros((4, 5, 3), np.uint8), MEAN, STD, memory_format=CL)


def test_extension_takes_nhwc_strided_out_and_rejects_other_layouts(rng):
    img = random_image(rng, (2, 4, 9, 3))
    want = torch_normalize(img, True, torch.float32).numpy()
    nhwc = np.empty((2, 4, 9, 3), np.float32).transpose(0, 3, 1, 2)  # [N,3,H,W] view of NHWC memory
    _C.normalize(img, list(MEAN), list(STD), True, False, nhwc, 1)
    np.testing.assert_array_equal(nhwc, want)
    nwhc = np.empty((2, 9, 4, 3), np.float32).transpose(0, 3, 2, 1)
    with pytest.raises(ValueError, match="out must be C-contiguous .NCHW. or channels_last"):
        _C.normalize(img, list(MEAN), list(STD), True, False, nwhc, 1)
    shared = np.zeros(2 * 3 * 4 * 9 * 4, np.uint8)
    with pytest.raises(ValueError, match="out must not overlap img"):
        _C.normalize(shared[:img.size].reshape(img.shape), list(MEAN), list(STD), True, False,
                     shared.view(np.float32).reshape(2, 3, 4, 9), 1)
