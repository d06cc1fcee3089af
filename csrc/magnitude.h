// Per-pixel gradient magnitude of a run of pixels, shared by grad_magnitude and the fused
// saliency -> top-k kernel so that both produce the same bits.
#pragma once

#include <cmath>

#include "kernels.h"

namespace salm {

// Pixels per step: the accumulator stays in L1 while the C channel planes stream by.
constexpr index_t kPixelRun = 1024;

// acc[j] = |g0| + |g1| + ... (p = 1) or sqrt(g0*g0 + g1*g1 + ...) (p = 2) for j < len,
// where channel c of pixel j is g[c * hw + j]. Left-to-right sums, one rounding per
// operation (no FMA: the build uses -ffp-contract=off), correctly rounded sqrt.
template <class T>
inline void magnitude_run(const T* __restrict g, index_t c, index_t hw, int p, T* __restrict acc, index_t len) {
    if (p == 1) {
        for (index_t j = 0; j < len; ++j) acc[j] = std::fabs(g[j]);
        for (index_t ch = 1; ch < c; ++ch) {
            const T* __restrict gc = g + ch * hw;
            for (index_t j = 0; j < len; ++j) acc[j] = acc[j] + std::fabs(gc[j]);
        }
        return;
    }
    for (index_t j = 0; j < len; ++j) acc[j] = g[j] * g[j];
    for (index_t ch = 1; ch < c; ++ch) {
        const T* __restrict gc = g + ch * hw;
        for (index_t j = 0; j < len; ++j) acc[j] = acc[j] + gc[j] * gc[j];
    }
    // The argument is a sum of squares (>= 0 or NaN), so sqrt never sets errno; the
    // build's -fno-math-errno lets this loop vectorize to sqrtps/sqrtpd.
    for (index_t j = 0; j < len; ++j) acc[j] = std::sqrt(acc[j]);
}

}  // namespace salm
