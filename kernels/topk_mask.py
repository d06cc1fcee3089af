"""Top-k mask per image, plain (saliency in) and fused (gradient in), by radix select.

One program per image. Each value is mapped to an order-preserving unsigned key
(uint32 for fp32, uint64 for fp64); the k-th largest key is found one 8-bit digit at
a time, most significant first, with a 256-bin ``tl.histogram`` pass over the image
per digit (4 passes for fp32, 8 for fp64). A last pass writes ones for keys above
that threshold and, for keys equal to it, for the first ``k - count_above`` in flat
index order (``tl.cumsum`` within a block plus a running count across blocks, which
are visited in order). The fused variant recomputes the saliency from the gradient
in every pass (``_common.saliency``, the same arithmetic as ``grad_magnitude``) instead of
writing an N x H x W temporary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import saliency

_MAX_BLOCK = 4096
# tl.histogram's GPU lowering replicates a block narrower than the CTA over its threads
# and divides the counts back; a block of >= 256 lanes (128 or 256 threads) keeps every
# element owned by exactly one thread.
_MIN_BLOCK = 256


@triton.jit
def _sort_key(v, KEY_BITS: tl.constexpr):
    """Unsigned key whose integer order is the IEEE order of the (finite) values v."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0: give both the key of +0.0
    if KEY_BITS == 64:
        bits = v.to(tl.uint64, bitcast=True)
    else:
        bits = v.to(tl.uint32, bitcast=True)
    sign_bit = tl.full(bits.shape, 1, bits.dtype) << (KEY_BITS - 1)
    # Negative values: flip every bit (larger magnitude -> smaller key); others: set
    # the sign bit so that they sort above all negatives.
    return tl.where((bits & sign_bit) != 0, ~bits, bits | sign_bit)


@triton.jit
def _is_nonfinite(v, KEY_BITS: tl.constexpr):
    """Exponent all ones (inf or NaN), tested on the bits so that no fast-math flag can fold it."""
    if KEY_BITS == 64:
        exponent = (v.to(tl.uint64, bitcast=True) >> 52) & 0x7FF
        return exponent == 0x7FF
    else:
        exponent = (v.to(tl.uint32, bitcast=True) >> 23) & 0xFF
        return exponent == 0xFF


@triton.jit
def _load_values(src_ptr, img_base, idx, in_bounds, C, HW, FUSED: tl.constexpr, P: tl.constexpr):
    if FUSED:
        v = saliency(src_ptr, img_base + idx, in_bounds, C, HW, P)
    else:
        v = tl.load(src_ptr + img_base + idx, mask=in_bounds, other=0.0)
    return v


@triton.jit
def _topk_mask_kernel(
    src_ptr, out_ptr, nonfinite_ptr, k, C, HW,
    FUSED: tl.constexpr, P: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per image: exactly k ones at the k largest values, ties to the lower index.

    src_ptr: N x H x W saliency (FUSED=False, C=1) or N x C x H x W gradient (FUSED=True,
    saliency computed with norm P); out_ptr: N x 1 x H x W mask in the source dtype;
    nonfinite_ptr: N int32, the number of NaN/inf saliencies per image (the mask of such
    an image is meaningless and the launcher's caller reports an error).
    """
    pid = tl.program_id(0).to(tl.int64)
    img_base = pid * C * HW  # int64: the batch may exceed 2**31 elements
    out_base = pid * HW
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    if KEY_BITS == 64:
        prefix = tl.zeros([], tl.uint64)
    else:
        prefix = tl.zeros([], tl.uint32)
    k_rem = k  # how many of the keys sharing `prefix` still belong to the top k

    # ---- radix select: fix the k-th largest key one 8-bit digit at a time.
    for j in tl.static_range(KEY_BITS // 8):
        hist = tl.zeros([256], tl.int32)
        n_bad = 0
        for start in range(0, HW, BLOCK):
            idx = start + lanes
            in_bounds = idx < HW
            v = _load_values(src_ptr, img_base, idx, in_bounds, C, HW, FUSED, P)
            key = _sort_key(v, KEY_BITS)
            digit = ((key >> (KEY_BITS - 8 * (j + 1))) & 0xFF).to(tl.int32)
            if j == 0:
                live = in_bounds
                n_bad += tl.sum((_is_nonfinite(v, KEY_BITS) & in_bounds).to(tl.int32))
            else:
                # Only keys whose higher digits equal the ones already fixed compete.
                live = in_bounds & ((key >> (KEY_BITS - 8 * j)) == (prefix >> (KEY_BITS - 8 * j)))
            hist += tl.histogram(digit, 256, mask=live)
        if j == 0:
            tl.store(nonfinite_ptr + pid, n_bad)
        # at_least[b]: live keys whose digit is >= b; non-increasing, at_least[0] >= k_rem.
        at_least = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        d = tl.sum((at_least >= k_rem).to(tl.int32)) - 1
        k_rem -= tl.sum(tl.where(bins > d, hist, 0))
        prefix = prefix | (d.to(prefix.dtype) << (KEY_BITS - 8 * (j + 1)))

    # ---- write: keys above the threshold, then the first k_rem equal keys by index.
    taken = 0
    for start in range(0, HW, BLOCK):
        idx = start + lanes
        in_bounds = idx < HW
        v = _load_values(src_ptr, img_base, idx, in_bounds, C, HW, FUSED, P)
        key = _sort_key(v, KEY_BITS)
        tie = ((key == prefix) & in_bounds).to(tl.int32)
        rank = taken + tl.cumsum(tie, 0)  # 1-based rank of each tie in index order
        keep = (key > prefix) | ((tie == 1) & (rank <= k_rem))
        tl.store(out_ptr + out_base + idx, keep.to(out_ptr.dtype.element_ty), mask=in_bounds)
        taken += tl.sum(tie)


def _launch(src: torch.Tensor, k: int, out: torch.Tensor, channels: int, fused: bool, p: int) -> torch.Tensor:
    n = src.shape[0]
    hw = src.shape[-2] * src.shape[-1]
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(hw)))
    nonfinite = torch.empty(n, dtype=torch.int32, device=src.device)
    _topk_mask_kernel[(n,)](
        src, out, nonfinite, k, channels, hw,
        FUSED=fused, P=p, KEY_BITS=64 if src.dtype == torch.float64 else 32, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False,  # the fused saliency must round like grad_magnitude
    )
    return nonfinite


def topk_mask(s: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (N x 1 x H x W) with the top-k mask of ``s`` (N x H x W, contiguous).

    Returns the per-image count of NaN/inf values (int32, on s's device, not synced).
    """
    return _launch(s, k, out, 1, False, 1)


def saliency_topk_mask(g: torch.Tensor, k: int, p: int, out: torch.Tensor) -> torch.Tensor:
    """Fused ``topk_mask(grad_magnitude(g, p), k)`` without the N x H x W saliency tensor.

    Returns the per-image count of NaN/inf saliencies (int32, on g's device, not synced).
    """
    return _launch(g, k, out, g.shape[1], True, p)
