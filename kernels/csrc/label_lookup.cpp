// label_lookup: out[i] = table[label[i]] (e.g. Cityscapes id -> trainId), any shape.
#include "common.h"
#include "kernels.h"
#include "lut.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KERNELS_NO_SIMD)
#include <immintrin.h>
#define KERNELS_LOOKUP_AVX2 1
#endif

namespace kernels {
namespace {

void lookup_scalar(const uint8_t* src, uint8_t* dst, int64_t n, const uint8_t* lut) {
    for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

#ifdef KERNELS_LOOKUP_AVX2
// 32 bytes at a time with in-register 16-entry shuffles: the table is 16 slices of 16 bytes and
// slice k answers only for bytes in [16k, 16k + 16). After subtracting 16k, a saturating add of
// 0x70 sets bit 7 (which makes the shuffle output 0) exactly for bytes outside that range; the
// low nibble, which the shuffle uses as index, is untouched. OR-ing the 16 answers gives the
// lookup. About 2x a scalar byte loop, exact by construction.
__attribute__((target("avx2"))) void lookup_avx2(const uint8_t* src, uint8_t* dst, int64_t n, const uint8_t* lut) {
    __m256i slices[16];
    for (int k = 0; k < 16; ++k)
        slices[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 16 * k)));
    const __m256i bias = _mm256_set1_epi8(0x70), step = _mm256_set1_epi8(16);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
        __m256i result = _mm256_setzero_si256();
        for (int k = 0; k < 16; ++k) {
            result = _mm256_or_si256(result, _mm256_shuffle_epi8(slices[k], _mm256_adds_epu8(x, bias)));
            x = _mm256_sub_epi8(x, step);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), result);
    }
    lookup_scalar(src + i, dst + i, n - i, lut);
}

// AVX-512 VBMI: vpermi2b looks 64 bytes up in a 128-entry table held in two registers; two of
// them cover the 256 entries and bit 7 of each byte picks which answer to keep.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void lookup_vbmi(const uint8_t* src, uint8_t* dst, int64_t n,
                                                                     const uint8_t* lut) {
    const __m512i t0 = _mm512_loadu_si512(lut), t1 = _mm512_loadu_si512(lut + 64);
    const __m512i t2 = _mm512_loadu_si512(lut + 128), t3 = _mm512_loadu_si512(lut + 192);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i x = _mm512_loadu_si512(src + i);
        const __m512i low = _mm512_permutex2var_epi8(t0, x, t1);
        const __m512i high = _mm512_permutex2var_epi8(t2, x, t3);
        _mm512_storeu_si512(dst + i, _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), low, high));
    }
    lookup_avx2(src + i, dst + i, n - i, lut);
}
#endif

}  // namespace

void lookup_bytes(const uint8_t* src, uint8_t* dst, int64_t n, const uint8_t* table) {
#ifdef KERNELS_LOOKUP_AVX2
    static const bool has_vbmi = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
    static const bool has_avx2 = __builtin_cpu_supports("avx2");
    if (has_vbmi) return lookup_vbmi(src, dst, n, table);
    if (has_avx2) return lookup_avx2(src, dst, n, table);
#endif
    lookup_scalar(src, dst, n, table);
}

py::array label_lookup(const py::object& label_obj, const py::object& table_obj, const py::object& out_obj,
                       int num_threads) {
    py::array label = as_array(label_obj, "label");
    require_uint8(label, "label");
    require_contiguous(label, "label");
    py::array table = as_array(table_obj, "table");
    require_uint8(table, "table");
    require_contiguous(table, "table");
    require_shape(table, "table", {256});
    require_threads(num_threads);

    std::vector<py::ssize_t> shape(label.shape(), label.shape() + label.ndim());
    py::array out = uint8_output(out_obj, shape, label, "label", /*in_place_ok=*/true);

    const uint8_t* src = static_cast<const uint8_t*>(label.data());
    uint8_t* dst = static_cast<uint8_t*>(out.mutable_data());
    uint8_t lut[256];
    std::copy_n(static_cast<const uint8_t*>(table.data()), 256, lut);
    const int64_t n = label.size();
    {
        py::gil_scoped_release release;
        // 256 KiB per chunk keeps thread start-up cost (~20 us) small against the work.
        parallel_for(n, num_threads, int64_t{1} << 18, [&](int64_t begin, int64_t end) {
            lookup_bytes(src + begin, dst + begin, end - begin, lut);
        });
    }
    return out;
}

}  // namespace kernels
