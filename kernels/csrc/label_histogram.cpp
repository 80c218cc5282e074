// label_histogram: counts of each uint8 label value inside a window (mmseg RandomCrop's
// cat_max_ratio test), with the ignore_index bin zeroed.
#include <array>

#include "common.h"
#include "kernels.h"

namespace kernels {

py::array label_histogram(const py::object& label_obj, int64_t y0, int64_t x0, int64_t h, int64_t w, bool whole,
                          int64_t ignore_index) {
    py::array label = as_array(label_obj, "label");
    require_uint8(label, "label");
    require_ndim(label, "label", 2, 2);
    require_contiguous(label, "label");
    const int64_t rows = label.shape(0), cols = label.shape(1);
    if (whole) y0 = 0, x0 = 0, h = rows, w = cols;
    if (h < 0 || w < 0 || y0 < 0 || x0 < 0 || y0 + h > rows || x0 + w > cols)
        throw py::value_error("window (" + std::to_string(y0) + ", " + std::to_string(x0) + ", " + std::to_string(h) +
                              ", " + std::to_string(w) + ") must lie inside label of shape " + shape_str(label));

    py::array_t<int64_t> hist(256);
    int64_t* out = hist.mutable_data();
    const uint8_t* src = static_cast<const uint8_t*>(label.data());
    {
        py::gil_scoped_release release;
        // Four interleaved sub-histograms: runs of equal labels (the common case) would
        // otherwise serialise on one counter's store-to-load dependency.
        std::array<std::array<int64_t, 256>, 4> sub{};
        for (int64_t y = y0; y < y0 + h; ++y) {
            const uint8_t* p = src + y * cols + x0;
            int64_t x = 0;
            for (; x + 4 <= w; x += 4) {
                ++sub[0][p[x]], ++sub[1][p[x + 1]], ++sub[2][p[x + 2]], ++sub[3][p[x + 3]];
            }
            for (; x < w; ++x) ++sub[0][p[x]];
        }
        for (int v = 0; v < 256; ++v) out[v] = sub[0][v] + sub[1][v] + sub[2][v] + sub[3][v];
        if (ignore_index >= 0 && ignore_index < 256) out[ignore_index] = 0;
    }
    return hist;
}

}  // namespace kernels
