// Value scans behind the ops' input checks: one read of an array, no allocation.
//
// The ops refuse NaN/inf images and perturbations, NaN gradients and masks other than
// {0, 1} before they write anything, so a scan runs before the kernel and costs one extra
// read of each input. Each rule has its own branch-free inner loop: testing all three
// rules on every value made the scan about 3x slower than the cheapest one (SSE2 build).
#include "common.h"

namespace salm {
namespace {

// Lanes of independent accumulators: a float sum must keep its order (no -ffast-math), so
// the compiler vectorizes across these lanes instead of across the loop.
constexpr int kLanes = 8;

// v * 0 is NaN exactly when v is NaN or +-inf, and a sum containing a NaN is NaN.
template <class T>
bool block_finite(const T* __restrict a, index_t len) {
    T acc[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + a[j + l] * T(0);
    T total = T(0);
    for (; j < len; ++j) total = total + a[j] * T(0);
    for (int l = 0; l < kLanes; ++l) total = total + acc[l];
    return total == total;
}

template <class T>
bool block_not_nan(const T* __restrict a, index_t len) {
    int nan = 0;
    for (index_t j = 0; j < len; ++j) nan |= a[j] != a[j];
    return !nan;
}

// NaN compares unequal to both, so it fails the rule too.
template <class T>
bool block_binary(const T* __restrict a, index_t len) {
    int other = 0;
    for (index_t j = 0; j < len; ++j) other |= (a[j] != T(0)) & (a[j] != T(1));
    return !other;
}

}  // namespace

template <class T>
bool values_ok(const T* a, index_t len, ValueRule rule, int nthreads) {
    const index_t blocks = (len + kBlock - 1) / kBlock;
    const bool parallel = nthreads > 1 && len >= kMinParallel && blocks > 1;
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad) if (parallel)
    for (index_t b = 0; b < blocks; ++b) {
        const T* block = a + b * kBlock;
        const index_t n = std::min(kBlock, len - b * kBlock);
        const bool ok = rule == ValueRule::kFinite  ? block_finite(block, n)
                        : rule == ValueRule::kNotNaN ? block_not_nan(block, n)
                                                     : block_binary(block, n);
        bad |= !ok;
    }
    return !bad;
}

template bool values_ok<float>(const float*, index_t, ValueRule, int);
template bool values_ok<double>(const double*, index_t, ValueRule, int);

}  // namespace salm
