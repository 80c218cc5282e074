// Shared helpers for the kernels: argument validation that raises Python exceptions naming the
// argument, and a fork-join parallel loop over std::threads.
//
// Validation always runs with the GIL held, before any py::gil_scoped_release, so every error
// reaches Python as ValueError/TypeError instead of aborting a worker thread.
#pragma once

// Bit-exact float arithmetic: a*b + c must never become one fused multiply-add (clang fuses
// within an expression by default on CPUs with FMA; GCC does not in ISO C++ mode).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kernels {
namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        s += std::to_string(a.shape(i));
        if (a.ndim() == 1 || i + 1 < a.ndim()) s += (a.ndim() == 1 ? "," : ", ");
    }
    return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <typename T>
inline bool has_dtype(const py::array& a) {
    // isinstance<array_t<T>> compares dtypes with PyArray_EquivTypes (so int64 matches 'l' and 'q').
    return py::isinstance<py::array_t<T>>(a);
}

// `obj` as a numpy array, else TypeError naming the argument.
inline py::array as_array(const py::object& obj, const char* name) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " +
                             py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
    }
    return py::reinterpret_borrow<py::array>(obj);
}

inline void require_uint8(const py::array& a, const char* name) {
    if (!has_dtype<uint8_t>(a)) throw py::type_error(std::string(name) + " must have dtype uint8, got " + dtype_str(a));
}

inline void require_contiguous(const py::array& a, const char* name) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
}

inline void require_writeable(const py::array& a, const char* name) {
    if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
}

inline void require_ndim(const py::array& a, const char* name, int lo, int hi) {
    if (a.ndim() < lo || a.ndim() > hi) {
        std::string dims = lo == hi ? std::to_string(lo) : std::to_string(lo) + " or " + std::to_string(hi);
        if (hi - lo > 1) dims = std::to_string(lo) + ".." + std::to_string(hi);
        throw py::value_error(std::string(name) + " must have " + dims + " dimensions, got shape " + shape_str(a));
    }
}

// An output array given by the caller: uint8-or-other dtype checked by the caller, here the
// shape, contiguity and writeability.
inline void require_shape(const py::array& a, const char* name, const std::vector<py::ssize_t>& shape) {
    bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
    if (!same) {
        std::string want = "(";
        for (size_t i = 0; i < shape.size(); ++i) want += std::to_string(shape[i]) + (i + 1 < shape.size() ? ", " : "");
        if (shape.size() == 1) want += ",";
        throw py::value_error(std::string(name) + " must have shape " + want + "), got " + shape_str(a));
    }
}

inline bool overlaps(const py::array& a, const py::array& b) {
    auto a0 = reinterpret_cast<uintptr_t>(a.data()), b0 = reinterpret_cast<uintptr_t>(b.data());
    auto a1 = a0 + static_cast<uintptr_t>(a.nbytes()), b1 = b0 + static_cast<uintptr_t>(b.nbytes());
    return a0 < b1 && b0 < a1;
}

// The uint8 result array: a new one of `shape`, or the caller's `out` after checking its dtype,
// layout, shape and aliasing with the input `src`. With in_place_ok, out may be src itself (the
// op reads every element before writing it); any other overlap is an error.
inline py::array uint8_output(const py::object& out_obj, const std::vector<py::ssize_t>& shape,
                              const py::array& src, const char* src_name, bool in_place_ok) {
    if (out_obj.is_none()) return py::array_t<uint8_t>(shape);
    py::array out = as_array(out_obj, "out");
    require_uint8(out, "out");
    require_contiguous(out, "out");
    require_writeable(out, "out");
    require_shape(out, "out", shape);
    if (overlaps(out, src)) {
        if (!in_place_ok) throw py::value_error(std::string("out must not overlap ") + src_name);
        if (out.data() != src.data())
            throw py::value_error(std::string("out must be ") + src_name + " itself or not overlap it");
    }
    return out;
}

inline void require_threads(int num_threads) {
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
}

// Run fn(begin, end) over [0, n) split into contiguous chunks of at least min_chunk items, on
// the calling thread plus up to num_threads - 1 helper threads. Chunks are claimed from a shared
// counter, a few per thread, and the caller never waits for a helper that has not started: on a
// loaded machine the OS may start a new thread milliseconds late, and the caller then simply
// does that share of the work itself. Every item is computed by the same code whichever thread
// takes its chunk, and chunk boundaries depend only on n and num_threads, so results never
// depend on scheduling. fn must not throw.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, Fn&& fn) {
    if (n <= 0) return;
    const int64_t by_work = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
    const int64_t threads = std::min<int64_t>(std::max(1, num_threads), by_work);
    if (threads <= 1) {
        fn(int64_t{0}, n);
        return;
    }
    const int64_t chunks = std::min<int64_t>(by_work, threads * 4);
    struct Shared {
        std::atomic<int64_t> next{0}, done{0};
        std::mutex mutex;
        std::condition_variable finished;
    };
    auto shared = std::make_shared<Shared>();
    // Helpers hold `shared` alive; they touch fn (on the caller's stack) only after claiming a
    // chunk, and the caller does not return before every claimed chunk is done.
    auto work = [shared, n, chunks, f = &fn]() {
        for (;;) {
            const int64_t c = shared->next.fetch_add(1);
            if (c >= chunks) return;
            (*f)(n * c / chunks, n * (c + 1) / chunks);
            if (shared->done.fetch_add(1) + 1 == chunks) {
                std::lock_guard<std::mutex> lock(shared->mutex);
                shared->finished.notify_all();
            }
        }
    };
    for (int64_t t = 1; t < threads; ++t) std::thread(work).detach();
    work();
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->finished.wait(lock, [&] { return shared->done.load() == chunks; });
}

}  // namespace kernels
