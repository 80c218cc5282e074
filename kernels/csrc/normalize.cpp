// normalize: uint8 [N,H,W,3] -> [N,3,H,W] float32 or bfloat16, (x - mean) / std per channel,
// optionally swapping BGR -> RGB. kernels/ops.py passes torch tensors as numpy views (bfloat16
// as its 16-bit pattern) so no torch headers are needed here.
//
// A uint8 input has 256 possible values per channel, so (x - mean) / std is tabulated once per
// call with exactly torch's float32 operations (a subtraction, then a true division), and the
// bfloat16 table holds torch's round-to-nearest-even conversion of those floats. The loop is then
// a byte-indexed table read per output element, bound by memory bandwidth.
#include <cmath>
#include <cstring>

#include "common.h"
#include "kernels.h"

namespace kernels {
namespace {

uint16_t float_to_bf16_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    // Round to nearest, ties to even, on the 16 dropped bits (the inputs here are never NaN).
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

template <typename T>
void planes(const uint8_t* src, T* dst, const T (*lut)[256], const int* in_channel, int64_t hw, int64_t begin,
            int64_t end, int64_t rows_per_image, int64_t width) {
    // Work items are image rows: item = n * H + y.
    for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / rows_per_image, y = item % rows_per_image;
        const uint8_t* in = src + (n * hw + y * width) * 3;
        T* out = dst + n * 3 * hw + y * width;
        for (int c = 0; c < 3; ++c) {
            const T* table = lut[c];
            const uint8_t* p = in + in_channel[c];
            T* o = out + c * hw;
            for (int64_t x = 0; x < width; ++x) o[x] = table[p[3 * x]];
        }
    }
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
    require_contiguous(out, "out");
    require_writeable(out, "out");
    const int64_t n = img.shape(0), h = img.shape(1), w = img.shape(2);
    require_shape(out, "out", {n, 3, h, w});

    // Output channel c reads input channel 2 - c when swapping BGR -> RGB; mean/std are indexed
    // by output channel (mmseg gives them in RGB order with to_rgb=True).
    int in_channel[3];
    float lut_f[3][256];
    uint16_t lut_b[3][256];
    for (int c = 0; c < 3; ++c) {
        in_channel[c] = to_rgb ? 2 - c : c;
        const float m = static_cast<float>(mean[c]), s = static_cast<float>(std[c]);
        for (int v = 0; v < 256; ++v) {
            float diff = static_cast<float>(v) - m;
            lut_f[c][v] = diff / s;
            lut_b[c][v] = float_to_bf16_bits(lut_f[c][v]);
        }
    }
    const uint8_t* src = static_cast<const uint8_t*>(img.data());
    void* dst = out.mutable_data();
    const int64_t rows = n * h, hw = h * w;
    const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, w));
    py::gil_scoped_release release;
    parallel_for(rows, num_threads, min_rows, [&](int64_t b, int64_t e) {
        if (bfloat16)
            planes<uint16_t>(src, static_cast<uint16_t*>(dst), lut_b, in_channel, hw, b, e, h, w);
        else
            planes<float>(src, static_cast<float*>(dst), lut_f, in_channel, hw, b, e, h, w);
    });
}

}  // namespace kernels
