// grad_magnitude: per-pixel saliency N x C x HW -> N x HW.
#include "common.h"
#include "magnitude.h"

namespace salm {

template <class T>
void grad_magnitude(const T* g, T* out, Dims d, int p, int nthreads) {
    // Blocks over (image, pixel range) so that N = 1 still uses every thread; the output
    // block itself is the accumulator.
    for_each_block(d.n, d.hw, nthreads, [&](index_t n, index_t b, index_t e) {
        for (index_t r = b; r < e; r += kPixelRun) {
            const index_t len = std::min(kPixelRun, e - r);
            magnitude_run(g + n * d.c * d.hw + r, d.c, d.hw, p, out + n * d.hw + r, len);
        }
    });
}

template void grad_magnitude<float>(const float*, float*, Dims, int, int);
template void grad_magnitude<double>(const double*, double*, Dims, int, int);

}  // namespace salm
