"""Per-pixel gradient magnitude (saliency): N x C x H x W -> N x H x W.

p=1: |g_0| + |g_1| + ... ; p=2: sqrt(g_0*g_0 + g_1*g_1 + ...), channels summed left
to right so that every backend rounds identically. The per-pixel arithmetic is
``_common.saliency``, which the fused top-k kernel (``topk_mask.py``) shares so that
it reproduces these values bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import elementwise_launch, saliency


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
    acc = saliency(g_ptr, offs, in_bounds, C, HW, P)
    tl.store(out_ptr + pix, acc, mask=in_bounds)


def grad_magnitude(g: torch.Tensor, p: int, out: torch.Tensor) -> None:
    """Fill ``out`` (N x H x W) with the p-norm over channels of ``g`` (N x C x H x W, contiguous)."""
    n, c, h, w = g.shape
    n_pixels = n * h * w
    block, grid, num_warps = elementwise_launch(n_pixels)
    _grad_magnitude_forward_kernel[grid](
        g, out, n_pixels, c, h * w, P=p, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
    )
