"""Fused PGD step: out = project(delta + alpha * sign(g)) in one elementwise pass.

``alpha`` carries the direction (negative: error-minimizing). ``out`` may alias
``delta``: each element is read before it is written, by the same program. The
projection is ``_common.project``, the one ``masked_linf_project`` applies.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import elementwise_launch, load_scalar, mask_offsets, project, scalar_bits


@triton.jit(do_not_specialize=["eps_bits", "alpha_bits"])
def _pgd_step_kernel(
    x_ptr, delta_ptr, g_ptr, mask_ptr, out_ptr, eps_bits, alpha_bits, numel, C, HW, BLOCK: tl.constexpr,
):
    """x_ptr, delta_ptr, g_ptr, out_ptr: N x C x H x W (out_ptr may equal delta_ptr);
    mask_ptr: N x 1 x H x W; eps_bits, alpha_bits: the scalars' bit patterns (scalar_bits)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int64: N*C*H*W may exceed 2**31
    live = offs < numel
    dtype = x_ptr.dtype.element_ty
    eps = load_scalar(eps_bits, dtype)
    alpha = load_scalar(alpha_bits, dtype)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=live, other=0.0)
    g = tl.load(g_ptr + offs, mask=live, other=0.0)
    m = tl.load(mask_ptr + mask_offsets(offs, C, HW), mask=live, other=0.0)
    # torch.sign's formula (0 < g) - (g < 0): 0 for +-0 and NaN.
    sign = (g > 0).to(dtype) - (g < 0).to(dtype)
    tl.store(out_ptr + offs, project(x, delta + alpha * sign, m, eps), mask=live)


def pgd_step(x, delta, g, mask, eps: float, alpha: float, out) -> None:
    """Fill ``out`` (possibly ``delta`` itself) with one projected signed-gradient step."""
    _, c, h, w = x.shape
    numel = x.numel()
    block, grid, num_warps = elementwise_launch(numel)
    _pgd_step_kernel[grid](
        x, delta, g, mask, out, scalar_bits(eps, x.dtype), scalar_bits(alpha, x.dtype), numel, c, h * w,
        BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False,  # keep alpha * sign rounded before the add, as in the reference
    )
