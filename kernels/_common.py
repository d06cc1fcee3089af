"""Helpers shared by the op kernels: scalar passing, the projection, offsets, the saliency.

Private to ``salm_fast.kernels``: every ``@triton.jit`` function here is inlined into the
kernels of more than one op, so each op computes exactly the same bits as the others
(the fused top-k reproduces ``grad_magnitude``; ``pgd_step`` ends in the projection of
``masked_linf_project``).

Scalars (eps, alpha) travel as the bit pattern of their value in the tensor dtype:
Triton types a Python float argument as fp32, which would round an fp64 eps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per program of the elementwise kernels (a power of two).
ELEMENTWISE_BLOCK = 2048


def elementwise_launch(numel: int) -> tuple[int, tuple[int], int]:
    """(block, grid, num_warps) of a 1D elementwise kernel over ``numel`` elements."""
    block = min(ELEMENTWISE_BLOCK, triton.next_power_of_2(numel))
    return block, (triton.cdiv(numel, block),), 4 if block <= 1024 else 8


def scalar_bits(value: float, dtype: torch.dtype) -> int:
    """``value`` rounded to ``dtype`` (fp32 or fp64) as a signed integer bit pattern.

    Rounded by torch.tensor, like the reference's ``torch.tensor(eps, dtype=...)``
    (a value beyond the fp32 range becomes inf there too).
    """
    bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    return int(torch.tensor(value, dtype=dtype).view(bits_dtype))


@triton.jit
def load_scalar(bits, DTYPE: tl.constexpr):
    """Inverse of ``scalar_bits``; the argument may arrive as i32 or i64 (small patterns)."""
    if DTYPE == tl.float64:
        return bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def clamp(v, lo, hi):
    # torch.clamp is min(max(v, lo), hi) and propagates a NaN v; where() does both
    # without depending on the NaN convention of the hardware min/max.
    v = tl.where(v < lo, lo, v)
    return tl.where(v > hi, hi, v)


@triton.jit
def project(x, delta, m, eps):
    """clamp(clamp(delta * m, -eps, eps), -x, 1 - x): the masked L-inf / box projection."""
    d = clamp(delta * m, -eps, eps)
    return clamp(d, -x, 1.0 - x)


@triton.jit
def mask_offsets(offs, C, HW):
    """Offsets into the N x 1 x H x W mask of flat N x C x H x W offsets (int64)."""
    return (offs // (C * HW)) * HW + offs % HW


@triton.jit
def saliency(g_ptr, offs, in_bounds, C, HW, P: tl.constexpr):
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
