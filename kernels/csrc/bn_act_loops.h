// The hot loops of bn_act.cpp (included by it alone, after its other headers): each is one pass
// over rows [r0, r1) of row-major [M, C] float32 data, written once as an always-inline template
// and instantiated twice, for the baseline ISA and with AVX2 enabled (picked at run time, as
// normalize.cpp does). FP contraction is off (common.h; GCC's ISO mode), so both copies round
// identically: no FMA in either.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#define BN_ACT_AVX2 1
#endif
#define BN_ACT_INLINE inline __attribute__((always_inline))

// GCC's default -ftrapping-math keeps the activation's select (v > 0 ? v : slope * v) a branch,
// which blocks vectorisation of every loop here; dropping it changes no result (values, NaN
// propagation and rounding are the same), only the assumption that FP exceptions are observed.
// bn_act.cpp includes this header last, so the pragma applies to bn_act's own functions only.
// Clang does not trap by default.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace kernels {
namespace bn_act {

// One pass over rows of row-major [M, C] float32 data: pointers and per-channel constants.
struct Pass {
    const float* src = nullptr;  // x (forward; backward in input mode) or y (backward, output mode)
    const float* dy = nullptr;
    const float* res = nullptr;  // residual, may be null
    float* out = nullptr;        // y (forward), dx (backward) or dresidual (reduce; may be null)
    int64_t c = 0;
    const float *a = nullptr, *b = nullptr, *beta = nullptr, *inv_gamma = nullptr;
    const float *mean = nullptr, *invstd = nullptr;
    const float *mean_g = nullptr, *mean_gx = nullptr, *scale = nullptr;  // dx only
    float slope = 0.f, inv_slope = 0.f;
    bool from_output = true;
};

BN_ACT_INLINE void stats_body(const Pass& p, int64_t r0, int64_t r1, const double* __restrict__ shift,
                              double* __restrict__ s1, double* __restrict__ s2) {
    // Sums of (x - shift) and its square: shifting by a sample of the channel keeps the
    // E[d^2] - E[d]^2 subtraction well conditioned when the mean is large against the spread.
    const int64_t c = p.c;
    for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict__ row = p.src + r * c;
        for (int64_t j = 0; j < c; ++j) {
            const double d = static_cast<double>(row[j]) - shift[j];
            s1[j] += d;
            s2[j] += d * d;
        }
    }
}

template <bool kRes>
BN_ACT_INLINE void forward_body(const Pass& p, int64_t r0, int64_t r1) {
    // src may be out itself (in place): each element is read before it is written.
    const int64_t c = p.c;
    const float *a = p.a, *b = p.b;
    const float slope = p.slope;
    for (int64_t r = r0; r < r1; ++r) {
        const float* x = p.src + r * c;
        const float* res = kRes ? p.res + r * c : nullptr;
        float* y = p.out + r * c;
        for (int64_t j = 0; j < c; ++j) {
            float v = x[j] * a[j] + b[j];
            if constexpr (kRes) v += res[j];
            const float negative = v * slope;
            y[j] = v > 0.f ? v : negative;
        }
    }
}

// x_hat and g = dL/d(pre-activation) of one element. Output mode inverts y = act(z): z = y where
// y > 0 (the slope branch maps z <= 0 to y <= 0), else y / slope. Input mode recomputes z exactly
// as forward_body did, so its ReLU mask is the forward's.
template <bool kOut, bool kRes>
BN_ACT_INLINE void element(const Pass& p, const float* src, const float* dy, const float* res, int64_t j, float* xh,
                           float* g) {
    const float s = src[j], d = dy[j];
    if constexpr (kOut) {
        const bool pos = s > 0.f;
        const float s_neg = s * p.inv_slope, d_neg = d * p.slope;
        float z = pos ? s : s_neg;
        if constexpr (kRes) z -= res[j];
        *xh = (z - p.beta[j]) * p.inv_gamma[j];
        *g = pos ? d : d_neg;
    } else {
        float z = s * p.a[j] + p.b[j];
        if constexpr (kRes) z += res[j];
        *xh = (s - p.mean[j]) * p.invstd[j];
        const float d_neg = d * p.slope;
        *g = z > 0.f ? d : d_neg;
    }
}

template <bool kOut, bool kRes, bool kDres>
BN_ACT_INLINE void reduce_body(const Pass& p, int64_t r0, int64_t r1, double* __restrict__ sum_g,
                               double* __restrict__ sum_gx) {
    const int64_t c = p.c;
    for (int64_t r = r0; r < r1; ++r) {
        const float* src = p.src + r * c;
        const float* dy = p.dy + r * c;
        const float* res = kRes ? p.res + r * c : nullptr;
        float* dres = kDres ? p.out + r * c : nullptr;
        for (int64_t j = 0; j < c; ++j) {
            float xh, g;
            element<kOut, kRes>(p, src, dy, res, j, &xh, &g);
            sum_g[j] += static_cast<double>(g);
            sum_gx[j] += static_cast<double>(g) * static_cast<double>(xh);
            if constexpr (kDres) dres[j] = g;
        }
    }
}

template <bool kOut, bool kRes>
BN_ACT_INLINE void dx_body(const Pass& p, int64_t r0, int64_t r1) {
    const int64_t c = p.c;
    const float *mg = p.mean_g, *mgx = p.mean_gx, *scale = p.scale;
    for (int64_t r = r0; r < r1; ++r) {
        const float* src = p.src + r * c;
        const float* dy = p.dy + r * c;
        const float* res = kRes ? p.res + r * c : nullptr;
        float* dx = p.out + r * c;
        for (int64_t j = 0; j < c; ++j) {
            float xh, g;
            element<kOut, kRes>(p, src, dy, res, j, &xh, &g);
            dx[j] = (g - mg[j] - xh * mgx[j]) * scale[j];
        }
    }
}

// The entry points of the loops, defined once per instruction set.
#define BN_ACT_PASSES(SUFFIX, ATTR)                                                                              \
    static ATTR void stats##SUFFIX(const Pass& p, int64_t r0, int64_t r1, const double* shift, double* s1,       \
                                   double* s2) {                                                                 \
        stats_body(p, r0, r1, shift, s1, s2);                                                                    \
    }                                                                                                            \
    static ATTR void forward##SUFFIX(const Pass& p, int64_t r0, int64_t r1) {                                    \
        if (p.res) forward_body<true>(p, r0, r1);                                                                \
        else forward_body<false>(p, r0, r1);                                                                     \
    }                                                                                                            \
    static ATTR void reduce##SUFFIX(const Pass& p, int64_t r0, int64_t r1, double* sg, double* sgx) {            \
        switch ((p.from_output ? 4 : 0) + (p.res ? 2 : 0) + (p.out ? 1 : 0)) {                                   \
            case 0: return reduce_body<false, false, false>(p, r0, r1, sg, sgx);                                 \
            case 1: return reduce_body<false, false, true>(p, r0, r1, sg, sgx);                                  \
            case 2: return reduce_body<false, true, false>(p, r0, r1, sg, sgx);                                  \
            case 3: return reduce_body<false, true, true>(p, r0, r1, sg, sgx);                                   \
            case 4: return reduce_body<true, false, false>(p, r0, r1, sg, sgx);                                  \
            case 5: return reduce_body<true, false, true>(p, r0, r1, sg, sgx);                                   \
            case 6: return reduce_body<true, true, false>(p, r0, r1, sg, sgx);                                   \
            default: return reduce_body<true, true, true>(p, r0, r1, sg, sgx);                                   \
        }                                                                                                        \
    }                                                                                                            \
    static ATTR void dx##SUFFIX(const Pass& p, int64_t r0, int64_t r1) {                                         \
        if (p.from_output && p.res) dx_body<true, true>(p, r0, r1);                                              \
        else if (p.from_output) dx_body<true, false>(p, r0, r1);                                                 \
        else if (p.res) dx_body<false, true>(p, r0, r1);                                                         \
        else dx_body<false, false>(p, r0, r1);                                                                   \
    }

BN_ACT_PASSES(_baseline, )
#ifdef BN_ACT_AVX2
BN_ACT_PASSES(_avx2, __attribute__((target("avx2"))))
#endif

struct Passes {
    void (*stats)(const Pass&, int64_t, int64_t, const double*, double*, double*);
    void (*forward)(const Pass&, int64_t, int64_t);
    void (*reduce)(const Pass&, int64_t, int64_t, double*, double*);
    void (*dx)(const Pass&, int64_t, int64_t);
};

// Testing hook (kernels._C._bn_act_force_baseline): run the baseline copies on an AVX2 CPU too.
inline std::atomic<bool> force_baseline{false};

inline const Passes& passes() {
#ifdef BN_ACT_AVX2
    static const bool avx2 = __builtin_cpu_supports("avx2");
    static const Passes fast{stats_avx2, forward_avx2, reduce_avx2, dx_avx2};
    if (avx2 && !force_baseline.load()) return fast;
#endif
    static const Passes baseline{stats_baseline, forward_baseline, reduce_baseline, dx_baseline};
    return baseline;
}

}  // namespace bn_act
}  // namespace kernels
