// The kernels._C extension module: one binding per op. kernels/ops.py is the typed public API on
// top of these low-level entry points (it resolves defaults such as num_threads=None and turns
// tuples and torch tensors into the plain arguments below).
#include <pybind11/stl.h>

#include "hsv.h"
#include "kernels.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
    m.doc() = "C++ data-path and evaluation kernels (use kernels.ops, the typed wrappers).";

    m.def("resize_crop", &kernels::resize_crop, "src"_a, "out_h"_a, "out_w"_a, "y0"_a, "x0"_a, "h"_a, "w"_a,
          "flip"_a = false, "interp"_a = "bilinear", "out"_a = py::none(), "num_threads"_a = 1,
          "The window (y0, x0, h, w) of cv2.resize(src, (out_w, out_h)) for uint8 src [H,W] or [H,W,C]\n"
          "(C in 1..4), mirrored horizontally if flip. interp 'bilinear' = OpenCV INTER_LINEAR\n"
          "(bit-exact), 'nearest' = INTER_NEAREST. Only the window is computed. out: optional uint8\n"
          "array [h,w(,C)] not overlapping src. Returns out. Parallel over output rows.");

    m.def("label_histogram", &kernels::label_histogram, "label"_a, "y0"_a, "x0"_a, "h"_a, "w"_a, "whole"_a,
          "ignore_index"_a = 255,
          "int64 [256] counts of the values of uint8 label [H,W] inside the window (y0, x0, h, w), or\n"
          "the whole array if whole=True; the ignore_index bin (if in 0..255) is set to 0.");

    m.def("photometric", &kernels::photometric, "img"_a, "brightness_delta"_a = py::none(),
          "contrast_alpha"_a = py::none(), "saturation_alpha"_a = py::none(), "hue_delta"_a = py::none(),
          "contrast_first"_a = true, "out"_a = py::none(), "num_threads"_a = 1,
          "mmseg PhotoMetricDistortion on uint8 BGR img [H,W,3] with given draws (None = step skipped):\n"
          "brightness, contrast (if contrast_first), saturation, hue, contrast (if not contrast_first).\n"
          "Bit-exact with mmseg's numpy + cv2.cvtColor arithmetic. out: optional uint8 [H,W,3], may be\n"
          "img itself. Returns out. Parallel over pixels.");

    m.def("normalize", &kernels::normalize, "img"_a, "mean"_a, "std"_a, "to_rgb"_a, "bfloat16"_a, "out"_a,
          "num_threads"_a = 1,
          "out[n,c,y,x] = (img[n,y,x,c'] - mean[c]) / std[c] in float32 (c' = 2-c if to_rgb else c) for\n"
          "uint8 img [N,H,W,3]; out is float32 [N,3,H,W], or int16/uint16 [N,3,H,W] receiving bfloat16\n"
          "bits (round to nearest even, as torch) if bfloat16. out is either C-contiguous (NCHW planes)\n"
          "or has NHWC strides (a torch channels_last tensor's numpy view), and is written in that\n"
          "memory order. Must not overlap img. Parallel over image rows (NCHW) or pixels (NHWC).");

    m.def("label_lookup", &kernels::label_lookup, "label"_a, "table"_a, "out"_a = py::none(), "num_threads"_a = 1,
          "out[i] = table[label[i]] for a C-contiguous uint8 label of any shape and a uint8 table of\n"
          "shape (256,). out (optional) is a uint8 array of label's shape, or label itself.\n"
          "Returns out. Parallel over the flat array.");

    m.def("confusion_matrix", &kernels::confusion_matrix, "pred"_a, "label"_a, "num_classes"_a,
          "ignore_index"_a = 255, "num_threads"_a = 1,
          "int64 [K,K] matrix, rows = label (ground truth), columns = pred, for equal-shaped uint8/int32/\n"
          "int64 arrays; label == ignore_index is skipped; any other label or pred value outside [0, K)\n"
          "raises ValueError naming the first such element. Per-thread private matrices, then summed.");

    m.def("fill_polygons", &kernels::fill_polygons, "canvas"_a, "polygons"_a, "values"_a, "num_threads"_a = 1,
          "Fill each float64 [N,2] (x, y) polygon with its int value (0..255) on uint8 canvas [H,W], in\n"
          "order, in place, pixel-identical to PIL ImageDraw.polygon(xy, fill=value). Returns canvas.\n"
          "Parallel over bands of rows (every band draws all polygons in order).");

    m.def("bn_act_stats", &kernels::bn_act_stats, "x"_a, "num_threads"_a = 1,
          "(mean, var): float64 [C] per-channel mean and biased variance of float32 x [M, C] (channels-last\n"
          "pixels x channels). Sums in double over fixed row chunks, combined in chunk order, so the\n"
          "result does not depend on num_threads.");

    m.def("bn_act_forward", &kernels::bn_act_forward, "x"_a, "mean"_a, "invstd"_a, "weight"_a, "bias"_a,
          "slope"_a = 0.01, "residual"_a = py::none(), "out"_a = py::none(), "num_threads"_a = 1,
          "out = act(x * a + b [+ residual]) with a = invstd * weight, b = bias - mean * a (float32 [C]\n"
          "each) and act(v) = v if v > 0 else slope * v (slope 1: identity, 0: ReLU), for float32\n"
          "x [M, C]. out: optional float32 [M, C], may be x itself (in place). Returns out.");

    m.def("bn_act_backward_reduce", &kernels::bn_act_backward_reduce, "src"_a, "dy"_a, "mean"_a, "invstd"_a,
          "weight"_a, "bias"_a, "slope"_a = 0.01, "src_is_output"_a = true, "residual"_a = py::none(),
          "dresidual"_a = py::none(), "num_threads"_a = 1,
          "(sum_g, sum_g_xhat): float64 [C] sums over rows of g = dy * act'(.) and g * x_hat, the two sums\n"
          "SyncBN all-reduces. src is the forward's output y (src_is_output, needs slope > 0: x_hat is\n"
          "recovered as (act^-1(y) - residual - bias) / weight; weight 0 gives x_hat 0) or its input x\n"
          "(x_hat = (x - mean) * invstd). dresidual: optional float32 [M, C] receiving g, the gradient of\n"
          "the residual. Deterministic for every num_threads (fixed chunks, fixed combine order).");

    m.def("bn_act_backward", &kernels::bn_act_backward, "src"_a, "dy"_a, "mean"_a, "invstd"_a, "weight"_a,
          "bias"_a, "mean_g"_a, "mean_g_xhat"_a, "slope"_a = 0.01, "src_is_output"_a = true,
          "residual"_a = py::none(), "out"_a = py::none(), "num_threads"_a = 1,
          "dx = (g - mean_g - x_hat * mean_g_xhat) * weight * invstd, float32 [M, C], with g and x_hat\n"
          "recomputed as in bn_act_backward_reduce and mean_g, mean_g_xhat (float32 [C]) its sums divided\n"
          "by the (global) row count. out: optional float32 [M, C] overlapping no input. Returns out.");

    m.def("_bn_act_force_baseline", &kernels::bn_act_force_baseline, "force"_a,
          "Testing hook: force (True) or stop forcing (False) the baseline (non-AVX2) bn_act loops;\n"
          "returns the loops now in use, 'avx2' or 'baseline' (identical results either way).");

    m.def("winograd_input", &kernels::winograd_input, "x"_a, "dilation"_a, "row0"_a, "rows"_a,
          "out"_a = py::none(), "num_threads"_a = 1,
          "Winograd F(4x4, 3x3) input transform of float32 NHWC x [N, H, W, C] for a dilation-D 3x3 conv\n"
          "(padding D): v [36, T, C] with v[6a + b, t] = (B^T d B)[a, b] for the 6x6 input tile d of tile t\n"
          "(pixels outside the image read 0). Tiles: tile rows [row0, row0 + rows) of every phase grid,\n"
          "t = (((n * D + p) * D + q) * rows + ta - row0) * TW + tb, TW = ceil(ceil(W / D) / 4).\n"
          "out: optional float32 [36, T, C] not overlapping x. Returns out. Parallel over tiles.");

    m.def("winograd_output", &kernels::winograd_output, "m"_a, "bias"_a, "dilation"_a, "row0"_a, "rows"_a,
          "out"_a, "num_threads"_a = 1,
          "Winograd F(4x4, 3x3) output transform: writes A^T m_t A (+ bias, float32 [O] or None) for every\n"
          "tile t of float32 m [36, T, O] (tiles numbered as in winograd_input) into the pixels of float32\n"
          "NHWC out [N, H, W, O] that lie in the image. Returns out. Parallel over tiles.");

    m.def("winograd_output_grad", &kernels::winograd_output_grad, "dy"_a, "dilation"_a, "row0"_a, "rows"_a,
          "out"_a = py::none(), "num_threads"_a = 1,
          "The adjoint of winograd_output (no bias): g [36, T, O] with g[6a + b, t] = (A dy_t A^T)[a, b] for the\n"
          "4x4 output tile dy_t of float32 NHWC dy [N, H, W, O] (pixels outside the image read 0), tiles\n"
          "numbered as in winograd_input. out: optional float32 [36, T, O] not overlapping dy. Returns out.");

    m.def("winograd2_input", &kernels::winograd2_input, "x"_a, "dilation"_a, "row0"_a, "rows"_a,
          "out"_a = py::none(), "num_threads"_a = 1,
          "Winograd F(2x2, 3x3) input transform of bfloat16 NHWC x [N, H, W, C] (its bits as int16) for a\n"
          "dilation-D 3x3 conv (padding D): v [16, T, C] (bf16 bits as int16) with v[4a + b, t] = (B^T d B)[a, b]\n"
          "for the 4x4 input tile d of tile t, computed in float32 and rounded once (pixels outside the image\n"
          "read 0). Tiles: tile rows [row0, row0 + rows) of every phase grid, t = (((n * D + p) * D + q) * rows\n"
          "+ ta - row0) * TW + tb, TW = ceil(ceil(W / D) / 2). out: optional int16 [16, T, C] not overlapping x.\n"
          "Returns out. Parallel over tiles.");

    m.def("winograd2_output", &kernels::winograd2_output, "m"_a, "bias"_a, "dilation"_a, "row0"_a, "rows"_a,
          "out"_a, "num_threads"_a = 1,
          "Winograd F(2x2, 3x3) output transform: writes A^T m_t A (+ bias, float32 [O] or None), computed in\n"
          "float32 and rounded once to bfloat16, for every tile t of m [16, T, O] (bf16 bits as int16, tiles\n"
          "numbered as in winograd2_input) into the pixels of NHWC out [N, H, W, O] (bf16 bits as int16) that\n"
          "lie in the image. Returns out. Parallel over tiles.");

    m.def("hsv_implementation", &kernels::hsv_implementation,
          "'avx2' or 'scalar': the HSV conversion code photometric uses on this CPU (identical results).");
    m.def("_force_scalar_hsv", &kernels::hsv_force_scalar, "force"_a,
          "Testing hook: force (True) or stop forcing (False) the portable scalar HSV code.");
}
