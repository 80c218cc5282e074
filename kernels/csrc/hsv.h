// OpenCV-exact uint8 BGR <-> HSV (H in [0, 180)) on blocks of pixels held as int32 planes.
// Used by photometric.cpp. The arithmetic (facts from OpenCV's modules/imgproc/src/
// color_hsv.simd.hpp, checked against cv2 5.0 by tests/test_kernels_photometric.py):
//  * BGR -> HSV: integers. v = max, diff = v - min, s = (diff * sdiv[v] + 2^11) >> 12,
//    h = (h' * hdiv[diff] + 2^11) >> 12 (+180 if negative) with h' = g - b (v == r),
//    b - r + 2 diff (v == g) or r - g + 4 diff, sdiv[i] = round(255 * 2^12 / i),
//    hdiv[i] = round(180 * 2^12 / (6 i)).
//  * HSV -> BGR: float32 as OpenCV's vectorised path: hf = h * (6/180), sector = trunc(hf),
//    f = hf - sector, s and v scaled by 1/255, tabs v, v(1 - s), v(1 - s f), v(1 - s(1 - f)),
//    each output = trunc(tab * 255). OpenCV's AVX2 build fuses 1 - s*f into one FMA; that
//    exact value is float(1 - double(s) * double(f)) since s*f is exact in double.
//    cv2.cvtColor converts row by row in blocks of kCv2HsvBlock pixels; the last
//    (width % kCv2HsvBlock) pixels of every row take its scalar code, which rounds half to even
//    instead of truncating (same fused 1 - s*f).
#pragma once

// Bit-exact float arithmetic: a*b + c must never become one fused multiply-add (clang fuses
// within an expression by default on CPUs with FMA; GCC does not in ISO C++ mode).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <cstdint>

namespace kernels {

constexpr int kHsvBlock = 256;
// Pixels per vector iteration of OpenCV's AVX2 HSV->BGR (4 x 8 float lanes).
constexpr int kCv2HsvBlock = 32;

struct HsvPlanes {
    alignas(32) int32_t b[kHsvBlock];
    alignas(32) int32_t g[kHsvBlock];
    alignas(32) int32_t r[kHsvBlock];
    alignas(32) int32_t h[kHsvBlock];
    alignas(32) int32_t s[kHsvBlock];
    alignas(32) int32_t v[kHsvBlock];
};

// b, g, r (0..255) -> h (0..179), s, v for the first n entries.
void bgr_to_hsv(HsvPlanes& p, int n);
// h (0..179), s, v -> b, g, r for the first n entries; entries from round_from on (a multiple of
// 8) get cv2's row-tail rounding.
void hsv_to_bgr(HsvPlanes& p, int n, int round_from);

// Which implementation runs: "avx2" or "scalar". Both give identical bits; the setter exists so
// tests can check the portable path on machines that would otherwise pick AVX2.
const char* hsv_implementation();
void hsv_force_scalar(bool force);

}  // namespace kernels
