// winograd: the two data transforms of core/winograd.py's F(4x4, 3x3) convolution on NHWC
// float32 data, fused so that each is one pass over memory (the torch version gathers tiles with
// a copy, then applies B^T . B or A^T . A as separate matrix products, each a full pass over a
// tensor 2-5x the feature map's size: a third of a Winograd layer's time at 512x1024).
//
//   winograd_input:  x [N, H, W, C] -> v [36, T, C], v[6a + b, t] = (B^T d_t B)[a, b]
//   winograd_output: m [36, T, O]   -> y [N, H, W, O], the 4x4 tile A^T m_t A (+ bias) of tile t
//   winograd_output_grad: dy [N, H, W, O] -> g [36, T, O], g[6a + b, t] = (A dy_t A^T)[a, b], the
//                    adjoint of winograd_output (training: the weight gradient in the Winograd domain)
//
// Tile t of a chunk of tile rows [row0, row0 + rows) is ((((n * D + p) * D + q) * rows + ta - row0)
// * TW + tb): tile (ta, tb) of phase grid (p, q), the grid of pixels (p + D i, q + D j) that a
// dilation-D conv treats as an ordinary 3x3 conv. Its 6x6 input tile reads pixel
// (p + D (4 ta + i - 1), q + D (4 tb + j - 1)); outside the image it reads 0 (the conv's zero
// padding), so no padded copy is made. Output pixels outside the image are not written.
// TH = ceil(ceil(H / D) / 4), TW likewise: whole tiles over the largest phase grid.
//
// Transform matrices: Lavin & Gray, CVPR 2016 (points 0, +-1, +-2, infinity), the same as
// core/winograd.py's _BT and _AT. Parallel over tiles; each output element is written by one
// tile, so the result does not depend on the thread count.
#include <cstring>

#include "common.h"
#include "kernels.h"
#include "winograd_tiles.h"

namespace kernels {
namespace {

constexpr int64_t kBlock = kWinoBlock;  // output_grad_tiles, below

// F(4x4, 3x3): the 1-D transforms over n channels, for wino_input_tiles / wino_output_tiles
// (winograd_tiles.h). The restrict copies let the compiler vectorise without run-time alias checks
// (no output overlaps an input).
struct F4 {
    static constexpr int kM = 4;
    // out[a] = (B^T in)[a]
    template <typename In, typename Out>
    static WINO_INLINE void bt(const In* const in[6], Out* const out[6], int64_t n) {
        const In *__restrict__ i0 = in[0], *__restrict__ i1 = in[1], *__restrict__ i2 = in[2],
                 *__restrict__ i3 = in[3], *__restrict__ i4 = in[4], *__restrict__ i5 = in[5];
        Out *__restrict__ o0 = out[0], *__restrict__ o1 = out[1], *__restrict__ o2 = out[2], *__restrict__ o3 = out[3],
            *__restrict__ o4 = out[4], *__restrict__ o5 = out[5];
        for (int64_t c = 0; c < n; ++c) {
            const float d0 = load(i0[c]), d1 = load(i1[c]), d2 = load(i2[c]), d3 = load(i3[c]), d4 = load(i4[c]),
                        d5 = load(i5[c]);
            store(o0[c], 4.f * d0 - 5.f * d2 + d4);
            store(o1[c], -4.f * (d1 + d2) + (d3 + d4));
            store(o2[c], 4.f * (d1 - d2) + (d4 - d3));
            store(o3[c], 2.f * (d3 - d1) + (d4 - d2));
            store(o4[c], 2.f * (d1 - d3) + (d4 - d2));
            store(o5[c], 4.f * d1 - 5.f * d3 + d5);
        }
    }
    // out[a] = (A^T in)[a], a < 4
    template <typename In>
    static WINO_INLINE void at(const In* const in[6], float* const out[4], int64_t n) {
        const In *__restrict__ i0 = in[0], *__restrict__ i1 = in[1], *__restrict__ i2 = in[2],
                 *__restrict__ i3 = in[3], *__restrict__ i4 = in[4], *__restrict__ i5 = in[5];
        float *__restrict__ o0 = out[0], *__restrict__ o1 = out[1], *__restrict__ o2 = out[2], *__restrict__ o3 = out[3];
        for (int64_t c = 0; c < n; ++c) {
            const float m0 = load(i0[c]), m1 = load(i1[c]), m2 = load(i2[c]), m3 = load(i3[c]), m4 = load(i4[c]),
                        m5 = load(i5[c]);
            const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
            o0[c] = m0 + s12 + s34;
            o1[c] = d12 + 2.f * d34;
            o2[c] = s12 + 4.f * s34;
            o3[c] = d12 + 8.f * d34 + m5;
        }
    }
};

// out[a] = (A in)[a] for 4 inputs, a < 6 (A = (A^T)^T: the adjoint of F4::at).
WINO_INLINE void a6(const float* const in[4], float* const out[6], int64_t n) {
    const float *__restrict__ i0 = in[0], *__restrict__ i1 = in[1], *__restrict__ i2 = in[2], *__restrict__ i3 = in[3];
    float *__restrict__ o0 = out[0], *__restrict__ o1 = out[1], *__restrict__ o2 = out[2], *__restrict__ o3 = out[3],
          *__restrict__ o4 = out[4], *__restrict__ o5 = out[5];
    for (int64_t c = 0; c < n; ++c) {
        const float y0 = i0[c], y1 = i1[c], y2 = i2[c], y3 = i3[c];
        const float s02 = y0 + y2, s13 = y1 + y3, e02 = y0 + 4.f * y2, e13 = 2.f * y1 + 8.f * y3;
        o0[c] = y0;
        o1[c] = s02 + s13;
        o2[c] = s02 - s13;
        o3[c] = e02 + e13;
        o4[c] = e02 - e13;
        o5[c] = y3;
    }
}

WINO_INLINE void input_tiles(const Geometry& g, const float* x, float* v, int64_t t0, int64_t t1) {
    wino_input_tiles<F4>(g, x, v, t0, t1);
}

WINO_INLINE void output_tiles(const Geometry& g, const float* m, const float* bias, float* y, int64_t t0,
                              int64_t t1) {
    wino_output_tiles<F4>(g, m, bias, y, t0, t1);
}

// The adjoint of output_tiles (without bias): g [36, T, O] with g[6a + b, t] = (A dy_t A^T)[a, b]
// for the 4x4 tile dy_t of the output gradient (0 outside the image). The weight gradient of
// the conv is then G^T (sum over tiles of V . g) G (core/winograd.py).
WINO_INLINE void output_grad_tiles(const Geometry& g, const float* dy, float* out, int64_t t0, int64_t t1) {
    alignas(64) static const float zeros[kBlock] = {};
    alignas(64) float rows_t[24][kBlock];  // A dy over rows: [a][j], j < 4
    for (int64_t t = t0; t < t1; ++t) {
        int64_t img, p, q, ta, tb;
        g.locate(t, &img, &p, &q, &ta, &tb);
        const float* px[4][4];
        for (int i = 0; i < 4; ++i) {
            const int64_t y = p + g.d * (4 * ta + i);
            for (int j = 0; j < 4; ++j) {
                const int64_t xx = q + g.d * (4 * tb + j);
                px[i][j] = (y < g.h && xx < g.w) ? dy + ((img * g.h + y) * g.w + xx) * g.c : nullptr;
            }
        }
        for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
            const int64_t nc = std::min(kBlock, g.c - c0);
            for (int j = 0; j < 4; ++j) {
                const float* in[4];
                for (int i = 0; i < 4; ++i) in[i] = px[i][j] ? px[i][j] + c0 : zeros;
                float* const o[6] = {rows_t[j], rows_t[4 + j], rows_t[8 + j], rows_t[12 + j], rows_t[16 + j],
                                     rows_t[20 + j]};  // rows_t[4a + j]
                a6(in, o, nc);
            }
            for (int a = 0; a < 6; ++a) {
                const float* in[4];
                for (int j = 0; j < 4; ++j) in[j] = rows_t[4 * a + j];
                float* o[6];
                for (int b = 0; b < 6; ++b) o[b] = out + ((6 * a + b) * g.tiles + t) * g.c + c0;
                a6(in, o, nc);
            }
        }
    }
}

void input_baseline(const Geometry& g, const float* x, float* v, int64_t t0, int64_t t1) {
    input_tiles(g, x, v, t0, t1);
}
void output_baseline(const Geometry& g, const float* m, const float* b, float* y, int64_t t0, int64_t t1) {
    output_tiles(g, m, b, y, t0, t1);
}
void output_grad_baseline(const Geometry& g, const float* dy, float* out, int64_t t0, int64_t t1) {
    output_grad_tiles(g, dy, out, t0, t1);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#define WINO_AVX2 1
// AVX2 only, not AVX-512: the transforms are bound by memory, not arithmetic. FP contraction is
// off (common.h, ISO C++), so both copies round identically.
__attribute__((target("avx2,fma"))) void input_avx2(const Geometry& g, const float* x, float* v, int64_t t0,
                                                    int64_t t1) {
    input_tiles(g, x, v, t0, t1);
}
__attribute__((target("avx2,fma"))) void output_avx2(const Geometry& g, const float* m, const float* b, float* y,
                                                     int64_t t0, int64_t t1) {
    output_tiles(g, m, b, y, t0, t1);
}
__attribute__((target("avx2,fma"))) void output_grad_avx2(const Geometry& g, const float* dy, float* out, int64_t t0,
                                                          int64_t t1) {
    output_grad_tiles(g, dy, out, t0, t1);
}
#endif

// winograd_input and winograd_output_grad: src [N, H, W, C] -> [36, T, C] by `body`.
template <typename Avx2, typename Baseline>
py::array tiles_of(const py::object& src_obj, const char* src_name, int64_t dilation, int64_t row0, int64_t rows,
                   const py::object& out_obj, int num_threads, Avx2 avx2_body, Baseline baseline_body) {
    require_threads(num_threads);
    py::array src_arr = wino_float_array(src_obj, src_name, 4);
    const Geometry g = wino_geometry(src_arr.shape(0), src_arr.shape(1), src_arr.shape(2), src_arr.shape(3),
                                     dilation, row0, rows, 4);
    const std::vector<py::ssize_t> shape{36, static_cast<py::ssize_t>(g.tiles), static_cast<py::ssize_t>(g.c)};
    py::array out;
    if (out_obj.is_none()) {
        out = py::array_t<float>(shape);
    } else {
        out = wino_float_array(out_obj, "out", 3);
        require_writeable(out, "out");
        require_shape(out, "out", shape);
        if (overlaps(out, src_arr)) throw py::value_error(std::string("out must not overlap ") + src_name);
    }
    const float* src = static_cast<const float*>(src_arr.data());
    float* dst = static_cast<float*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        const bool avx2 = wino_use_avx2();
        parallel_for(g.tiles, num_threads, wino_min_tiles(g.c), [&](int64_t t0, int64_t t1) {
            if (avx2) return avx2_body(g, src, dst, t0, t1);
            baseline_body(g, src, dst, t0, t1);
        });
    }
    return out;
}

}  // namespace

py::array winograd_input(const py::object& x_obj, int64_t dilation, int64_t row0, int64_t rows,
                         const py::object& out_obj, int num_threads) {
#ifdef WINO_AVX2
    return tiles_of(x_obj, "x", dilation, row0, rows, out_obj, num_threads, input_avx2, input_baseline);
#else
    return tiles_of(x_obj, "x", dilation, row0, rows, out_obj, num_threads, input_baseline, input_baseline);
#endif
}

py::array winograd_output_grad(const py::object& dy_obj, int64_t dilation, int64_t row0, int64_t rows,
                               const py::object& out_obj, int num_threads) {
#ifdef WINO_AVX2
    return tiles_of(dy_obj, "dy", dilation, row0, rows, out_obj, num_threads, output_grad_avx2, output_grad_baseline);
#else
    return tiles_of(dy_obj, "dy", dilation, row0, rows, out_obj, num_threads, output_grad_baseline,
                    output_grad_baseline);
#endif
}

py::array winograd_output(const py::object& m_obj, const py::object& bias_obj, int64_t dilation, int64_t row0,
                          int64_t rows, const py::object& out_obj, int num_threads) {
    require_threads(num_threads);
    py::array m = wino_float_array(m_obj, "m", 3);
    py::array out = wino_float_array(out_obj, "out", 4);
    require_writeable(out, "out");
    const Geometry g = wino_geometry(out.shape(0), out.shape(1), out.shape(2), out.shape(3), dilation, row0, rows, 4);
    require_shape(m, "m", {36, static_cast<py::ssize_t>(g.tiles), static_cast<py::ssize_t>(g.c)});
    if (overlaps(out, m)) throw py::value_error("out must not overlap m");
    const float* b = nullptr;
    py::array bias;
    if (!bias_obj.is_none()) {
        bias = wino_float_array(bias_obj, "bias", 1);
        require_shape(bias, "bias", {static_cast<py::ssize_t>(g.c)});
        b = static_cast<const float*>(bias.data());
    }
    const float* src = static_cast<const float*>(m.data());
    float* dst = static_cast<float*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        const bool avx2 = wino_use_avx2();
        parallel_for(g.tiles, num_threads, wino_min_tiles(g.c), [&](int64_t t0, int64_t t1) {
#ifdef WINO_AVX2
            if (avx2) return output_avx2(g, src, b, dst, t0, t1);
#endif
            (void)avx2;
            output_baseline(g, src, b, dst, t0, t1);
        });
    }
    return out;
}

}  // namespace kernels
