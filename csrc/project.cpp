// Masked L-inf projection (forward and backward) and the fused PGD step.
//
// All three are memory-bound elementwise passes over N x C x HW with the N x HW mask
// broadcast over channels. Blocks never straddle a plane, so the mask pointer of a block
// is just mask + n * hw. The in-place variants (out == delta) read and write one
// pointer, which keeps __restrict honest on the others and the loops vectorized.
#include "common.h"

namespace salm {
namespace {

// clamp(clamp(d * m, -eps, eps), -x, 1 - x), one IEEE operation at a time.
template <class T>
inline T project_one(T x, T d, T m, T eps) {
    const T d1 = clamp_finite(d * m, -eps, eps);
    return clamp_nan(d1, -x, T(1) - x);
}

template <class T>
void project_range(const T* __restrict x, const T* __restrict delta, const T* __restrict mask, T eps,
                   T* __restrict out, index_t len) {
    for (index_t j = 0; j < len; ++j) out[j] = project_one(x[j], delta[j], mask[j], eps);
}

template <class T>
void project_range_inplace(const T* __restrict x, T* __restrict delta, const T* __restrict mask, T eps,
                           index_t len) {
    for (index_t j = 0; j < len; ++j) delta[j] = project_one(x[j], delta[j], mask[j], eps);
}

// delta + alpha * sign(g), then the projection (PyTorch: delta + a * torch.sign(g)).
template <class T>
void pgd_range(const T* __restrict x, const T* __restrict delta, const T* __restrict g,
               const T* __restrict mask, T eps, T alpha, T* __restrict out, index_t len) {
    for (index_t j = 0; j < len; ++j) out[j] = project_one(x[j], delta[j] + alpha * sign_of(g[j]), mask[j], eps);
}

template <class T>
void pgd_range_inplace(const T* __restrict x, T* __restrict delta, const T* __restrict g,
                       const T* __restrict mask, T eps, T alpha, index_t len) {
    for (index_t j = 0; j < len; ++j) delta[j] = project_one(x[j], delta[j] + alpha * sign_of(g[j]), mask[j], eps);
}

// Inclusive-bound clamp subgradients: delta gets grad_out * mask where neither clamp is
// active; x gets -grad_out where the box clamp (-x, 1 - x) is active.
template <class T>
void backward_range(const T* __restrict x, const T* __restrict delta, const T* __restrict mask, T eps,
                    const T* __restrict grad_out, T* __restrict grad_delta, index_t len) {
    for (index_t j = 0; j < len; ++j) {
        const T m = mask[j];
        const T d0 = delta[j] * m;
        const T d1 = clamp_finite(d0, -eps, eps);
        const T lo = -x[j], hi = T(1) - x[j];
        // Chained selects rather than && keep the loop branch-free (vectorizable).
        T gd = grad_out[j] * m;
        gd = d0 >= -eps ? gd : T(0);
        gd = d0 <= eps ? gd : T(0);
        gd = d1 >= lo ? gd : T(0);
        grad_delta[j] = d1 <= hi ? gd : T(0);
    }
}

template <class T>
void backward_range_x(const T* __restrict x, const T* __restrict delta, const T* __restrict mask, T eps,
                      const T* __restrict grad_out, T* __restrict grad_delta, T* __restrict grad_x, index_t len) {
    for (index_t j = 0; j < len; ++j) {
        const T m = mask[j];
        const T d0 = delta[j] * m;
        const T d1 = clamp_finite(d0, -eps, eps);
        const T lo = -x[j], hi = T(1) - x[j];
        const T go = grad_out[j];
        T gd = go * m;
        gd = d0 >= -eps ? gd : T(0);
        gd = d0 <= eps ? gd : T(0);
        gd = d1 >= lo ? gd : T(0);
        gd = d1 <= hi ? gd : T(0);
        T gx = d1 >= lo ? T(0) : -go;  // -grad_out unless inside the box (both bounds hold)
        gx = d1 <= hi ? gx : -go;
        grad_delta[j] = gd;
        grad_x[j] = gx;
    }
}

}  // namespace

template <class T>
void masked_linf_project(const T* x, const T* delta, const T* mask, T eps, T* out, Dims d, int nthreads) {
    const bool inplace = out == delta;
    for_each_block(d.n * d.c, d.hw, nthreads, [&](index_t plane, index_t b, index_t e) {
        const index_t off = plane * d.hw + b;
        const T* m = mask + (plane / d.c) * d.hw + b;
        if (inplace)
            project_range_inplace(x + off, out + off, m, eps, e - b);
        else
            project_range(x + off, delta + off, m, eps, out + off, e - b);
    });
}

template <class T>
void masked_linf_project_backward(const T* x, const T* delta, const T* mask, T eps, const T* grad_out,
                                  T* grad_delta, T* grad_x, Dims d, int nthreads) {
    for_each_block(d.n * d.c, d.hw, nthreads, [&](index_t plane, index_t b, index_t e) {
        const index_t off = plane * d.hw + b;
        const T* m = mask + (plane / d.c) * d.hw + b;
        if (grad_x)
            backward_range_x(x + off, delta + off, m, eps, grad_out + off, grad_delta + off, grad_x + off, e - b);
        else
            backward_range(x + off, delta + off, m, eps, grad_out + off, grad_delta + off, e - b);
    });
}

template <class T>
void pgd_step(const T* x, const T* delta, const T* g, const T* mask, T eps, T alpha, T* out, Dims d,
              int nthreads) {
    const bool inplace = out == delta;
    for_each_block(d.n * d.c, d.hw, nthreads, [&](index_t plane, index_t b, index_t e) {
        const index_t off = plane * d.hw + b;
        const T* m = mask + (plane / d.c) * d.hw + b;
        if (inplace)
            pgd_range_inplace(x + off, out + off, g + off, m, eps, alpha, e - b);
        else
            pgd_range(x + off, delta + off, g + off, m, eps, alpha, out + off, e - b);
    });
}

#define SALM_INSTANTIATE(T)                                                                                      \
    template void masked_linf_project<T>(const T*, const T*, const T*, T, T*, Dims, int);                     \
    template void masked_linf_project_backward<T>(const T*, const T*, const T*, T, const T*, T*, T*, Dims, int); \
    template void pgd_step<T>(const T*, const T*, const T*, const T*, T, T, T*, Dims, int);
SALM_INSTANTIATE(float)
SALM_INSTANTIATE(double)
#undef SALM_INSTANTIATE

}  // namespace salm
