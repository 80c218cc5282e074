// normalize: uint8 [N,H,W,3] -> float32 or bfloat16 (x - mean) / std per channel, optionally
// swapping BGR -> RGB, written either as NCHW planes or, for a channels_last output, in NHWC
// order (the same pixel-interleaved order as the input). kernels/ops.py passes torch tensors as
// numpy views (bfloat16 as its 16-bit pattern) so no torch headers are needed here; a
// channels_last tensor arrives as an [N,3,H,W] view whose strides are NHWC.
//
// Every value is torch's float32 arithmetic, a subtraction then a true division, and for
// bfloat16 torch's round-to-nearest-even of those bits. A uint8 input has 256 values per
// channel, so the portable code tabulates them once per call and then only reads the table.
// That is ~3 instructions per output (load byte, load entry, store) and left the bfloat16 path
// compute-bound at ~40% of memcpy, so with AVX2 + FMA the arithmetic runs 8 lanes at a time
// instead (about one instruction per output): pshufb, convert, subtract, and the division as a
// reciprocal multiply with one exact correction, used only when a check over all 3 x 256
// inputs at table-build time shows it reproduces the division bit for bit. The tail of every
// vector loop goes through the table.
#include <cmath>
#include <cstring>

#include "common.h"
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#include <immintrin.h>
#define KERNELS_NORMALIZE_AVX2 1
#endif

namespace kernels {
namespace {

uint16_t float_to_bf16_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    // Round to nearest, ties to even, on the 16 dropped bits (the inputs here are never NaN).
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

struct Params {
    int in_channel[3];  // output channel c reads input byte in_channel[c] of each pixel
    float mean[3], std_dev[3];
    float reciprocal[3];    // float32(1 / std_dev)
    bool reciprocal_exact;  // quotient_via_reciprocal gives lut_f's bits for all 3 x 256 inputs
    float lut_f[3][256];
    uint16_t lut_b[3][256];
};

// diff / std without a division: q0 = diff * (1/std) is within an ulp, and one correction
// with the exact residual diff - q0 * std (a fused multiply-add) makes it the correctly rounded
// quotient (Markstein's theorem; Muller et al., Handbook of Floating-Point Arithmetic, 2nd ed.,
// sec. 4.7) barring overflow/underflow. The caller checks it against true division for every
// possible input anyway, so extreme std values simply keep the division.
inline float quotient_via_reciprocal(float diff, float std_dev, float reciprocal) {
    const float q0 = diff * reciprocal;
    return std::fma(std::fma(-q0, std_dev, diff), reciprocal, q0);
}

template <typename T>
const T (*lut_of(const Params& p))[256] {
    if constexpr (sizeof(T) == 4) return p.lut_f;
    else return p.lut_b;
}

// Pixels [x0, x1) of one row into three planes (plane[c] points at the row's start in plane c).
template <typename T>
void row_to_planes_scalar(const uint8_t* in, T* const plane[3], const Params& p, int64_t x0, int64_t x1) {
    const T (*lut)[256] = lut_of<T>(p);
    for (int c = 0; c < 3; ++c) {
        const T* table = lut[c];
        const uint8_t* src = in + p.in_channel[c];
        T* dst = plane[c];
        for (int64_t x = x0; x < x1; ++x) dst[x] = table[src[3 * x]];
    }
}

// Pixels [p0, p1) written interleaved: out[3 i + c] from in[3 i + in_channel[c]].
template <typename T>
void pixels_to_nhwc_scalar(const uint8_t* in, T* out, const Params& p, int64_t p0, int64_t p1) {
    const T (*lut)[256] = lut_of<T>(p);
    const int i0 = p.in_channel[0], i1 = p.in_channel[1], i2 = p.in_channel[2];
    for (int64_t i = p0; i < p1; ++i) {
        const uint8_t* px = in + 3 * i;
        T* o = out + 3 * i;
        o[0] = lut[0][px[i0]];
        o[1] = lut[1][px[i1]];
        o[2] = lut[2][px[i2]];
    }
}

#ifdef KERNELS_NORMALIZE_AVX2
#define AVX2_FN __attribute__((target("avx2,fma")))

// A block is 8 pixels = 24 input bytes, producing three vectors of 8 outputs. For NCHW, vector g
// is output channel g (lanes = the 8 pixels); for NHWC, vector g is outputs 8g..8g+7 of the
// block (lanes cycle through the channels). One pshufb per vector puts each lane's input byte in
// the low byte of its 32-bit lane and zeroes the rest (a zero-extension), from a register
// holding block bytes [a, a+16) in its low half and [b, b+16) in its high half (pshufb cannot
// cross halves). Lanes 0-3 read bytes within 0..11 and lanes 4-7 within 12..23, except for NHWC
// vector 0 (lanes 4-7 read 3..8) and vector 2 (lanes 0-3 read 15..20): see half_offset.
enum class Layout { kPlanes, kNhwc };

constexpr int half_offset(Layout layout, int vector, int half) {
    if (layout == Layout::kNhwc && vector != 1) return vector == 0 ? 0 : 8;
    return 8 * half;
}

struct BlockShuffle {
    alignas(32) uint8_t index[3][32];  // pshufb control of vector g
    alignas(32) float mean[3][8];
    alignas(32) float std_dev[3][8];
    alignas(32) float reciprocal[3][8];
};

template <Layout L>
BlockShuffle make_shuffle(const Params& p) {
    BlockShuffle s;
    std::memset(s.index, 0x80, sizeof s.index);
    for (int g = 0; g < 3; ++g) {
        for (int j = 0; j < 8; ++j) {
            const int e = 8 * g + j;  // output element of the block (NHWC)
            const int channel = L == Layout::kPlanes ? g : e % 3;
            const int byte = L == Layout::kPlanes ? 3 * j + p.in_channel[g] : 3 * (e / 3) + p.in_channel[channel];
            const int half = j / 4;
            s.index[g][16 * half + 4 * (j % 4)] = static_cast<uint8_t>(byte - half_offset(L, g, half));
            s.mean[g][j] = p.mean[channel];
            s.std_dev[g][j] = p.std_dev[channel];
            s.reciprocal[g][j] = p.reciprocal[channel];
        }
    }
    return s;
}

AVX2_FN inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

AVX2_FN inline void store8(uint16_t* dst, __m256 v) {
    // float_to_bf16_bits on 8 lanes; the results fit 16 bits, so the unsigned pack is exact.
    __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    bits = _mm256_srli_epi32(bits, 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}

// Blocks [0, blocks) starting at `in`; vector g of block k goes to dst[g] + k * step. A division
// (5 cycles per 8 lanes on recent Intel cores) bounded this loop; the reciprocal form is three
// multiply-adds, which two FMA ports run in 1.5.
template <typename T, Layout L, bool kViaReciprocal>
AVX2_FN void blocks_avx2(const uint8_t* in, T* const dst[3], int64_t step, int64_t blocks, const BlockShuffle& s) {
    __m256i index[3];
    __m256 mean[3], std_dev[3], reciprocal[3];
    for (int g = 0; g < 3; ++g) {
        index[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s.index[g]));
        mean[g] = _mm256_load_ps(s.mean[g]);
        std_dev[g] = _mm256_load_ps(s.std_dev[g]);
        reciprocal[g] = _mm256_load_ps(s.reciprocal[g]);
    }
    for (int64_t k = 0; k < blocks; ++k) {
        const uint8_t* b = in + 24 * k;
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8));
        const __m256i lo_hi = _mm256_set_m128i(hi, lo);
        const __m256i source[3] = {L == Layout::kPlanes ? lo_hi : _mm256_broadcastsi128_si256(lo), lo_hi,
                                   L == Layout::kPlanes ? lo_hi : _mm256_broadcastsi128_si256(hi)};
        for (int g = 0; g < 3; ++g) {
            const __m256 x = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(source[g], index[g]));
            const __m256 diff = _mm256_sub_ps(x, mean[g]);
            __m256 q;
            if constexpr (kViaReciprocal) {
                const __m256 q0 = _mm256_mul_ps(diff, reciprocal[g]);
                q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, std_dev[g], diff), reciprocal[g], q0);
            } else {
                q = _mm256_div_ps(diff, std_dev[g]);
            }
            store8(dst[g] + k * step, q);
        }
    }
}

template <typename T, Layout L>
AVX2_FN void blocks_avx2(const uint8_t* in, T* const dst[3], int64_t step, int64_t blocks, const BlockShuffle& s,
                         bool via_reciprocal) {
    static_assert(half_offset(L, 1, 0) == 0 && half_offset(L, 1, 1) == 8, "vector 1 reads lo_hi");
    if (via_reciprocal) blocks_avx2<T, L, true>(in, dst, step, blocks, s);
    else blocks_avx2<T, L, false>(in, dst, step, blocks, s);
}

// Image rows [begin, end) of the batch (item = n * H + y) into NCHW planes.
template <typename T>
AVX2_FN void rows_to_planes_avx2(const uint8_t* src, T* dst, const Params& p, int64_t h, int64_t w, int64_t begin,
                                 int64_t end) {
    const BlockShuffle shuffle = make_shuffle<Layout::kPlanes>(p);
    const int64_t hw = h * w;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / h, y = item % h;
        const uint8_t* in = src + (n * hw + y * w) * 3;
        T* const plane[3] = {dst + (3 * n + 0) * hw + y * w, dst + (3 * n + 1) * hw + y * w,
                             dst + (3 * n + 2) * hw + y * w};
        blocks_avx2<T, Layout::kPlanes>(in, plane, 8, w / 8, shuffle, p.reciprocal_exact);
        row_to_planes_scalar<T>(in, plane, p, w / 8 * 8, w);
    }
}

// Blocks of 8 pixels [begin, end) of the whole batch into NHWC (the last block may be partial).
template <typename T>
AVX2_FN void blocks_to_nhwc_avx2(const uint8_t* src, T* dst, const Params& p, int64_t pixels, int64_t begin,
                                 int64_t end) {
    const int64_t p0 = 8 * begin, p1 = std::min(pixels, 8 * end), full = (p1 - p0) / 8;
    T* const out[3] = {dst + 3 * p0, dst + 3 * p0 + 8, dst + 3 * p0 + 16};
    blocks_avx2<T, Layout::kNhwc>(src + 3 * p0, out, 24, full, make_shuffle<Layout::kNhwc>(p), p.reciprocal_exact);
    pixels_to_nhwc_scalar<T>(src, dst, p, p0 + 8 * full, p1);
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}
#endif  // KERNELS_NORMALIZE_AVX2

template <typename T>
void rows_to_planes(const uint8_t* src, T* dst, const Params& p, int64_t h, int64_t w, int64_t begin, int64_t end) {
#ifdef KERNELS_NORMALIZE_AVX2
    if (cpu_has_avx2()) return rows_to_planes_avx2<T>(src, dst, p, h, w, begin, end);
#endif
    const int64_t hw = h * w;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / h, y = item % h;
        T* const plane[3] = {dst + (3 * n + 0) * hw + y * w, dst + (3 * n + 1) * hw + y * w,
                             dst + (3 * n + 2) * hw + y * w};
        row_to_planes_scalar<T>(src + (n * hw + y * w) * 3, plane, p, 0, w);
    }
}

template <typename T>
void blocks_to_nhwc(const uint8_t* src, T* dst, const Params& p, int64_t pixels, int64_t begin, int64_t end) {
#ifdef KERNELS_NORMALIZE_AVX2
    if (cpu_has_avx2()) return blocks_to_nhwc_avx2<T>(src, dst, p, pixels, begin, end);
#endif
    pixels_to_nhwc_scalar<T>(src, dst, p, 8 * begin, std::min(pixels, 8 * end));
}

// True if `a` is [N,3,H,W] with NHWC-dense strides (dimensions of size 1 may have any stride,
// as torch's is_contiguous(memory_format=torch.channels_last) allows).
bool is_nhwc_dense(const py::array& a) {
    const int order[4] = {1, 3, 2, 0};  // innermost first: C, W, H, N
    py::ssize_t expected = a.itemsize();
    for (int d : order) {
        if (a.shape(d) != 1 && a.strides(d) != expected) return false;
        expected *= a.shape(d);
    }
    return true;
}

}  // namespace

void normalize(const py::object& img_obj, const std::vector<double>& mean, const std::vector<double>& std,
               bool to_rgb, bool bfloat16, const py::object& out_obj, int num_threads) {
    py::array img = as_array(img_obj, "img");
    require_uint8(img, "img");
    require_ndim(img, "img", 4, 4);
    require_contiguous(img, "img");
    if (img.shape(3) != 3) throw py::value_error("img must be [N,H,W,3], got shape " + shape_str(img));
    if (mean.size() != 3) throw py::value_error("mean must hold 3 numbers");
    if (std.size() != 3) throw py::value_error("std must hold 3 numbers");
    for (int c = 0; c < 3; ++c) {
        if (!std::isfinite(mean[c])) throw py::value_error("mean must hold 3 finite numbers");
        if (!std::isfinite(std[c]) || static_cast<float>(std[c]) == 0.f)
            throw py::value_error("std must hold 3 finite non-zero numbers");
    }
    require_threads(num_threads);
    py::array out = as_array(out_obj, "out");
    if (bfloat16) {
        if (!has_dtype<int16_t>(out) && !has_dtype<uint16_t>(out))
            throw py::type_error("out must have dtype int16/uint16 (bfloat16 bits), got " + dtype_str(out));
    } else if (!has_dtype<float>(out)) {
        throw py::type_error("out must have dtype float32, got " + dtype_str(out));
    }
    require_writeable(out, "out");
    const int64_t n = img.shape(0), h = img.shape(1), w = img.shape(2);
    require_shape(out, "out", {n, 3, h, w});
    // When both hold (e.g. H = W = 1) the two layouts are the same bytes, so either loop is right.
    const bool planes = (out.flags() & py::array::c_style) != 0;
    if (!planes && !is_nhwc_dense(out))
        throw py::value_error("out must be C-contiguous (NCHW) or channels_last (NHWC memory), got strides " +
                              py::str(out.attr("strides")).cast<std::string>());
    if (overlaps(img, out)) throw py::value_error("out must not overlap img");

    // Output channel c reads input channel 2 - c when swapping BGR -> RGB; mean/std are indexed
    // by output channel (mmseg gives them in RGB order with to_rgb=True).
    Params p;
    p.reciprocal_exact = true;
    for (int c = 0; c < 3; ++c) {
        p.in_channel[c] = to_rgb ? 2 - c : c;
        p.mean[c] = static_cast<float>(mean[c]);
        p.std_dev[c] = static_cast<float>(std[c]);
        p.reciprocal[c] = 1.0f / p.std_dev[c];
        for (int v = 0; v < 256; ++v) {
            const float diff = static_cast<float>(v) - p.mean[c];
            p.lut_f[c][v] = diff / p.std_dev[c];
            p.lut_b[c][v] = float_to_bf16_bits(p.lut_f[c][v]);
            const float fast = quotient_via_reciprocal(diff, p.std_dev[c], p.reciprocal[c]);
            p.reciprocal_exact = p.reciprocal_exact && std::memcmp(&fast, &p.lut_f[c][v], sizeof fast) == 0;
        }
    }
    const uint8_t* src = static_cast<const uint8_t*>(img.data());
    void* dst = out.mutable_data();
    py::gil_scoped_release release;
    // ~32K pixels per chunk at least: below that, waking a thread costs more than it saves.
    constexpr int64_t kMinChunkPixels = int64_t{1} << 15;
    if (planes) {
        const int64_t min_rows = std::max<int64_t>(1, kMinChunkPixels / std::max<int64_t>(1, w));
        parallel_for(n * h, num_threads, min_rows, [&](int64_t b, int64_t e) {
            if (bfloat16) rows_to_planes<uint16_t>(src, static_cast<uint16_t*>(dst), p, h, w, b, e);
            else rows_to_planes<float>(src, static_cast<float*>(dst), p, h, w, b, e);
        });
    } else {
        const int64_t pixels = n * h * w;
        parallel_for((pixels + 7) / 8, num_threads, kMinChunkPixels / 8, [&](int64_t b, int64_t e) {
            if (bfloat16) blocks_to_nhwc<uint16_t>(src, static_cast<uint16_t*>(dst), p, pixels, b, e);
            else blocks_to_nhwc<float>(src, static_cast<float*>(dst), p, pixels, b, e);
        });
    }
}

}  // namespace kernels
