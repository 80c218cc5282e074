// Entry points of the kernels._C module; one .cpp per op defines each, module.cpp binds them.
// Python-facing argument names match kernels/ops.py, and so do the names in error messages.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

namespace kernels {
namespace py = pybind11;

py::array resize_crop(const py::object& src, int64_t out_h, int64_t out_w, int64_t y0, int64_t x0, int64_t h,
                      int64_t w, bool flip, const std::string& interp, const py::object& out, int num_threads);

py::array label_histogram(const py::object& label, int64_t y0, int64_t x0, int64_t h, int64_t w, bool whole,
                          int64_t ignore_index);

py::array photometric(const py::object& img, std::optional<double> brightness_delta,
                      std::optional<double> contrast_alpha, std::optional<double> saturation_alpha,
                      std::optional<int64_t> hue_delta, bool contrast_first, const py::object& out,
                      int num_threads);

void normalize(const py::object& img, const std::vector<double>& mean, const std::vector<double>& std,
               bool to_rgb, bool bfloat16, const py::object& out, int num_threads);

py::array label_lookup(const py::object& label, const py::object& table, const py::object& out, int num_threads);

py::array confusion_matrix(const py::object& pred, const py::object& label, int64_t num_classes,
                           int64_t ignore_index, int num_threads);

py::object fill_polygons(const py::object& canvas, const py::list& polygons, const py::list& values,
                         int num_threads);

// bn_act.cpp: BatchNorm + activation on channels-last float32 [M, C] (core/norm.py).
py::tuple bn_act_stats(const py::object& x, int num_threads);

py::array bn_act_forward(const py::object& x, const py::object& mean, const py::object& invstd,
                         const py::object& weight, const py::object& bias, double slope, const py::object& residual,
                         const py::object& out, int num_threads);

py::tuple bn_act_backward_reduce(const py::object& src, const py::object& dy, const py::object& mean,
                                 const py::object& invstd, const py::object& weight, const py::object& bias,
                                 double slope, bool src_is_output, const py::object& residual,
                                 const py::object& dresidual, int num_threads);

py::array bn_act_backward(const py::object& src, const py::object& dy, const py::object& mean,
                          const py::object& invstd, const py::object& weight, const py::object& bias,
                          const py::object& mean_g, const py::object& mean_g_xhat, double slope, bool src_is_output,
                          const py::object& residual, const py::object& out, int num_threads);

std::string bn_act_force_baseline(bool force);

// winograd.cpp: the data transforms of core/winograd.py's F(4x4, 3x3) conv on NHWC float32.
py::array winograd_input(const py::object& x, int64_t dilation, int64_t row0, int64_t rows, const py::object& out,
                         int num_threads);

py::array winograd_output_grad(const py::object& dy, int64_t dilation, int64_t row0, int64_t rows,
                               const py::object& out, int num_threads);

py::array winograd_output(const py::object& m, const py::object& bias, int64_t dilation, int64_t row0, int64_t rows,
                          const py::object& out, int num_threads);

// winograd_bf16.cpp: the data transforms of core/winograd_bf16.py's F(2x2, 3x3) conv on NHWC bfloat16.
py::array winograd2_input(const py::object& x, int64_t dilation, int64_t row0, int64_t rows, const py::object& out,
                          int num_threads);

py::array winograd2_output(const py::object& m, const py::object& bias, int64_t dilation, int64_t row0, int64_t rows,
                           const py::object& out, int num_threads);

}  // namespace kernels
