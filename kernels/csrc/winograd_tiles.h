// What the Winograd transforms share (winograd.cpp: F(4x4, 3x3) in float32, winograd_bf16.cpp:
// F(2x2, 3x3) in bfloat16): the tile geometry (a dilation-D 3x3 conv is D x D ordinary 3x3 convs on
// the phase grids (p + D i, q + D j), each covered by whole m x m output tiles) and the two tile
// loops, parameterised by the algorithm F (its 1-D transforms) and the element types.
#pragma once

#include <cstring>
#include <string>

#include "common.h"

namespace kernels {

#define WINO_INLINE inline __attribute__((always_inline))

constexpr int64_t kWinoBlock = 64;  // channels per pass: a tile's scratch for 64 channels stays in L1

struct Geometry {
    int64_t n, h, w, c, d, th, tw, row0, rows, tiles;
    // tile index -> (image, phase row, phase col, tile row, tile col)
    void locate(int64_t t, int64_t* img, int64_t* p, int64_t* q, int64_t* ta, int64_t* tb) const {
        *tb = t % tw;
        t /= tw;
        *ta = row0 + t % rows;
        t /= rows;
        *q = t % d;
        t /= d;
        *p = t % d;
        *img = t / d;
    }
};

// The geometry of a chunk of m x m output tiles, checked: dilation >= 1, 0 <= row0 < row0 + rows <= TH.
inline Geometry wino_geometry(int64_t n, int64_t h, int64_t w, int64_t c, int64_t dilation, int64_t row0,
                              int64_t rows, int64_t m) {
    if (dilation < 1) throw py::value_error("dilation must be >= 1, got " + std::to_string(dilation));
    if (h < 1 || w < 1) throw py::value_error("the feature map must be at least 1x1");
    Geometry g{};
    g.n = n, g.h = h, g.w = w, g.c = c, g.d = dilation;
    g.th = ((h + dilation - 1) / dilation + m - 1) / m;
    g.tw = ((w + dilation - 1) / dilation + m - 1) / m;
    if (row0 < 0 || rows < 1 || row0 + rows > g.th)
        throw py::value_error("tile rows [row0, row0 + rows) = [" + std::to_string(row0) + ", " +
                              std::to_string(row0 + rows) + ") must lie within [0, " + std::to_string(g.th) +
                              ") for a " + std::to_string(h) + "x" + std::to_string(w) + " map at dilation " +
                              std::to_string(dilation));
    g.row0 = row0, g.rows = rows;
    g.tiles = n * dilation * dilation * rows * g.tw;
    return g;
}

// `obj` as a C-contiguous float32 numpy array of `ndim` dimensions, else an error naming it.
inline py::array wino_float_array(const py::object& obj, const char* name, int ndim) {
    py::array a = as_array(obj, name);
    if (!has_dtype<float>(a)) throw py::type_error(std::string(name) + " must have dtype float32, got " + dtype_str(a));
    require_contiguous(a, name);
    require_ndim(a, name, ndim, ndim);
    return a;
}

// Tiles per parallel chunk: enough that a thread's share is worth waking it for.
inline int64_t wino_min_tiles(int64_t channels) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, channels)); }

inline bool wino_use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
#else
    return false;
#endif
}

// Element access in float32 arithmetic: float as it is, uint16_t as bfloat16 bits.
WINO_INLINE float load(float v) { return v; }
WINO_INLINE float load(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
WINO_INLINE void store(float& dst, float v) { dst = v; }
// Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a (quiet) NaN.
WINO_INLINE void store(uint16_t& dst, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        dst = static_cast<uint16_t>((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    dst = static_cast<uint16_t>(u >> 16);
}

// v [T*T, tiles, C] = B^T d B for the T x T input tiles d (T = F::kM + 2) of tiles [t0, t1) of x
// [N, H, W, C]: tile (ta, tb) of phase grid (p, q) reads pixel (p + D (M ta + i - 1), q + D (M tb + j - 1)),
// 0 outside the image. F::bt(in[T], out[T], n) applies B^T to T rows of n channels.
template <typename F, typename In, typename Out>
WINO_INLINE void wino_input_tiles(const Geometry& g, const In* x, Out* v, int64_t t0, int64_t t1) {
    constexpr int M = F::kM, T = F::kM + 2;
    alignas(64) static const In zeros[kWinoBlock] = {};
    alignas(64) float rows_t[T * T][kWinoBlock];  // B^T d, [a][j]
    for (int64_t t = t0; t < t1; ++t) {
        int64_t img, p, q, ta, tb;
        g.locate(t, &img, &p, &q, &ta, &tb);
        const In* px[T][T];
        for (int i = 0; i < T; ++i) {
            const int64_t y = p + g.d * (M * ta + i - 1);
            for (int j = 0; j < T; ++j) {
                const int64_t xx = q + g.d * (M * tb + j - 1);
                px[i][j] = (y >= 0 && y < g.h && xx >= 0 && xx < g.w) ? x + ((img * g.h + y) * g.w + xx) * g.c
                                                                       : nullptr;
            }
        }
        for (int64_t c0 = 0; c0 < g.c; c0 += kWinoBlock) {
            const int64_t nc = std::min(kWinoBlock, g.c - c0);
            for (int j = 0; j < T; ++j) {  // columns of d: B^T over its rows i
                const In* in[T];
                float* out[T];
                for (int i = 0; i < T; ++i) {
                    in[i] = px[i][j] ? px[i][j] + c0 : zeros;
                    out[i] = rows_t[T * i + j];  // rows_t[T a + j]
                }
                F::bt(in, out, nc);
            }
            for (int a = 0; a < T; ++a) {  // rows of B^T d: times B over j
                const float* in[T];
                Out* out[T];
                for (int j = 0; j < T; ++j) {
                    in[j] = rows_t[T * a + j];
                    out[j] = v + ((T * a + j) * g.tiles + t) * g.c + c0;
                }
                F::bt(in, out, nc);
            }
        }
    }
}

// Writes the M x M output tile A^T m_t A (+ bias) of every tile t in [t0, t1) of m [T*T, tiles, O]
// into the pixels of y [N, H, W, O] inside the image. F::at(in[T], out[M], n) applies A^T.
template <typename F, typename In, typename Out>
WINO_INLINE void wino_output_tiles(const Geometry& g, const In* m, const float* bias, Out* y, int64_t t0,
                                   int64_t t1) {
    constexpr int M = F::kM, T = F::kM + 2;
    const int64_t o = g.c;
    alignas(64) float cols_t[M * T][kWinoBlock];  // A^T M, [a][b]
    alignas(64) float res[M][kWinoBlock];
    for (int64_t t = t0; t < t1; ++t) {
        int64_t img, p, q, ta, tb;
        g.locate(t, &img, &p, &q, &ta, &tb);
        for (int64_t o0 = 0; o0 < o; o0 += kWinoBlock) {
            const int64_t no = std::min(kWinoBlock, o - o0);
            for (int b = 0; b < T; ++b) {  // columns of M: A^T over its rows
                const In* in[T];
                float* out[M];
                for (int i = 0; i < T; ++i) in[i] = m + ((T * i + b) * g.tiles + t) * o + o0;
                for (int a = 0; a < M; ++a) out[a] = cols_t[T * a + b];
                F::at(in, out, no);
            }
            for (int a = 0; a < M; ++a) {  // rows of A^T M: times A over b
                const int64_t yy = p + g.d * (M * ta + a);
                if (yy >= g.h) break;
                const float* in[T];
                float* out[M];
                for (int b = 0; b < T; ++b) in[b] = cols_t[T * a + b];
                for (int jj = 0; jj < M; ++jj) out[jj] = res[jj];
                F::at(in, out, no);
                for (int jj = 0; jj < M; ++jj) {
                    const int64_t xx = q + g.d * (M * tb + jj);
                    if (xx >= g.w) break;
                    Out* __restrict__ dst = y + ((img * g.h + yy) * g.w + xx) * o + o0;
                    const float* __restrict__ src = res[jj];
                    if (bias) {
                        const float* __restrict__ bb = bias + o0;
                        for (int64_t c = 0; c < no; ++c) store(dst[c], src[c] + bb[c]);
                    } else {
                        for (int64_t c = 0; c < no; ++c) store(dst[c], src[c]);
                    }
                }
            }
        }
    }
}

}  // namespace kernels
