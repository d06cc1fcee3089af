// Raw-pointer CPU kernels of salm_fast._C (see salm_fast/ops/_reference.py for the spec).
//
// Every kernel takes contiguous buffers that the bindings (module.cpp) have already
// checked for dtype, shape, contiguity and overlap, and a thread count (>= 1). Images
// and gradients are N x C x HW (HW = H * W, flattened); masks and saliencies N x HW.
// Instantiated for float and double; results are bit-identical to the torch reference
// because every kernel performs the same IEEE operations in the same order.
#pragma once

#include <cstdint>

namespace salm {

using index_t = std::int64_t;  // int64 offsets: N * C * H * W may exceed 2^31

struct Dims {
    index_t n;   // images
    index_t c;   // channels
    index_t hw;  // pixels per channel plane
};

// out[n, hw] = sum_c |g| (p = 1) or sqrt(sum_c g * g) (p = 2), channels in ascending order.
template <class T>
void grad_magnitude(const T* g, T* out, Dims d, int p, int nthreads);

// out[n, hw] in {0, 1}: exactly k ones per image at the k largest s, ties to the lower
// index, -0.0 == +0.0. Returns false (out partly written) if s has a NaN or an inf.
template <class T>
bool topk_mask(const T* s, T* out, index_t n, index_t hw, index_t k, int nthreads);

// topk_mask(grad_magnitude(g, p), k) with one image's saliency at a time in a per-thread
// scratch buffer. Returns false if the saliency has a NaN or an inf.
template <class T>
bool saliency_topk_mask(const T* g, T* out, Dims d, index_t k, int p, int nthreads);

// out = clamp(clamp(delta * mask, -eps, eps), -x, 1 - x); mask is N x HW, broadcast over C.
// out may be the same buffer as delta (no other overlap).
template <class T>
void masked_linf_project(const T* x, const T* delta, const T* mask, T eps, T* out, Dims d, int nthreads);

// PyTorch clamp subgradients of masked_linf_project; grad_x may be null.
template <class T>
void masked_linf_project_backward(const T* x, const T* delta, const T* mask, T eps, const T* grad_out,
                                  T* grad_delta, T* grad_x, Dims d, int nthreads);

// out = masked_linf_project(x, delta + alpha * sign(g), mask, eps); alpha carries the sign.
// out may be the same buffer as delta (the usual in-place PGD update).
template <class T>
void pgd_step(const T* x, const T* delta, const T* g, const T* mask, T eps, T alpha, T* out, Dims d,
              int nthreads);

// True if each of the len values of a obeys the rule. Used by the ops' input checks.
enum class ValueRule {
    kFinite,  // no NaN, no +-inf
    kNotNaN,  // no NaN (inf allowed: a gradient's sign is still defined)
    kBinary,  // each value 0 or 1 (a mask)
};
template <class T>
bool values_ok(const T* a, index_t len, ValueRule rule, int nthreads);

}  // namespace salm
