// Scalar and AVX2 implementations of hsv.h; the AVX2 one is chosen at run time when the CPU has
// it. Every step is one IEEE float32/float64 or integer operation in both, in the same order (the
// AVX2 functions enable no FMA, so the compiler cannot contract anything), hence equal bits.
#include "hsv.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#include <immintrin.h>
#define KERNELS_HAVE_AVX2_PATH 1
#endif

namespace kernels {
namespace {

struct HsvTables {
    alignas(32) int32_t sdiv[256];
    alignas(32) int32_t hdiv[256];
    HsvTables() {
        sdiv[0] = hdiv[0] = 0;
        for (int i = 1; i < 256; ++i) {
            // std::nearbyint rounds half to even like OpenCV's saturate_cast<int>(double).
            sdiv[i] = static_cast<int32_t>(std::nearbyint((255 << 12) / (1.0 * i)));
            hdiv[i] = static_cast<int32_t>(std::nearbyint((180 << 12) / (6.0 * i)));
        }
    }
};
const HsvTables kTables;

std::atomic<bool> g_force_scalar{false};

void bgr_to_hsv_scalar(HsvPlanes& p, int n) {
    for (int i = 0; i < n; ++i) {
        const int b = p.b[i], g = p.g[i], r = p.r[i];
        const int v = std::max(b, std::max(g, r));
        const int diff = v - std::min(b, std::min(g, r));
        const int raw = v == r ? g - b : (v == g ? b - r + 2 * diff : r - g + 4 * diff);
        const int h = (raw * kTables.hdiv[diff] + (1 << 11)) >> 12;
        p.h[i] = h < 0 ? h + 180 : h;
        p.s[i] = (diff * kTables.sdiv[v] + (1 << 11)) >> 12;
        p.v[i] = v;
    }
}

inline int32_t to_byte(float x, bool round) {
    // Truncation as _mm256_cvttps_epi32, or round half to even as cvRound in cv2's scalar tail.
    const int32_t i = round ? static_cast<int32_t>(std::nearbyint(x)) : static_cast<int32_t>(x);
    return i < 0 ? 0 : (i > 255 ? 255 : i);
}

void hsv_to_bgr_scalar(HsvPlanes& p, int n, int round_from) {
    // (b, g, r) sources per sector, as indices into tab[].
    static const uint8_t kPick[6][3] = {{1, 3, 0}, {1, 0, 2}, {3, 0, 1}, {0, 2, 1}, {0, 1, 3}, {2, 1, 0}};
    for (int i = 0; i < n; ++i) {
        const float hf = static_cast<float>(p.h[i]) * (6.0f / 180);
        const int sector = static_cast<int>(hf);  // hf >= 0 and h < 180: truncation gives 0..5
        const float frac = hf - static_cast<float>(sector);
        const float s = static_cast<float>(p.s[i]) * (1.0f / 255.0f);
        const float v = static_cast<float>(p.v[i]) * (1.0f / 255.0f);
        const double sd = s;
        float tab[4];
        tab[0] = v;
        tab[1] = v * (1.f - s);
        tab[2] = v * static_cast<float>(1.0 - sd * static_cast<double>(frac));
        tab[3] = v * static_cast<float>(1.0 - sd * static_cast<double>(1.f - frac));
        const bool round = i >= round_from;
        p.b[i] = to_byte(tab[kPick[sector][0]] * 255.0f, round);
        p.g[i] = to_byte(tab[kPick[sector][1]] * 255.0f, round);
        p.r[i] = to_byte(tab[kPick[sector][2]] * 255.0f, round);
    }
}

#ifdef KERNELS_HAVE_AVX2_PATH
#define AVX2_FN __attribute__((target("avx2")))

AVX2_FN void bgr_to_hsv_avx2(HsvPlanes& p, int n) {
    const __m256i half = _mm256_set1_epi32(1 << 11), zero = _mm256_setzero_si256(), hue_range = _mm256_set1_epi32(180);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(p.b + i));
        const __m256i g = _mm256_load_si256(reinterpret_cast<const __m256i*>(p.g + i));
        const __m256i r = _mm256_load_si256(reinterpret_cast<const __m256i*>(p.r + i));
        const __m256i v = _mm256_max_epi32(b, _mm256_max_epi32(g, r));
        const __m256i diff = _mm256_sub_epi32(v, _mm256_min_epi32(b, _mm256_min_epi32(g, r)));
        const __m256i from_r = _mm256_sub_epi32(g, b);
        const __m256i from_g = _mm256_add_epi32(_mm256_sub_epi32(b, r), _mm256_slli_epi32(diff, 1));
        const __m256i from_b = _mm256_add_epi32(_mm256_sub_epi32(r, g), _mm256_slli_epi32(diff, 2));
        __m256i raw = _mm256_blendv_epi8(from_b, from_g, _mm256_cmpeq_epi32(v, g));
        raw = _mm256_blendv_epi8(raw, from_r, _mm256_cmpeq_epi32(v, r));
        const __m256i hdiv = _mm256_i32gather_epi32(kTables.hdiv, diff, 4);
        const __m256i sdiv = _mm256_i32gather_epi32(kTables.sdiv, v, 4);
        __m256i h = _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(raw, hdiv), half), 12);
        h = _mm256_add_epi32(h, _mm256_and_si256(_mm256_cmpgt_epi32(zero, h), hue_range));
        const __m256i s = _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(diff, sdiv), half), 12);
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.h + i), h);
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.s + i), s);
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.v + i), v);
    }
    if (i < n) {
        // The tail goes through the scalar code on a shifted view of the same planes.
        HsvPlanes tail;
        const int m = n - i;
        std::copy_n(p.b + i, m, tail.b), std::copy_n(p.g + i, m, tail.g), std::copy_n(p.r + i, m, tail.r);
        bgr_to_hsv_scalar(tail, m);
        std::copy_n(tail.h, m, p.h + i), std::copy_n(tail.s, m, p.s + i), std::copy_n(tail.v, m, p.v + i);
    }
}

// 1 - s * f rounded once to float32, via double (s * f is exact there), eight lanes.
AVX2_FN inline __m256 one_minus_product(__m256 s, __m256 f) {
    const __m256d one = _mm256_set1_pd(1.0);
    const __m256d lo = _mm256_sub_pd(one, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)),
                                                        _mm256_cvtps_pd(_mm256_castps256_ps128(f))));
    const __m256d hi = _mm256_sub_pd(one, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)),
                                                        _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))));
    return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

AVX2_FN inline __m256 pick(__m256i sector, int value, __m256 if_equal, __m256 otherwise) {
    return _mm256_blendv_ps(otherwise, if_equal, _mm256_castsi256_ps(_mm256_cmpeq_epi32(sector, _mm256_set1_epi32(value))));
}

AVX2_FN void hsv_to_bgr_avx2(HsvPlanes& p, int n, int round_from) {
    const __m256 hscale = _mm256_set1_ps(6.0f / 180), inv255 = _mm256_set1_ps(1.0f / 255.0f);
    const __m256 scale255 = _mm256_set1_ps(255.0f), one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= std::min(n, round_from); i += 8) {
        const __m256 hf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.h + i))), hscale);
        const __m256i sector = _mm256_cvttps_epi32(hf);
        const __m256 frac = _mm256_sub_ps(hf, _mm256_cvtepi32_ps(sector));
        const __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.s + i))), inv255);
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.v + i))), inv255);
        const __m256 tab0 = v;
        const __m256 tab1 = _mm256_mul_ps(v, _mm256_sub_ps(one, s));
        const __m256 tab2 = _mm256_mul_ps(v, one_minus_product(s, frac));
        const __m256 tab3 = _mm256_mul_ps(v, one_minus_product(s, _mm256_sub_ps(one, frac)));
        // Sector -> (b, g, r): 0 (1,3,0) 1 (1,0,2) 2 (3,0,1) 3 (0,2,1) 4 (0,1,3) 5 (2,1,0).
        __m256 b = pick(sector, 0, tab1, pick(sector, 1, tab1, pick(sector, 2, tab3, pick(sector, 5, tab2, tab0))));
        __m256 g = pick(sector, 0, tab3, pick(sector, 3, tab2, pick(sector, 4, tab1, pick(sector, 5, tab1, tab0))));
        __m256 r = pick(sector, 1, tab2, pick(sector, 2, tab1, pick(sector, 3, tab1, pick(sector, 4, tab3, tab0))));
        // Values lie in [-1e-7, 255.00002]: truncation alone lands in 0..255.
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.b + i), _mm256_cvttps_epi32(_mm256_mul_ps(b, scale255)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.g + i), _mm256_cvttps_epi32(_mm256_mul_ps(g, scale255)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.r + i), _mm256_cvttps_epi32(_mm256_mul_ps(r, scale255)));
    }
    if (i < n) {
        HsvPlanes tail;
        const int m = n - i;
        std::copy_n(p.h + i, m, tail.h), std::copy_n(p.s + i, m, tail.s), std::copy_n(p.v + i, m, tail.v);
        hsv_to_bgr_scalar(tail, m, round_from - i);
        std::copy_n(tail.b, m, p.b + i), std::copy_n(tail.g, m, p.g + i), std::copy_n(tail.r, m, p.r + i);
    }
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2");
    return has;
}
#endif

bool use_avx2() {
#ifdef KERNELS_HAVE_AVX2_PATH
    return cpu_has_avx2() && !g_force_scalar.load(std::memory_order_relaxed);
#else
    return false;
#endif
}

}  // namespace

void bgr_to_hsv(HsvPlanes& p, int n) {
#ifdef KERNELS_HAVE_AVX2_PATH
    if (use_avx2()) return bgr_to_hsv_avx2(p, n);
#endif
    bgr_to_hsv_scalar(p, n);
}

void hsv_to_bgr(HsvPlanes& p, int n, int round_from) {
#ifdef KERNELS_HAVE_AVX2_PATH
    if (use_avx2()) return hsv_to_bgr_avx2(p, n, round_from);
#endif
    hsv_to_bgr_scalar(p, n, round_from);
}

const char* hsv_implementation() { return use_avx2() ? "avx2" : "scalar"; }

void hsv_force_scalar(bool force) { g_force_scalar.store(force); }

}  // namespace kernels
