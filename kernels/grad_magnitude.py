"""Per-pixel gradient magnitude (saliency): N x C x H x W -> N x H x W.

p=1: |g_0| + |g_1| + ... ; p=2: sqrt(g_0*g_0 + g_1*g_1 + ...), channels summed left
to right so that every backend rounds identically. ``_saliency`` is shared with the
fused top-k kernel (``topk_mask.py``), which must reproduce these values bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _saliency(g_ptr, offs, in_bounds, C, HW, P: tl.constexpr):
    """Saliency of a block of pixels.

    g_ptr: N x C x H x W gradient (contiguous); offs: int64 offsets of the pixels'
    channel-0 elements; channel c lies c*HW further. Masked lanes yield 0.
    The caller must launch with ``enable_fp_fusion=False`` (p=2): the reference
    rounds every product before adding it, an FMA would not.
    """
    ptrs = g_ptr + offs
    g = tl.load(ptrs, mask=in_bounds, other=0.0)
    if P == 1:
        acc = tl.abs(g)
    else:
        acc = g * g
    for _ in range(1, C):
        ptrs += HW
        g = tl.load(ptrs, mask=in_bounds, other=0.0)
        if P == 1:
            acc = acc + tl.abs(g)
        else:
            acc = acc + g * g
    if P == 2:
        # tl.sqrt is the approximate sqrt on fp32; fp64 sqrt is always IEEE
        # (sqrt.rn.f64) and sqrt_rn accepts fp32 only.
        if acc.dtype == tl.float32:
            acc = tl.sqrt_rn(acc)
        else:
            acc = tl.sqrt(acc)
    return acc


@triton.jit
def _grad_magnitude_forward_kernel(g_ptr, out_ptr, n_pixels, C, HW, P: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK pixels of the flat N*H*W range (blocks may span images).

    g_ptr: N x C x H x W gradient; out_ptr: N x H x W saliency.
    """
    pid = tl.program_id(0).to(tl.int64)
    pix = pid * BLOCK + tl.arange(0, BLOCK)  # int64: N*C*H*W may exceed 2**31
    in_bounds = pix < n_pixels
    n = pix // HW
    offs = n * C * HW + (pix - n * HW)
    acc = _saliency(g_ptr, offs, in_bounds, C, HW, P)
    tl.store(out_ptr + pix, acc, mask=in_bounds)


def grad_magnitude(g: torch.Tensor, p: int, out: torch.Tensor) -> None:
    """Fill ``out`` (N x H x W) with the p-norm over channels of ``g`` (N x C x H x W, contiguous)."""
    n, c, h, w = g.shape
    n_pixels = n * h * w
    block = min(_BLOCK, triton.next_power_of_2(n_pixels))
    grid = (triton.cdiv(n_pixels, block),)
    _grad_magnitude_forward_kernel[grid](
        g, out, n_pixels, c, h * w, P=p, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False,
    )
