// Helpers shared by the kernels: work splitting and PyTorch-exact scalar primitives.
#pragma once

#include <algorithm>

#include "kernels.h"

namespace salm {

// Elementwise work is split into blocks of planes (not whole images), so two threads
// stay busy even for N = 1; a block is large enough to amortize the loop overhead and
// small enough (a few L1/L2 pages) to balance the static schedule.
constexpr index_t kBlock = 8192;
// Below this many elements a parallel region costs more than it saves.
constexpr index_t kMinParallel = 1 << 15;

// Calls f(plane, begin, end) for every block [begin, end) of every plane of hw elements,
// planes * hw elements in all, spread over nthreads with a static schedule.
template <class F>
inline void for_each_block(index_t planes, index_t hw, int nthreads, F&& f) {
    const index_t per_plane = (hw + kBlock - 1) / kBlock;
    const index_t total = planes * per_plane;
    const bool parallel = nthreads > 1 && planes * hw >= kMinParallel && total > 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (parallel)
    for (index_t t = 0; t < total; ++t) {
        const index_t plane = t / per_plane;
        const index_t begin = (t % per_plane) * kBlock;
        f(plane, begin, std::min(begin + kBlock, hw));
    }
}

// torch.clamp(v, lo, hi) with a bound that is never NaN (the eps bounds): v itself when it
// equals a bound, and a NaN v stays NaN (the comparisons are false).
template <class T>
inline T clamp_finite(T v, T lo, T hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

// torch.clamp(v, lo, hi) with tensor bounds that may be NaN (lo = -x, hi = 1 - x): NaN
// in any of the three gives NaN, as in PyTorch.
template <class T>
inline T clamp_nan(T v, T lo, T hi) {
    v = (v < lo || lo != lo) ? lo : v;
    return (v > hi || hi != hi) ? hi : v;
}

// torch.sign: +1, -1, or 0 for zeros and NaN, computed as PyTorch does ((0 < g) - (g < 0)).
template <class T>
inline T sign_of(T g) {
    return static_cast<T>(T(0) < g) - static_cast<T>(g < T(0));
}

}  // namespace salm
