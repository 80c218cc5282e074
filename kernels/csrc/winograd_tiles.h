// The tile geometry shared by the Winograd transforms (winograd.cpp: F(4x4, 3x3) in float32,
// winograd_bf16.cpp: F(2x2, 3x3) in bfloat16): a dilation-D 3x3 conv is D x D ordinary 3x3 convs
// on the phase grids (p + D i, q + D j), each covered by whole m x m output tiles.
#pragma once

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

}  // namespace kernels
