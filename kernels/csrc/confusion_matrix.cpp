// confusion_matrix: int64 [K,K] counts, rows = ground truth, columns = prediction, pixels whose
// label equals ignore_index skipped; any other label or prediction outside [0, K) is an error.
//
// Each chunk of the flat arrays is counted into a private matrix (no atomics); the matrices are
// summed afterwards, so the result is the same exact integer count for any thread count. The
// first offending element (lowest flat index over all chunks) is reported, also independent of
// the thread count.
#include <limits>

#include "common.h"
#include "kernels.h"

namespace kernels {
namespace {

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();
constexpr int64_t kMaxClasses = 65536;
// Private matrices beyond this many bytes in total are not worth it: use fewer chunks.
constexpr int64_t kPrivateBudgetBytes = int64_t{64} << 20;

template <typename P, typename L>
int64_t count(const P* pred, const L* label, int64_t begin, int64_t end, int64_t k, int64_t ignore, int64_t* m) {
    for (int64_t i = begin; i < end; ++i) {
        const int64_t g = static_cast<int64_t>(label[i]);
        if (g == ignore) continue;
        const int64_t p = static_cast<int64_t>(pred[i]);
        if (g < 0 || g >= k || p < 0 || p >= k) return i;
        ++m[g * k + p];
    }
    return kNoError;
}

template <typename P, typename L>
int64_t run(const void* pred, const void* label, int64_t n, int64_t k, int64_t ignore, int num_threads, int64_t* result) {
    const P* p = static_cast<const P*>(pred);
    const L* g = static_cast<const L*>(label);
    // One private matrix per chunk (a few chunks per thread), within a memory budget.
    const int64_t bytes = k * k * static_cast<int64_t>(sizeof(int64_t));
    const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(4 * int64_t{num_threads}, n / (int64_t{1} << 16)), 1,
                                               std::max<int64_t>(1, kPrivateBudgetBytes / bytes));
    std::vector<std::vector<int64_t>> local(chunks);
    std::vector<int64_t> first_bad(chunks, kNoError);
    parallel_for(chunks, num_threads, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
            local[c].assign(static_cast<size_t>(k * k), 0);
            first_bad[c] = count<P, L>(p, g, n * c / chunks, n * (c + 1) / chunks, k, ignore, local[c].data());
        }
    });
    int64_t bad = kNoError;
    for (int64_t c = 0; c < chunks; ++c) {
        bad = std::min(bad, first_bad[c]);
        for (int64_t i = 0; i < k * k; ++i) result[i] += local[c][i];
    }
    return bad;
}

template <typename P>
int64_t dispatch_label(const py::array& label, const void* pred, int64_t n, int64_t k, int64_t ignore, int threads,
                       int64_t* out) {
    if (has_dtype<uint8_t>(label)) return run<P, uint8_t>(pred, label.data(), n, k, ignore, threads, out);
    if (has_dtype<int32_t>(label)) return run<P, int32_t>(pred, label.data(), n, k, ignore, threads, out);
    return run<P, int64_t>(pred, label.data(), n, k, ignore, threads, out);
}

int64_t value_at(const py::array& a, int64_t i) {
    if (has_dtype<uint8_t>(a)) return static_cast<const uint8_t*>(a.data())[i];
    if (has_dtype<int32_t>(a)) return static_cast<const int32_t*>(a.data())[i];
    return static_cast<const int64_t*>(a.data())[i];
}

void require_label_dtype(const py::array& a, const char* name) {
    if (!has_dtype<uint8_t>(a) && !has_dtype<int32_t>(a) && !has_dtype<int64_t>(a))
        throw py::type_error(std::string(name) + " must have dtype uint8/int32/int64, got " + dtype_str(a));
}

}  // namespace

py::array confusion_matrix(const py::object& pred_obj, const py::object& label_obj, int64_t num_classes,
                           int64_t ignore_index, int num_threads) {
    py::array pred = as_array(pred_obj, "pred");
    py::array label = as_array(label_obj, "label");
    require_label_dtype(pred, "pred");
    require_label_dtype(label, "label");
    require_contiguous(pred, "pred");
    require_contiguous(label, "label");
    bool same = pred.ndim() == label.ndim();
    for (py::ssize_t d = 0; same && d < pred.ndim(); ++d) same = pred.shape(d) == label.shape(d);
    if (!same)
        throw py::value_error("pred and label must have the same shape, got " + shape_str(pred) + " and " + shape_str(label));
    if (num_classes < 1 || num_classes > kMaxClasses)
        throw py::value_error("num_classes must be in [1, 65536], got " + std::to_string(num_classes));
    require_threads(num_threads);

    const int64_t k = num_classes, n = pred.size();
    py::array_t<int64_t> result({k, k});
    int64_t* out = result.mutable_data();
    std::fill(out, out + k * k, int64_t{0});
    int64_t bad;
    {
        py::gil_scoped_release release;
        const void* p = pred.data();
        if (has_dtype<uint8_t>(pred)) bad = dispatch_label<uint8_t>(label, p, n, k, ignore_index, num_threads, out);
        else if (has_dtype<int32_t>(pred)) bad = dispatch_label<int32_t>(label, p, n, k, ignore_index, num_threads, out);
        else bad = dispatch_label<int64_t>(label, p, n, k, ignore_index, num_threads, out);
    }
    if (bad != kNoError) {
        const int64_t g = value_at(label, bad), pv = value_at(pred, bad);
        const std::string range = "outside [0, " + std::to_string(k) + ")";
        if (g < 0 || g >= k)
            throw py::value_error("label has value " + std::to_string(g) + " at flat index " + std::to_string(bad) + ", " +
                                  range + " and not ignore_index=" + std::to_string(ignore_index));
        throw py::value_error("pred has value " + std::to_string(pv) + " at flat index " + std::to_string(bad) +
                              " (label " + std::to_string(g) + "), " + range);
    }
    return result;
}

}  // namespace kernels
