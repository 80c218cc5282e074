// winograd_bf16: the data transforms of core/winograd_bf16.py's F(2x2, 3x3) convolution on NHWC
// bfloat16 data (bf16 bits passed as int16 arrays: numpy has no bfloat16). Arithmetic in float32,
// one rounding to bf16 (nearest even) per element written.
//
//   winograd2_input:  x [N, H, W, C] -> v [16, T, C], v[4a + b, t] = (B^T d_t B)[a, b]
//   winograd2_output: m [16, T, O]   -> y [N, H, W, O], the 2x2 tile A^T m_t A (+ bias) of tile t
//
// Why F(2x2) for bf16 and not F(4x4) (winograd.cpp): the bf16 GEMM inputs are rounded, and F(4x4)'s
// transforms (entries up to 8) amplified that to 1.3-3% relative error per layer. F(2x2)'s have
// entries 0 and +-1 (Lavin & Gray, CVPR 2016, points 0, +-1, infinity): 0.4-0.5% against 0.3% for
// the direct bf16 conv, for 16 products per 2x2 output tile instead of 36 (2.25x fewer).
//
// Tiles as in winograd.cpp (winograd_tiles.h) with 2x2 output tiles: tile t of tile rows
// [row0, row0 + rows) is ((((n * D + p) * D + q) * rows + ta - row0) * TW + tb); its 4x4 input tile
// reads pixel (p + D (2 ta + i - 1), q + D (2 tb + j - 1)), 0 outside the image; TH =
// ceil(ceil(H / D) / 2). Parallel over tiles, each output element written by one tile.
#include <cstring>

#include "common.h"
#include "kernels.h"
#include "winograd_tiles.h"

namespace kernels {
namespace {

// F(2x2, 3x3): the 1-D transforms over n channels, for wino_input_tiles / wino_output_tiles.
struct F2 {
    static constexpr int kM = 2;
    // out[a] = (B^T in)[a], B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
    template <typename In, typename Out>
    static WINO_INLINE void bt(const In* const in[4], Out* const out[4], int64_t n) {
        const In *__restrict__ i0 = in[0], *__restrict__ i1 = in[1], *__restrict__ i2 = in[2], *__restrict__ i3 = in[3];
        Out *__restrict__ o0 = out[0], *__restrict__ o1 = out[1], *__restrict__ o2 = out[2], *__restrict__ o3 = out[3];
        for (int64_t c = 0; c < n; ++c) {
            const float d0 = load(i0[c]), d1 = load(i1[c]), d2 = load(i2[c]), d3 = load(i3[c]);
            store(o0[c], d0 - d2);
            store(o1[c], d1 + d2);
            store(o2[c], d2 - d1);
            store(o3[c], d1 - d3);
        }
    }
    // out[a] = (A^T in)[a], A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    template <typename In>
    static WINO_INLINE void at(const In* const in[4], float* const out[2], int64_t n) {
        const In *__restrict__ i0 = in[0], *__restrict__ i1 = in[1], *__restrict__ i2 = in[2], *__restrict__ i3 = in[3];
        float *__restrict__ o0 = out[0], *__restrict__ o1 = out[1];
        for (int64_t c = 0; c < n; ++c) {
            const float m0 = load(i0[c]), m1 = load(i1[c]), m2 = load(i2[c]), m3 = load(i3[c]);
            o0[c] = (m0 + m1) + m2;
            o1[c] = (m1 - m2) - m3;
        }
    }
};

WINO_INLINE void input_tiles(const Geometry& g, const uint16_t* x, uint16_t* v, int64_t t0, int64_t t1) {
    wino_input_tiles<F2>(g, x, v, t0, t1);
}

WINO_INLINE void output_tiles(const Geometry& g, const uint16_t* m, const float* bias, uint16_t* y, int64_t t0,
                              int64_t t1) {
    wino_output_tiles<F2>(g, m, bias, y, t0, t1);
}

void input_baseline(const Geometry& g, const uint16_t* x, uint16_t* v, int64_t t0, int64_t t1) {
    input_tiles(g, x, v, t0, t1);
}
void output_baseline(const Geometry& g, const uint16_t* m, const float* b, uint16_t* y, int64_t t0, int64_t t1) {
    output_tiles(g, m, b, y, t0, t1);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#define WINO2_AVX2 1
__attribute__((target("avx2,fma"))) void input_avx2(const Geometry& g, const uint16_t* x, uint16_t* v, int64_t t0,
                                                    int64_t t1) {
    input_tiles(g, x, v, t0, t1);
}
__attribute__((target("avx2,fma"))) void output_avx2(const Geometry& g, const uint16_t* m, const float* b,
                                                     uint16_t* y, int64_t t0, int64_t t1) {
    output_tiles(g, m, b, y, t0, t1);
}
#endif

// A bfloat16 tensor's bits as int16 (torch: t.view(torch.int16).numpy()), contiguous, `ndim` dims.
py::array bf16_array(const py::object& obj, const char* name, int ndim) {
    py::array a = as_array(obj, name);
    if (!has_dtype<int16_t>(a))
        throw py::type_error(std::string(name) + " must hold bfloat16 bits as int16 (torch: t.view(torch.int16)"
                             ".numpy()), got dtype " + dtype_str(a));
    require_contiguous(a, name);
    require_ndim(a, name, ndim, ndim);
    return a;
}

}  // namespace

py::array winograd2_input(const py::object& x_obj, int64_t dilation, int64_t row0, int64_t rows,
                          const py::object& out_obj, int num_threads) {
    require_threads(num_threads);
    py::array x = bf16_array(x_obj, "x", 4);
    const Geometry g = wino_geometry(x.shape(0), x.shape(1), x.shape(2), x.shape(3), dilation, row0, rows, 2);
    const std::vector<py::ssize_t> shape{16, static_cast<py::ssize_t>(g.tiles), static_cast<py::ssize_t>(g.c)};
    py::array out;
    if (out_obj.is_none()) {
        out = py::array_t<int16_t>(shape);
    } else {
        out = bf16_array(out_obj, "out", 3);
        require_writeable(out, "out");
        require_shape(out, "out", shape);
        if (overlaps(out, x)) throw py::value_error("out must not overlap x");
    }
    const uint16_t* src = static_cast<const uint16_t*>(x.data());
    uint16_t* dst = static_cast<uint16_t*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        const bool avx2 = wino_use_avx2();
        parallel_for(g.tiles, num_threads, wino_min_tiles(g.c), [&](int64_t t0, int64_t t1) {
#ifdef WINO2_AVX2
            if (avx2) return input_avx2(g, src, dst, t0, t1);
#endif
            (void)avx2;
            input_baseline(g, src, dst, t0, t1);
        });
    }
    return out;
}

py::array winograd2_output(const py::object& m_obj, const py::object& bias_obj, int64_t dilation, int64_t row0,
                           int64_t rows, const py::object& out_obj, int num_threads) {
    require_threads(num_threads);
    py::array m = bf16_array(m_obj, "m", 3);
    py::array out = bf16_array(out_obj, "out", 4);
    require_writeable(out, "out");
    const Geometry g = wino_geometry(out.shape(0), out.shape(1), out.shape(2), out.shape(3), dilation, row0, rows, 2);
    require_shape(m, "m", {16, static_cast<py::ssize_t>(g.tiles), static_cast<py::ssize_t>(g.c)});
    if (overlaps(out, m)) throw py::value_error("out must not overlap m");
    const float* b = nullptr;
    py::array bias;
    if (!bias_obj.is_none()) {
        bias = wino_float_array(bias_obj, "bias", 1);
        require_shape(bias, "bias", {static_cast<py::ssize_t>(g.c)});
        b = static_cast<const float*>(bias.data());
    }
    const uint16_t* src = static_cast<const uint16_t*>(m.data());
    uint16_t* dst = static_cast<uint16_t*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        const bool avx2 = wino_use_avx2();
        parallel_for(g.tiles, num_threads, wino_min_tiles(g.c), [&](int64_t t0, int64_t t1) {
#ifdef WINO2_AVX2
            if (avx2) return output_avx2(g, src, b, dst, t0, t1);
#endif
            (void)avx2;
            output_baseline(g, src, b, dst, t0, t1);
        });
    }
    return out;
}

}  // namespace kernels
