"""Masked L-inf projection, forward and backward (elementwise, 1D grid over N*C*H*W).

Forward: out = clamp(clamp(delta * mask, -eps, eps), -x, 1 - x), in that order.
Backward: PyTorch clamp's subgradients (bounds inclusive): grad_delta = grad_out * mask
where neither clamp is active, grad_x = -grad_out where the box clamp is active.
The mask (N x 1 x H x W) is shared by the C channels; eps travels as its bit pattern
(``_common.scalar_bits``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import clamp, elementwise_launch, load_scalar, mask_offsets, project, scalar_bits


@triton.jit(do_not_specialize=["eps_bits"])
def _masked_linf_project_forward_kernel(
    x_ptr, delta_ptr, mask_ptr, out_ptr, eps_bits, numel, C, HW, BLOCK: tl.constexpr,
):
    """x_ptr, delta_ptr, out_ptr: N x C x H x W; mask_ptr: N x 1 x H x W; eps_bits: see scalar_bits."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int64: N*C*H*W may exceed 2**31
    live = offs < numel
    eps = load_scalar(eps_bits, x_ptr.dtype.element_ty)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=live, other=0.0)
    m = tl.load(mask_ptr + mask_offsets(offs, C, HW), mask=live, other=0.0)
    tl.store(out_ptr + offs, project(x, delta, m, eps), mask=live)


@triton.jit(do_not_specialize=["eps_bits"])
def _masked_linf_project_backward_kernel(
    x_ptr, delta_ptr, mask_ptr, grad_out_ptr, grad_delta_ptr, grad_x_ptr, eps_bits, numel, C, HW,
    HAS_GRAD_X: tl.constexpr, BLOCK: tl.constexpr,
):
    """x_ptr, delta_ptr, grad_out_ptr, grad_delta_ptr, grad_x_ptr: N x C x H x W (grad_x_ptr
    unused unless HAS_GRAD_X); mask_ptr: N x 1 x H x W; eps_bits: see scalar_bits."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    eps = load_scalar(eps_bits, x_ptr.dtype.element_ty)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=live, other=0.0)
    m = tl.load(mask_ptr + mask_offsets(offs, C, HW), mask=live, other=0.0)
    go = tl.load(grad_out_ptr + offs, mask=live, other=0.0)
    d0 = delta * m
    d1 = clamp(d0, -eps, eps)
    in_eps = (d0 >= -eps) & (d0 <= eps)
    in_box = (d1 >= -x) & (d1 <= 1.0 - x)
    tl.store(grad_delta_ptr + offs, tl.where(in_eps & in_box, go * m, 0.0), mask=live)
    if HAS_GRAD_X:
        tl.store(grad_x_ptr + offs, tl.where(in_box, 0.0, -go), mask=live)


def masked_linf_project(x, delta, mask, eps: float, out) -> None:
    """Fill ``out`` with the projection of ``delta``; all tensors contiguous, one dtype."""
    _, c, h, w = x.shape
    block, grid, num_warps = elementwise_launch(x.numel())
    _masked_linf_project_forward_kernel[grid](
        x, delta, mask, out, scalar_bits(eps, x.dtype), x.numel(), c, h * w, BLOCK=block, num_warps=num_warps,
    )


def masked_linf_project_backward(x, delta, mask, eps: float, grad_out, grad_delta, grad_x) -> None:
    """Fill ``grad_delta`` and, unless it is None, ``grad_x``."""
    _, c, h, w = x.shape
    block, grid, num_warps = elementwise_launch(x.numel())
    _masked_linf_project_backward_kernel[grid](
        x, delta, mask, grad_out, grad_delta, grad_delta if grad_x is None else grad_x,
        scalar_bits(eps, x.dtype), x.numel(), c, h * w, HAS_GRAD_X=grad_x is not None, BLOCK=block,
        num_warps=num_warps,
    )
