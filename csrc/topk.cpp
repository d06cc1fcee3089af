// Per-image top-k masks by histogram select, and the fused saliency -> top-k kernel.
//
// Each saliency value becomes an order-preserving unsigned key (-0.0 first canonicalized to
// +0.0, so the two are one key): larger key <=> larger value. Per image:
//   1. keys pass (vectorized): keys into a per-thread buffer, the bits all keys share, and
//      whether some value is NaN/inf (then the op fails, as the reference does);
//   2. one histogram of about HW/2 equal-width bins (at most 2^14) over the bits just below
//      that common prefix, and the bin holding the k-th largest key (scanned from the top);
//   3. mask pass (vectorized in runs): ones above that bin, zeros elsewhere, and the keys
//      inside the bin collected with their indices, in index order (few, except for ties);
//   4. the exact threshold among those candidates (nth_element when few, an 11-bit radix
//      select otherwise), then ones for the candidates above it and for the first ties.
// This is exactly the reference's stable descending sort rule (ties to the lower flat
// index). O(HW) per image, deterministic, parallel over images; the fused kernel makes the
// saliency 1024 pixels at a time straight into keys, so no N x H x W saliency exists.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "magnitude.h"

namespace salm {
namespace {

template <class T>
using key_t = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;

template <class K>
constexpr int key_bits() {
    return static_cast<int>(sizeof(K) * 8);
}

template <class T>
inline key_t<T> key_of(T v) {
    using K = key_t<T>;
    constexpr K sign = K(1) << (key_bits<K>() - 1);
    v = v + T(0);  // -0.0 + 0.0 = +0.0 (round to nearest); nothing else changes
    K u;
    std::memcpy(&u, &v, sizeof(u));
    // Negatives: flip every bit (larger magnitude -> smaller key); positives: set the sign bit.
    return u ^ ((K(0) - (u >> (key_bits<K>() - 1))) | sign);
}

// Running state of the keys pass over one image.
template <class K>
struct KeyStats {
    bool started = false;
    K first = 0;       // the image's first key
    K differ = 0;      // OR of key ^ first: its top set bit is the highest bit where keys differ
    bool bad = false;  // a NaN or an inf was seen
};

// keys[j] = key_of(v[j]) for j < len, folding the run into st. (The XOR/OR reduction
// vectorizes with SSE2; an unsigned min/max would be emulated and cost 3x more.)
template <class T>
void make_keys(const T* __restrict v, key_t<T>* __restrict keys, index_t len, KeyStats<key_t<T>>& st) {
    using K = key_t<T>;
    constexpr K exponent = sizeof(T) == 4 ? K(0x7f800000u) : K(0x7ff0000000000000ull);
    constexpr K magnitude = ~(K(1) << (key_bits<K>() - 1));
    if (!st.started && len > 0) {
        st.first = key_of(v[0]);
        st.started = true;
    }
    const K first = st.first;
    K bad = 0, differ = st.differ;
    for (index_t j = 0; j < len; ++j) {
        const T a = v[j];
        K u;
        std::memcpy(&u, &a, sizeof(u));
        bad |= K((u & magnitude) >= exponent);
        const K key = key_of(a);
        differ |= key ^ first;
        keys[j] = key;
    }
    st.differ = differ;
    st.bad = st.bad || bad != 0;
}

template <class K>
struct Threshold {
    K key;         // the k-th largest key
    index_t ties;  // how many keys equal to `key` are in the mask (the first ones by index)
};

// The need-th largest of cand[0, count) (1 <= need <= count) by radix select over 11-bit
// digits, top down; tmp: scratch for count keys. O(count), for large candidate sets.
template <class K>
Threshold<K> radix_select(const K* cand, index_t count, index_t need, K* tmp) {
    std::uint32_t hist[kBins];
    const K* src = cand;
    K prefix = 0;
    for (int low = key_bits<K>(); low > 0;) {
        const int width = low < kDigitBits ? low : kDigitBits;
        low -= width;
        const K digit_mask = (K(1) << width) - 1;
        std::fill(hist, hist + kBins, 0u);
        for (index_t i = 0; i < count; ++i) ++hist[(src[i] >> low) & digit_mask];
        K bin = digit_mask;
        index_t above = 0;
        while (above + hist[bin] < need) above += hist[bin--];
        need -= above;
        prefix |= bin << low;
        if (low == 0) break;
        index_t w = 0;  // keep the keys in `bin` (in place after the first pass: w <= i)
        for (index_t i = 0; i < count; ++i) {
            const K v = src[i];
            tmp[w] = v;
            w += ((v >> low) & digit_mask) == bin;
        }
        src = tmp;
        count = w;
        if (count == need) {  // all remaining keys are in: the threshold is their minimum
            K m = tmp[0];
            for (index_t i = 1; i < count; ++i) m = tmp[i] < m ? tmp[i] : m;
            index_t ties = 0;
            for (index_t i = 0; i < count; ++i) ties += tmp[i] == m;
            return {m, ties};
        }
    }
    return {prefix, need};  // the remaining keys all equal prefix; `need` of them are in
}

// The need-th largest of cand[0, count) and how many keys equal to it are taken.
template <class K>
Threshold<K> select_threshold(const K* cand, index_t count, index_t need, K* tmp) {
    if (count > 4096) return radix_select(cand, count, need, tmp);
    std::copy(cand, cand + count, tmp);
    std::nth_element(tmp, tmp + (need - 1), tmp + count, std::greater<K>());
    const K t = tmp[need - 1];
    index_t above = 0;
    for (index_t i = 0; i < count; ++i) above += cand[i] > t;
    return {t, need - above};
}

// Per-thread scratch, kept between calls so that repeated calls do not page-fault.
template <class K>
struct Scratch {
    std::vector<K> keys, cand, tmp;
    std::vector<index_t> cand_index;
    void reserve(index_t hw) {
        if (static_cast<index_t>(keys.size()) < hw) {
            keys.resize(hw);
            cand.resize(hw);
            tmp.resize(hw);
            cand_index.resize(hw);
        }
    }
};

template <class K>
Scratch<K>& thread_scratch() {
    static thread_local Scratch<K> s;
    return s;
}

// A closed key range [lo, lo + span] holding the k-th largest key of an image, with the
// number of keys above it.
template <class K>
struct Bin {
    K lo, span;
    index_t above;
};

// The first (and usually only) histogram is finer than a radix digit: about hw / 2 bins, at
// most 2^14 (64 KB of counters, L1/L2), so that few keys share the threshold's bin (the
// mask pass collects those one by one), and at least 2^8.
constexpr int kMaxCoarseBits = 14;

inline int coarse_bits(index_t hw) {
    int bits = 0;
    while ((index_t(2) << bits) <= hw) ++bits;  // floor(log2(hw))
    return std::min(kMaxCoarseBits, std::max(8, bits - 1));
}

// Index of the bin holding the k-th largest key when counting from the top of
// hist[0, bins); adds the count of all higher bins to `above`. Whole blocks of 64 bins
// are skipped with a vectorized sum, so empty top bins cost little.
inline index_t find_bin(const std::uint32_t* hist, index_t bins, index_t k, index_t& above) {
    constexpr index_t block = 64;
    index_t top = bins;  // bins is a power of two >= 256
    for (; top > 0; top -= block) {
        std::uint32_t sum = 0;
        for (index_t b = top - block; b < top; ++b) sum += hist[b];
        if (above + index_t(sum) >= k) break;
        above += sum;
    }
    index_t bin = top - 1;
    while (above + hist[bin] < k) above += hist[bin--];
    return bin;
}

// Histogram of all keys over equal-width bins of the bits just below the image's common
// prefix; the bin holding the k-th largest key, with the count of keys above it.
template <class K>
Bin<K> coarse_bin(const K* __restrict keys, index_t hw, index_t k, const KeyStats<K>& st) {
    int spread = key_bits<K>();  // keys share every bit at and above `spread`
    while (!(st.differ >> (spread - 1))) --spread;
    const int bits = coarse_bits(hw);
    const int shift = spread > bits ? spread - bits : 0;
    const index_t bins = index_t(1) << bits;
    std::uint32_t hist[index_t(1) << kMaxCoarseBits];
    std::fill(hist, hist + bins, 0u);
    for (index_t j = 0; j < hw; ++j) ++hist[(keys[j] >> shift) & K(bins - 1)];
    index_t above = 0;
    const index_t bin = find_bin(hist, bins, k, above);
    const K common = spread == key_bits<K>() ? K(0) : st.first >> spread << spread;
    return {common | (K(bin) << shift), (K(1) << shift) - 1, above};
}

// Steps 2-4 of the file comment for one image whose keys are known.
template <class T>
void mask_from_keys(Scratch<key_t<T>>& sc, index_t hw, index_t k, const KeyStats<key_t<T>>& st,
                    T* __restrict out) {
    using K = key_t<T>;
    const K* __restrict keys = sc.keys.data();
    if (st.differ == 0) {  // one value everywhere: the first k pixels
        for (index_t j = 0; j < hw; ++j) out[j] = j < k ? T(1) : T(0);
        return;
    }
    const Bin<K> bin = coarse_bin(keys, hw, k, st);
    const K bin_lo = bin.lo, span = bin.span, bin_hi = bin.lo + bin.span;

    // Mask pass: vectorized runs; the rare runs with keys inside the bin are rescanned.
    constexpr index_t run = 32;
    K* __restrict cand = sc.cand.data();
    index_t* __restrict cand_index = sc.cand_index.data();
    index_t count = 0;
    for (index_t b = 0; b < hw; b += run) {
        const index_t len = std::min(run, hw - b);
        unsigned inside = 0;
        for (index_t j = 0; j < len; ++j) {
            const K v = keys[b + j];
            out[b + j] = v > bin_hi ? T(1) : T(0);
            inside |= static_cast<unsigned>(K(v - bin_lo) <= span);
        }
        if (inside) {
            for (index_t j = b; j < b + len; ++j) {
                if (K(keys[j] - bin_lo) <= span) {
                    cand[count] = keys[j];
                    cand_index[count++] = j;
                }
            }
        }
    }
    const Threshold<K> t = select_threshold(cand, count, k - bin.above, sc.tmp.data());
    index_t ties = t.ties;  // candidates are in index order: the first ties win
    for (index_t i = 0; i < count; ++i) {
        if (cand[i] > t.key) {
            out[cand_index[i]] = T(1);
        } else if (cand[i] == t.key && ties > 0) {
            out[cand_index[i]] = T(1);
            --ties;
        }
    }
}

// Runs image(i, scratch) -> bool finite for every image, parallel over images; stops early
// once some image reports a NaN/inf. Returns whether all were finite.
template <class K, class F>
bool for_each_image(index_t n, index_t hw, int nthreads, F&& image) {
    std::atomic<bool> bad{false};
    const int threads = static_cast<int>(std::min<index_t>(nthreads, n));
    const bool parallel = threads > 1 && n * hw >= kMinParallel;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        Scratch<K>& s = thread_scratch<K>();
        s.reserve(hw);
#pragma omp for schedule(dynamic, 1)
        for (index_t i = 0; i < n; ++i) {
            if (bad.load(std::memory_order_relaxed)) continue;
            if (!image(i, s)) bad.store(true, std::memory_order_relaxed);
        }
    }
    return !bad.load();
}

}  // namespace

template <class T>
bool topk_mask(const T* s, T* out, index_t n, index_t hw, index_t k, int nthreads) {
    using K = key_t<T>;
    return for_each_image<K>(n, hw, nthreads, [&](index_t i, Scratch<K>& sc) {
        KeyStats<K> st;
        make_keys(s + i * hw, sc.keys.data(), hw, st);
        if (st.bad) return false;
        mask_from_keys(sc, hw, k, st, out + i * hw);
        return true;
    });
}

template <class T>
bool saliency_topk_mask(const T* g, T* out, Dims d, index_t k, int p, int nthreads) {
    using K = key_t<T>;
    const index_t hw = d.hw;
    return for_each_image<K>(d.n, hw, nthreads, [&](index_t i, Scratch<K>& sc) {
        T acc[kPixelRun];  // one run of the image's saliency: the only saliency storage
        const T* gi = g + i * d.c * hw;
        KeyStats<K> st;
        for (index_t r = 0; r < hw; r += kPixelRun) {
            const index_t len = std::min(kPixelRun, hw - r);
            magnitude_run(gi + r, d.c, hw, p, acc, len);
            make_keys(acc, sc.keys.data() + r, len, st);
        }
        if (st.bad) return false;
        mask_from_keys(sc, hw, k, st, out + i * hw);
        return true;
    });
}

template bool topk_mask<float>(const float*, float*, index_t, index_t, index_t, int);
template bool topk_mask<double>(const double*, double*, index_t, index_t, index_t, int);
template bool saliency_topk_mask<float>(const float*, float*, Dims, index_t, int, int);
template bool saliency_topk_mask<double>(const double*, double*, Dims, index_t, int, int);

}  // namespace salm
