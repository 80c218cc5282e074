// resize_crop: the window (y0, x0, h, w) of cv2.resize(src, (out_w, out_h)), optionally mirrored,
// computed without materialising the resized frame.
//
// Bilinear follows OpenCV's INTER_LINEAR for 8-bit images (modules/imgproc/src/resize.cpp, facts
// checked bit-exact against cv2 5.0 by tests/test_kernels_resize.py):
//  * dst d maps to src (d + 0.5) * scale - 0.5, evaluated in float with scale = 1 / (dst / src)
//    computed in double; i = floor, f = fraction;
//  * weights are round(f * 2048) and round((1 - f) * 2048) (11-bit fixed point);
//  * columns left of 0 or right of the last pixel snap to that pixel with weights (2048, 0);
//    rows keep their weights and only clamp the row index;
//  * the horizontal pass is exact in int32; the vertical pass is OpenCV's vectorised rounding
//    ((((a >> 4) * b0) >> 16) + (((c >> 4) * b1) >> 16) + 2) >> 2, which differs from the
//    exact (a*b0 + c*b1 + 2^21) >> 22 in about 10% of pixels, so it is reproduced as is.
// Nearest follows INTER_NEAREST: src = min(floor(d * (1 / (dst / src))), src - 1).
// One known difference: cv2 resizes 2-channel images to exactly half size with an area path
// that rounds differently (at most 1 level); 1, 3 and 4 channels match there too.
// On x86-64 both passes use SSE2 (part of the architecture); the scalar code computes the same.
#include <cmath>
#include <cstring>

#if defined(__SSE2__) && !defined(KERNELS_NO_SIMD)
#include <emmintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace kernels {
namespace {

constexpr int kCoefScale = 2048;

struct Taps {
    std::vector<int32_t> i0, i1;  // source indices (pixels)
    std::vector<int32_t> w0, w1;  // 11-bit weights
};

// Source taps for dst positions [start, start + count) along one axis.
Taps linear_taps(int64_t dst_len, int64_t src_len, int64_t start, int64_t count, bool clamp_weights) {
    Taps t;
    t.i0.resize(count), t.i1.resize(count), t.w0.resize(count), t.w1.resize(count);
    const double scale = 1.0 / (static_cast<double>(dst_len) / static_cast<double>(src_len));
    for (int64_t k = 0; k < count; ++k) {
        const double scaled = (static_cast<double>(start + k) + 0.5) * scale;
        const float pos = static_cast<float>(scaled - 0.5);
        int64_t i = static_cast<int64_t>(std::floor(pos));
        float frac = pos - static_cast<float>(i);
        if (clamp_weights && (i < 0 || i >= src_len - 1)) {
            frac = 0.f;
            i = i < 0 ? 0 : src_len - 1;
        }
        t.i0[k] = static_cast<int32_t>(std::clamp<int64_t>(i, 0, src_len - 1));
        t.i1[k] = static_cast<int32_t>(std::clamp<int64_t>(i + 1, 0, src_len - 1));
        // std::nearbyint rounds half to even, as OpenCV's saturate_cast<short>(float) does.
        t.w0[k] = static_cast<int32_t>(std::nearbyint((1.f - frac) * static_cast<float>(kCoefScale)));
        t.w1[k] = static_cast<int32_t>(std::nearbyint(frac * static_cast<float>(kCoefScale)));
    }
    return t;
}

std::vector<int32_t> nearest_taps(int64_t dst_len, int64_t src_len, int64_t start, int64_t count) {
    std::vector<int32_t> idx(count);
    const double scale = 1.0 / (static_cast<double>(dst_len) / static_cast<double>(src_len));
    for (int64_t k = 0; k < count; ++k) {
        int64_t i = static_cast<int64_t>(std::floor(static_cast<double>(start + k) * scale));
        idx[k] = static_cast<int32_t>(std::min<int64_t>(i, src_len - 1));
    }
    return idx;
}

template <typename T>
void reverse_all(std::vector<T>& v) { std::reverse(v.begin(), v.end()); }

// Horizontal pass of one source row into int32 sums (C channels, compile-time for speed).
// dst needs one spare int32 past w * C: the 3-channel SSE2 path stores four lanes per pixel.
template <int C>
void horizontal(const uint8_t* row, int64_t row_bytes, const int32_t* off0, const int32_t* off1, const int32_t* w0,
                const int32_t* w1, int64_t w, int32_t* dst) {
    auto scalar_pixel = [&](int64_t j) {
        const uint8_t* p0 = row + off0[j];
        const uint8_t* p1 = row + off1[j];
        for (int c = 0; c < C; ++c) dst[j * C + c] = p0[c] * w0[j] + p1[c] * w1[j];
    };
#if defined(__SSE2__) && !defined(KERNELS_NO_SIMD)
    if constexpr (C == 3 || C == 4) {
        // Interleave the two source pixels' bytes (a0 b0 a1 b1 ...), widen to int16 and let one
        // madd compute a*w0 + b*w1 for all channels at once. A 3-channel pixel is read as 4 bytes,
        // so a pixel ending the row takes the scalar path (the extra byte could lie past the
        // end of the image).
        const __m128i zero = _mm_setzero_si128();
        for (int64_t j = 0; j < w; ++j) {
            if (C == 3 && std::max(off0[j], off1[j]) + 4 > row_bytes) {
                scalar_pixel(j);
                continue;
            }
            int32_t a, b;
            std::memcpy(&a, row + off0[j], 4);
            std::memcpy(&b, row + off1[j], 4);
            const __m128i pair = _mm_unpacklo_epi8(_mm_cvtsi32_si128(a), _mm_cvtsi32_si128(b));
            const __m128i weights = _mm_set1_epi32((w1[j] << 16) | (w0[j] & 0xFFFF));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * C),
                             _mm_madd_epi16(_mm_unpacklo_epi8(pair, zero), weights));
        }
        return;
    }
#endif
    for (int64_t j = 0; j < w; ++j) scalar_pixel(j);
}

// One output row from two horizontally filtered rows: OpenCV's vectorised vertical step, whose
// 16-bit multiply-high (v_mul_hi) floors each term separately. SSE2 is part of x86-64, so the
// intrinsic path needs no run-time dispatch; the scalar loop is the same formula.
void vertical(const int32_t* top, const int32_t* bottom, int32_t b0, int32_t b1, uint8_t* dst, int64_t n) {
    int64_t k = 0;
#if defined(__SSE2__) && !defined(KERNELS_NO_SIMD)
    const __m128i w0 = _mm_set1_epi16(static_cast<int16_t>(b0)), w1 = _mm_set1_epi16(static_cast<int16_t>(b1));
    const __m128i two = _mm_set1_epi16(2);
    auto eight = [&](int64_t at) {
        auto load16 = [&](const int32_t* p) {
            const __m128i lo = _mm_srai_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + at)), 4);
            const __m128i hi = _mm_srai_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + at + 4)), 4);
            return _mm_packs_epi32(lo, hi);  // values <= 255 * 2048 >> 4 fit int16
        };
        const __m128i sum = _mm_add_epi16(_mm_mulhi_epi16(load16(top), w0), _mm_mulhi_epi16(load16(bottom), w1));
        return _mm_srai_epi16(_mm_add_epi16(sum, two), 2);
    };
    for (; k + 16 <= n; k += 16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm_packus_epi16(eight(k), eight(k + 8)));
#endif
    for (; k < n; ++k) {
        const int32_t v = ((((top[k] >> 4) * b0) >> 16) + (((bottom[k] >> 4) * b1) >> 16) + 2) >> 2;
        dst[k] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
}

struct BilinearPlan {
    std::vector<int32_t> row0, row1, rw0, rw1;  // per output row
    std::vector<int32_t> off0, off1, cw0, cw1;  // per output column, byte offsets in a row
};

template <int C>
void bilinear_rows(const uint8_t* src, int64_t src_stride, const BilinearPlan& plan, int64_t w, uint8_t* out,
                   int64_t begin, int64_t end) {
    const int64_t n = w * C;
    // Two cached horizontally-resized source rows: consecutive output rows share source rows
    // when upscaling, so each source row is filtered once per thread.
    std::vector<int32_t> buf_a(n + 1), buf_b(n + 1);
    int32_t* bufs[2] = {buf_a.data(), buf_b.data()};
    int64_t cached[2] = {-1, -1};
    auto fetch = [&](int64_t r, const int32_t* keep) -> const int32_t* {
        for (int s = 0; s < 2; ++s)
            if (cached[s] == r) return bufs[s];
        int slot = (bufs[0] == keep) ? 1 : (bufs[1] == keep) ? 0 : (cached[0] < cached[1] ? 0 : 1);
        horizontal<C>(src + r * src_stride, src_stride, plan.off0.data(), plan.off1.data(), plan.cw0.data(), plan.cw1.data(),
                      w, bufs[slot]);
        cached[slot] = r;
        return bufs[slot];
    };
    for (int64_t y = begin; y < end; ++y) {
        const int32_t* top = fetch(plan.row0[y], nullptr);
        const int32_t* bottom = fetch(plan.row1[y], top);
        vertical(top, bottom, plan.rw0[y], plan.rw1[y], out + y * n, n);
    }
}

template <int C>
void nearest_rows(const uint8_t* src, int64_t src_stride, const std::vector<int32_t>& rows,
                  const std::vector<int32_t>& offs, int64_t w, uint8_t* out, int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
        const uint8_t* row = src + rows[y] * src_stride;
        uint8_t* dst = out + y * w * C;
        for (int64_t j = 0; j < w; ++j)
            for (int c = 0; c < C; ++c) dst[j * C + c] = row[offs[j] + c];
    }
}

template <int C>
void run(const uint8_t* src, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t y0, int64_t x0,
         int64_t h, int64_t w, bool flip, bool nearest, uint8_t* out, int num_threads) {
    const int64_t src_stride = in_w * C;
    const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, w * C));
    if (nearest) {
        std::vector<int32_t> rows = nearest_taps(out_h, in_h, y0, h);
        std::vector<int32_t> offs = nearest_taps(out_w, in_w, x0, w);
        if (flip) reverse_all(offs);
        for (auto& o : offs) o *= C;
        parallel_for(h, num_threads, min_rows, [&](int64_t b, int64_t e) {
            nearest_rows<C>(src, src_stride, rows, offs, w, out, b, e);
        });
        return;
    }
    BilinearPlan plan;
    Taps ty = linear_taps(out_h, in_h, y0, h, /*clamp_weights=*/false);
    Taps tx = linear_taps(out_w, in_w, x0, w, /*clamp_weights=*/true);
    if (flip) {
        reverse_all(tx.i0), reverse_all(tx.i1), reverse_all(tx.w0), reverse_all(tx.w1);
    }
    plan.row0 = std::move(ty.i0), plan.row1 = std::move(ty.i1), plan.rw0 = std::move(ty.w0), plan.rw1 = std::move(ty.w1);
    plan.off0 = std::move(tx.i0), plan.off1 = std::move(tx.i1), plan.cw0 = std::move(tx.w0), plan.cw1 = std::move(tx.w1);
    for (auto& o : plan.off0) o *= C;
    for (auto& o : plan.off1) o *= C;
    parallel_for(h, num_threads, min_rows, [&](int64_t b, int64_t e) {
        bilinear_rows<C>(src, src_stride, plan, w, out, b, e);
    });
}

}  // namespace

py::array resize_crop(const py::object& src_obj, int64_t out_h, int64_t out_w, int64_t y0, int64_t x0, int64_t h,
                      int64_t w, bool flip, const std::string& interp, const py::object& out_obj, int num_threads) {
    py::array src = as_array(src_obj, "src");
    require_uint8(src, "src");
    require_ndim(src, "src", 2, 3);
    require_contiguous(src, "src");
    const int64_t channels = src.ndim() == 3 ? src.shape(2) : 1;
    if (channels < 1 || channels > 4) throw py::value_error("src must have 1..4 channels, got shape " + shape_str(src));
    const int64_t in_h = src.shape(0), in_w = src.shape(1);
    if (in_h < 1 || in_w < 1) throw py::value_error("src must be at least 1x1, got shape " + shape_str(src));
    if (out_h < 1 || out_w < 1)
        throw py::value_error("out_size must be positive, got (" + std::to_string(out_h) + ", " + std::to_string(out_w) + ")");
    if (h < 1 || w < 1 || y0 < 0 || x0 < 0 || y0 + h > out_h || x0 + w > out_w)
        throw py::value_error("crop (" + std::to_string(y0) + ", " + std::to_string(x0) + ", " + std::to_string(h) + ", " +
                              std::to_string(w) + ") must be a non-empty window inside the resized frame (" +
                              std::to_string(out_h) + ", " + std::to_string(out_w) + ")");
    if (out_h > (int64_t{1} << 24) || out_w > (int64_t{1} << 24))
        throw py::value_error("out_size must be below 2**24 per side");
    bool nearest;
    if (interp == "bilinear") nearest = false;
    else if (interp == "nearest") nearest = true;
    else throw py::value_error("interp must be 'bilinear' or 'nearest', got '" + interp + "'");
    require_threads(num_threads);

    std::vector<py::ssize_t> shape = {h, w};
    if (src.ndim() == 3) shape.push_back(channels);
    py::array out = uint8_output(out_obj, shape, src, "src", /*in_place_ok=*/false);
    const uint8_t* s = static_cast<const uint8_t*>(src.data());
    uint8_t* o = static_cast<uint8_t*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        switch (channels) {
            case 1: run<1>(s, in_h, in_w, out_h, out_w, y0, x0, h, w, flip, nearest, o, num_threads); break;
            case 2: run<2>(s, in_h, in_w, out_h, out_w, y0, x0, h, w, flip, nearest, o, num_threads); break;
            case 3: run<3>(s, in_h, in_w, out_h, out_w, y0, x0, h, w, flip, nearest, o, num_threads); break;
            default: run<4>(s, in_h, in_w, out_h, out_w, y0, x0, h, w, flip, nearest, o, num_threads); break;
        }
    }
    return out;
}

}  // namespace kernels
