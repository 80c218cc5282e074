// photometric: mmseg 1.x PhotoMetricDistortion on uint8 BGR in one pass per pixel.
//
// mmseg's steps and the arithmetic they reduce to (facts from mmseg/datasets/transforms/
// transforms.py and OpenCV's modules/imgproc/src/color_hsv.simd.hpp, checked against cv2 5.0):
//  * brightness / contrast: uint8 -> float32, x * alpha + beta in float32, clip to [0, 255],
//    truncate to uint8. They depend on one byte only, so they become 256-entry tables.
//  * saturation / hue: cv2.cvtColor BGR->HSV on uint8, change S (the same convert as above) or
//    H ((H + delta) mod 180), then HSV->BGR on uint8; hsv.h states OpenCV's arithmetic.
// The conversions are not inverse to each other, so saturation then hue keeps the intermediate
// HSV->BGR->HSV round trip exactly as mmseg does. Pixels go through in blocks of int32 planes
// so the HSV steps can use AVX2.
#include <cmath>

#include "common.h"
#include "hsv.h"
#include "kernels.h"
#include "lut.h"

namespace kernels {
namespace {

// mmseg's convert(): float32(x) * alpha + beta, clip, truncate. Only one of the multiply and the
// add is ever non-trivial, so no fused multiply-add can change the float32 result.
void convert_table(uint8_t* table, float alpha, float beta) {
    for (int x = 0; x < 256; ++x) {
        float y = static_cast<float>(x) * alpha;
        y = y + beta;
        y = y < 0.f ? 0.f : (y > 255.f ? 255.f : y);
        table[x] = static_cast<uint8_t>(y);
    }
}

struct Plan {
    uint8_t before[256];  // brightness, then contrast if it comes first
    uint8_t after[256];   // contrast if it comes last
    uint8_t saturation[256];
    bool use_saturation = false, use_hue = false;
    int hue_shift = 0;  // in [0, 180)
};

void apply_block(const Plan& plan, const uint8_t* src, uint8_t* dst, int n, int round_from) {
    HsvPlanes p;
    for (int i = 0; i < n; ++i) {
        p.b[i] = plan.before[src[3 * i]];
        p.g[i] = plan.before[src[3 * i + 1]];
        p.r[i] = plan.before[src[3 * i + 2]];
    }
    if (plan.use_saturation) {
        bgr_to_hsv(p, n);
        for (int i = 0; i < n; ++i) p.s[i] = plan.saturation[p.s[i]];
        hsv_to_bgr(p, n, round_from);
    }
    if (plan.use_hue) {
        bgr_to_hsv(p, n);
        for (int i = 0; i < n; ++i) {
            const int h = p.h[i] + plan.hue_shift;
            p.h[i] = h >= 180 ? h - 180 : h;
        }
        hsv_to_bgr(p, n, round_from);
    }
    for (int i = 0; i < n; ++i) {
        dst[3 * i] = plan.after[p.b[i]];
        dst[3 * i + 1] = plan.after[p.g[i]];
        dst[3 * i + 2] = plan.after[p.r[i]];
    }
}

// Rows [begin, end) of an image `width` pixels wide; blocks never straddle rows because cv2's
// HSV->BGR treats the last width % kCv2HsvBlock pixels of each row differently.
void apply_rows(const Plan& plan, const uint8_t* src, uint8_t* dst, int64_t width, int64_t begin, int64_t end) {
    const int64_t tail_start = width - width % kCv2HsvBlock;
    for (int64_t y = begin; y < end; ++y) {
        for (int64_t x = 0; x < width; x += kHsvBlock) {
            const int n = static_cast<int>(std::min<int64_t>(kHsvBlock, width - x));
            const int round_from = static_cast<int>(std::clamp<int64_t>(tail_start - x, 0, n));
            const int64_t offset = 3 * (y * width + x);
            apply_block(plan, src + offset, dst + offset, n, round_from);
        }
    }
}

float checked_float(std::optional<double> value, const char* name) {
    const float f = static_cast<float>(*value);
    if (!std::isfinite(*value) || !std::isfinite(f))
        throw py::value_error(std::string(name) + " must be finite (as float32), got " + std::to_string(*value));
    return f;
}

}  // namespace

py::array photometric(const py::object& img_obj, std::optional<double> brightness_delta,
                      std::optional<double> contrast_alpha, std::optional<double> saturation_alpha,
                      std::optional<int64_t> hue_delta, bool contrast_first, const py::object& out_obj,
                      int num_threads) {
    py::array img = as_array(img_obj, "img");
    require_uint8(img, "img");
    require_ndim(img, "img", 3, 3);
    require_contiguous(img, "img");
    if (img.shape(2) != 3) throw py::value_error("img must be [H,W,3] BGR, got shape " + shape_str(img));
    require_threads(num_threads);

    Plan plan;
    uint8_t identity[256], tmp[256];
    for (int x = 0; x < 256; ++x) identity[x] = static_cast<uint8_t>(x);
    std::copy_n(identity, 256, plan.before);
    std::copy_n(identity, 256, plan.after);
    if (brightness_delta) convert_table(plan.before, 1.f, checked_float(brightness_delta, "brightness_delta"));
    if (contrast_alpha) {
        convert_table(tmp, checked_float(contrast_alpha, "contrast_alpha"), 0.f);
        if (contrast_first) {
            for (int x = 0; x < 256; ++x) plan.before[x] = tmp[plan.before[x]];
        } else {
            std::copy_n(tmp, 256, plan.after);
        }
    }
    if (saturation_alpha) {
        convert_table(plan.saturation, checked_float(saturation_alpha, "saturation_alpha"), 0.f);
        plan.use_saturation = true;
    }
    if (hue_delta) {
        plan.use_hue = true;
        plan.hue_shift = static_cast<int>(((*hue_delta % 180) + 180) % 180);
    }

    std::vector<py::ssize_t> shape = {img.shape(0), img.shape(1), 3};
    py::array out = uint8_output(out_obj, shape, img, "img", /*in_place_ok=*/true);
    const uint8_t* src = static_cast<const uint8_t*>(img.data());
    uint8_t* dst = static_cast<uint8_t*>(out.mutable_data());
    const int64_t rows = img.shape(0), width = img.shape(1);
    if (!plan.use_saturation && !plan.use_hue) {
        // Brightness and contrast only: every byte goes through one composed table.
        uint8_t table[256];
        for (int x = 0; x < 256; ++x) table[x] = plan.after[plan.before[x]];
        py::gil_scoped_release release;
        parallel_for(rows * width * 3, num_threads, int64_t{1} << 18,
                     [&](int64_t b, int64_t e) { lookup_bytes(src + b, dst + b, e - b, table); });
        return out;
    }
    {
        py::gil_scoped_release release;
        parallel_for(rows, num_threads, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, width)),
                     [&](int64_t b, int64_t e) { apply_rows(plan, src, dst, width, b, e); });
    }
    return out;
}

}  // namespace kernels
