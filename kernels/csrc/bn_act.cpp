// bn_act: BatchNorm (batch statistics) + leaky-ReLU/identity/ReLU on channels-last float32
// data [M, C] (M = N*H*W pixels, C channels), the CPU kernels of core/norm.py's memory-saving
// norm (In-Place ABN, Rota Bulo et al., CVPR 2018). Four entry points, so that SyncBN can
// all-reduce between them: statistics; normalise + affine (+ residual) + activation; the two
// per-channel backward sums; the input gradient.
//
// The backward reads either the layer's OUTPUT y (src_is_output=True) or its input x. From y it
// inverts the activation (leaky ReLU with slope > 0 is invertible; ReLU is not) and the affine
// transform to get x_hat = (act^-1(y) - residual - beta) / gamma, so autograd need not keep x:
// y is kept anyway by the next conv. From x it is the ordinary fused BN + activation backward.
//
// Reductions are deterministic for every thread count: the rows are cut into chunks whose size
// depends only on (M, C), each chunk's double-precision partial sums are computed by whichever
// thread claims it, and the partials are then added in chunk order by one thread.
#include <cmath>
#include <cstring>

#include "common.h"
#include "kernels.h"
// Last: its #pragma must not reach the pybind11 headers.
#include "bn_act_loops.h"

namespace kernels {
namespace {

using bn_act::Pass;
using bn_act::Passes;
using bn_act::passes;

// A reduction chunk holds at least this many elements (a per-chunk [2, C] double partial is
// allocated and combined, so tiny chunks would cost more than they save) ...
constexpr int64_t kChunkElems = int64_t{1} << 14;
// ... and there are at most this many chunks, enough to balance a few threads.
constexpr int64_t kMaxChunks = 64;
// Elementwise passes: no point waking a thread for fewer elements than this.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

int64_t chunk_rows(int64_t rows, int64_t channels) {
    const int64_t by_size = std::max<int64_t>(1, kChunkElems / channels);
    const int64_t by_count = (rows + kMaxChunks - 1) / kMaxChunks;
    return std::max(by_size, by_count);
}

// Per-channel constants of one call, in the float arithmetic the kernels use.
struct Channel {
    std::vector<float> a, b;             // forward: y = act(x * a + b + r), a = invstd*gamma, b = beta - mean*a
    std::vector<float> beta, inv_gamma;  // recovery from the output
};

// ---- validation ------------------------------------------------------------------------------

py::array float_array(const py::object& obj, const char* name) {
    py::array a = as_array(obj, name);
    if (!has_dtype<float>(a)) throw py::type_error(std::string(name) + " must have dtype float32, got " + dtype_str(a));
    require_contiguous(a, name);
    return a;
}

// x-like argument [M, C]; the first one fixes M and C.
py::array rows_array(const py::object& obj, const char* name, int64_t* m, int64_t* c) {
    py::array a = float_array(obj, name);
    if (*c < 0) {
        require_ndim(a, name, 2, 2);
        if (a.shape(0) < 1 || a.shape(1) < 1)
            throw py::value_error(std::string(name) + " must be [M, C] with M, C >= 1, got shape " + shape_str(a));
        *m = a.shape(0);
        *c = a.shape(1);
    } else {
        require_shape(a, name, {*m, *c});
    }
    return a;
}

const float* channel_array(const py::object& obj, const char* name, int64_t c) {
    py::array a = float_array(obj, name);
    require_shape(a, name, {c});
    return static_cast<const float*>(a.data());
}

const float* optional_rows(const py::object& obj, const char* name, int64_t m, int64_t c) {
    if (obj.is_none()) return nullptr;
    return static_cast<const float*>(rows_array(obj, name, &m, &c).data());
}

// A caller-given float32 [M, C] output (writeable, overlapping none of `inputs`, except that
// it may be the input named `alias_ok` itself), or a new array.
struct Input {
    py::object obj;
    const char* name;
};

py::array rows_output(const py::object& out_obj, const char* name, int64_t m, int64_t c,
                      const std::vector<Input>& inputs, const char* alias_ok = nullptr) {
    if (out_obj.is_none()) return py::array_t<float>({m, c});
    py::array out = rows_array(out_obj, name, &m, &c);
    require_writeable(out, name);
    for (const Input& in : inputs) {
        if (in.obj.is_none()) continue;
        const py::array a = py::reinterpret_borrow<py::array>(in.obj);
        if (!overlaps(out, a)) continue;
        const bool same = a.data() == out.data() && a.nbytes() == out.nbytes();
        if (alias_ok && std::strcmp(alias_ok, in.name) == 0) {
            if (same) continue;
            throw py::value_error(std::string(name) + " must be " + in.name + " itself or not overlap it");
        }
        throw py::value_error(std::string(name) + " must not overlap " + in.name);
    }
    return out;
}

float check_slope(double slope, bool from_output) {
    if (!std::isfinite(slope) || slope < 0.0)
        throw py::value_error("slope must be a finite number >= 0, got " + std::to_string(slope));
    if (from_output && slope == 0.0)
        throw py::value_error("slope must be > 0 when src_is_output=True (ReLU, slope 0, is not invertible)");
    return static_cast<float>(slope);
}

Channel make_channel(const float* mean, const float* invstd, const float* weight, const float* bias, int64_t c) {
    Channel ch;
    ch.a.resize(c);
    ch.b.resize(c);
    ch.beta.assign(bias, bias + c);
    ch.inv_gamma.resize(c);
    for (int64_t j = 0; j < c; ++j) {
        ch.a[j] = invstd[j] * weight[j];
        ch.b[j] = bias[j] - mean[j] * ch.a[j];
        // gamma == 0 (or subnormal) cannot be inverted: x_hat is then taken as 0 there, which
        // leaves dx exact (it is scaled by gamma) and makes that channel's d(gamma) 0.
        ch.inv_gamma[j] = std::fabs(weight[j]) >= 1.17549435e-38f ? 1.0f / weight[j] : 0.0f;
    }
    return ch;
}

// Fixed-chunk reduction driver: fn(r0, r1, partial) accumulates chunk rows into partial[2C]
// (zeroed); the result is the chunk-ordered sum, [2, C].
template <typename Fn>
std::vector<double> chunked_sums(int64_t m, int64_t c, int num_threads, Fn&& fn) {
    const int64_t rows = chunk_rows(m, c), chunks = (m + rows - 1) / rows;
    std::vector<double> partial(static_cast<size_t>(chunks * 2 * c), 0.0);
    parallel_for(chunks, num_threads, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) fn(k * rows, std::min(m, (k + 1) * rows), partial.data() + k * 2 * c);
    });
    std::vector<double> total(static_cast<size_t>(2 * c), 0.0);
    for (int64_t k = 0; k < chunks; ++k)
        for (int64_t j = 0; j < 2 * c; ++j) total[j] += partial[k * 2 * c + j];
    return total;
}

int64_t min_rows(int64_t c) { return std::max<int64_t>(1, kMinParallelElems / c); }

py::array_t<double> to_array(const double* v, int64_t c) {
    py::array_t<double> a(c);
    std::memcpy(a.mutable_data(), v, sizeof(double) * static_cast<size_t>(c));
    return a;
}

}  // namespace

py::tuple bn_act_stats(const py::object& x_obj, int num_threads) {
    int64_t m = -1, c = -1;
    py::array x = rows_array(x_obj, "x", &m, &c);
    require_threads(num_threads);
    Pass p;
    p.src = static_cast<const float*>(x.data());
    p.c = c;
    std::vector<double> shift(p.src, p.src + c), mean(c), var(c);
    {
        py::gil_scoped_release release;
        const Passes& run = passes();
        const std::vector<double> s = chunked_sums(m, c, num_threads, [&](int64_t r0, int64_t r1, double* part) {
            run.stats(p, r0, r1, shift.data(), part, part + c);
        });
        for (int64_t j = 0; j < c; ++j) {
            const double d = s[j] / static_cast<double>(m);
            mean[j] = shift[j] + d;
            var[j] = std::max(0.0, s[c + j] / static_cast<double>(m) - d * d);
        }
    }
    return py::make_tuple(to_array(mean.data(), c), to_array(var.data(), c));
}

py::array bn_act_forward(const py::object& x_obj, const py::object& mean_obj, const py::object& invstd_obj,
                         const py::object& weight_obj, const py::object& bias_obj, double slope,
                         const py::object& residual_obj, const py::object& out_obj, int num_threads) {
    int64_t m = -1, c = -1;
    py::array x = rows_array(x_obj, "x", &m, &c);
    const float* mean = channel_array(mean_obj, "mean", c);
    const float* invstd = channel_array(invstd_obj, "invstd", c);
    const float* weight = channel_array(weight_obj, "weight", c);
    const float* bias = channel_array(bias_obj, "bias", c);
    Pass p;
    p.slope = check_slope(slope, false);
    p.res = optional_rows(residual_obj, "residual", m, c);
    require_threads(num_threads);
    // out may be x itself (in place); it must not overlap the residual.
    py::array out = rows_output(out_obj, "out", m, c, {{x_obj, "x"}, {residual_obj, "residual"}}, "x");
    const Channel ch = make_channel(mean, invstd, weight, bias, c);
    p.src = static_cast<const float*>(x.data());
    p.out = static_cast<float*>(out.mutable_data());
    p.c = c;
    p.a = ch.a.data();
    p.b = ch.b.data();
    {
        py::gil_scoped_release release;
        const Passes& run = passes();
        parallel_for(m, num_threads, min_rows(c), [&](int64_t r0, int64_t r1) { run.forward(p, r0, r1); });
    }
    return out;
}

namespace {

// The arguments both backward entry points share, validated in one place. `ch` owns the
// per-channel arrays `p` points into, so a Backward is neither copied nor moved.
struct Backward {
    Pass p;
    Channel ch;
    int64_t m = 0;
    const float* weight = nullptr;

    Backward(const py::object& src_obj, const py::object& dy_obj, const py::object& mean_obj,
             const py::object& invstd_obj, const py::object& weight_obj, const py::object& bias_obj, double slope,
             bool src_is_output, const py::object& residual_obj, int num_threads) {
        int64_t c = -1;
        p.src = static_cast<const float*>(rows_array(src_obj, "src", &m, &c).data());
        p.dy = static_cast<const float*>(rows_array(dy_obj, "dy", &m, &c).data());
        p.mean = channel_array(mean_obj, "mean", c);
        p.invstd = channel_array(invstd_obj, "invstd", c);
        weight = channel_array(weight_obj, "weight", c);
        const float* bias = channel_array(bias_obj, "bias", c);
        p.slope = check_slope(slope, src_is_output);
        p.inv_slope = src_is_output ? 1.0f / p.slope : 0.f;
        p.from_output = src_is_output;
        p.res = optional_rows(residual_obj, "residual", m, c);
        p.c = c;
        require_threads(num_threads);
        ch = make_channel(p.mean, p.invstd, weight, bias, c);
        p.a = ch.a.data();
        p.b = ch.b.data();
        p.beta = ch.beta.data();
        p.inv_gamma = ch.inv_gamma.data();
    }
    Backward(const Backward&) = delete;
    Backward& operator=(const Backward&) = delete;
};

}  // namespace

py::tuple bn_act_backward_reduce(const py::object& src_obj, const py::object& dy_obj, const py::object& mean_obj,
                                 const py::object& invstd_obj, const py::object& weight_obj,
                                 const py::object& bias_obj, double slope, bool src_is_output,
                                 const py::object& residual_obj, const py::object& dresidual_obj, int num_threads) {
    Backward b(src_obj, dy_obj, mean_obj, invstd_obj, weight_obj, bias_obj, slope, src_is_output, residual_obj,
               num_threads);
    const int64_t c = b.p.c;
    if (!dresidual_obj.is_none()) {
        py::array d = rows_output(dresidual_obj, "dresidual", b.m, c,
                                  {{src_obj, "src"}, {dy_obj, "dy"}, {residual_obj, "residual"}});
        b.p.out = static_cast<float*>(d.mutable_data());
    }
    std::vector<double> s;
    {
        py::gil_scoped_release release;
        const Passes& run = passes();
        s = chunked_sums(b.m, c, num_threads, [&](int64_t r0, int64_t r1, double* part) {
            run.reduce(b.p, r0, r1, part, part + c);
        });
    }
    return py::make_tuple(to_array(s.data(), c), to_array(s.data() + c, c));
}

py::array bn_act_backward(const py::object& src_obj, const py::object& dy_obj, const py::object& mean_obj,
                          const py::object& invstd_obj, const py::object& weight_obj, const py::object& bias_obj,
                          const py::object& mean_g_obj, const py::object& mean_g_xhat_obj, double slope,
                          bool src_is_output, const py::object& residual_obj, const py::object& out_obj,
                          int num_threads) {
    Backward b(src_obj, dy_obj, mean_obj, invstd_obj, weight_obj, bias_obj, slope, src_is_output, residual_obj,
               num_threads);
    const int64_t m = b.m, c = b.p.c;
    b.p.mean_g = channel_array(mean_g_obj, "mean_g", c);
    b.p.mean_gx = channel_array(mean_g_xhat_obj, "mean_g_xhat", c);
    py::array out = rows_output(out_obj, "out", m, c, {{src_obj, "src"}, {dy_obj, "dy"}, {residual_obj, "residual"}});
    std::vector<float> scale(c);
    for (int64_t j = 0; j < c; ++j) scale[j] = b.weight[j] * b.p.invstd[j];
    b.p.scale = scale.data();
    b.p.out = static_cast<float*>(out.mutable_data());
    {
        py::gil_scoped_release release;
        const Passes& run = passes();
        parallel_for(m, num_threads, min_rows(c), [&](int64_t r0, int64_t r1) { run.dx(b.p, r0, r1); });
    }
    return out;
}

std::string bn_act_force_baseline(bool force) {
    bn_act::force_baseline.store(force);
#ifdef BN_ACT_AVX2
    if (!force && __builtin_cpu_supports("avx2")) return "avx2";
#endif
    return "baseline";
}

}  // namespace kernels
