"""Triton-specific checks the parity suite does not reach.

Blocks that do not divide the image, ties straddling block boundaries, extreme keys,
per-image non-finite counts, elementwise programs spanning several images, fp64
scalars that fp32 cannot hold and int64 mask offsets. Under TRITON_INTERPRET=1
(conftest) the kernels run in Triton's CPU interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import salm_fast.ops as ops
from salm_fast.ops import _reference as ref

from .conftest import assert_close_report

if not ops.available_backends()["triton"].available:
    pytest.skip(f"triton backend unavailable: {ops.available_backends()['triton'].reason}",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from salm_fast.kernels import topk_mask as topk_kernels  # noqa: E402
from salm_fast.kernels._common import load_scalar, mask_offsets, scalar_bits  # noqa: E402
from salm_fast.ops import _triton as tri  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    out = s.new_empty((s.shape[0], 1, s.shape[1], s.shape[2]))
    assert ref.topk_mask(s, k, out)
    return out


def _tri_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.full((s.shape[0], 1, s.shape[1], s.shape[2]), 7.0, dtype=s.dtype)
    assert tri.topk_mask(s, k, out)
    return out


# ------------------------------------------------------------------ top-k
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_straddle_block_boundaries(dtype):
    # 70 x 70 = 4900 pixels: two blocks of 4096, the second one mostly masked.
    vals = torch.tensor([-1.0, -0.0, 0.0, 0.5], dtype=dtype)
    s = vals[torch.randint(0, 4, (2, 70, 70), generator=_gen(1))]
    for k in (1, 1000, 2450, 4096, 4097, 4899, 4900):
        assert_close_report(_tri_mask(s, k), _ref_mask(s, k), exact=True, what=f"few values k={k}")
    flat = torch.full((1, 70, 70), 0.25, dtype=dtype)
    expected = torch.zeros(1, 4900, dtype=dtype)
    expected[:, :4097] = 1
    assert_close_report(_tri_mask(flat, 4097), expected.reshape(1, 1, 70, 70), exact=True, what="all equal")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_orders_extreme_finite_values(dtype):
    fi = torch.finfo(dtype)
    vals = torch.tensor([-fi.max, -1.0, -fi.tiny, -fi.smallest_normal / 4, -0.0, 0.0,
                         fi.smallest_normal / 4, fi.tiny, 1.0, 1.0 + fi.eps, fi.max], dtype=dtype)
    s = vals[torch.randint(0, len(vals), (3, 9, 13), generator=_gen(2))]
    for k in (1, 5, 30, 58, 59, 100, 117):
        assert_close_report(_tri_mask(s, k), _ref_mask(s, k), exact=True, what=f"extreme values k={k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_counts_nonfinite_values_per_image(dtype):
    s = torch.randn((4, 9, 13), generator=_gen(3), dtype=dtype)
    s[1, 2, 3] = float("nan")
    s[2, 0, 0] = float("inf")
    s[2, 8, 12] = -float("inf")
    s[3, 4, 4] = torch.finfo(dtype).max  # finite
    out = torch.empty((4, 1, 9, 13), dtype=dtype)
    counts = topk_kernels.topk_mask(s, 10, out)
    assert counts.dtype == torch.int32
    assert counts.tolist() == [0, 1, 2, 0]
    for i in (0, 3):  # images without NaN/inf still get their exact mask
        assert_close_report(out[i:i + 1], _ref_mask(s[i:i + 1], 10), exact=True, what=f"image {i}")
    assert not tri.topk_mask(s, 10, out)


@pytest.mark.parametrize("p", [1, 2])
def test_fused_topk_detects_saliency_overflow(p):
    # Finite gradients whose saliency overflows fp32 (|g| sum or g*g) rank nothing.
    g = torch.randn((2, 3, 8, 8), generator=_gen(4))
    g[1, :, 5, 5] = 3e38 if p == 1 else 3e19
    out = torch.empty((2, 1, 8, 8))
    with np.errstate(over="ignore"):  # the interpreter computes with numpy
        counts = topk_kernels.saliency_topk_mask(g, 3, p, out)
    assert counts.tolist() == [0, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_magnitude_p2_is_correctly_rounded(dtype):
    # Oracle: channel sum in the reference's order, then numpy's IEEE sqrt.
    g = torch.randn((2, 3, 33, 35), generator=_gen(5), dtype=dtype)
    acc = g[:, 0] * g[:, 0] + g[:, 1] * g[:, 1] + g[:, 2] * g[:, 2]
    expected = torch.from_numpy(np.sqrt(acc.numpy()))
    out = torch.empty_like(acc)
    tri.grad_magnitude(g, 2, out)
    assert_close_report(out, expected, exact=True, what="sqrt_rn")


# ------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("shape", [(5, 3, 9, 13), (3, 2, 37, 41)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_programs_spanning_images(shape, dtype):
    # (5, 3, 9, 13): one program covers all five images; (3, 2, 37, 41): five programs
    # whose boundaries fall inside images and channels.
    gen = _gen(6)
    n, c, h, w = shape
    x = torch.rand(shape, generator=gen, dtype=dtype)
    delta = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * 0.1
    g = torch.randn(shape, generator=gen, dtype=dtype)
    g.view(-1)[::5] = 0.0
    mask = (torch.rand((n, 1, h, w), generator=gen) < 0.5).to(dtype)
    grad_out = torch.randn(shape, generator=gen, dtype=dtype)
    eps = 0.03

    expected, out = torch.empty_like(x), torch.empty_like(x)
    ref.masked_linf_project(x, delta, mask, eps, expected)
    tri.masked_linf_project(x, delta, mask, eps, out)
    assert_close_report(out, expected, exact=True, what="project")

    eg_d, eg_x, g_d, g_x = (torch.empty_like(x) for _ in range(4))
    ref.masked_linf_project_backward(x, delta, mask, eps, grad_out, eg_d, eg_x)
    tri.masked_linf_project_backward(x, delta, mask, eps, grad_out, g_d, g_x)
    assert_close_report(g_d, eg_d, exact=True, what="grad delta")
    assert_close_report(g_x, eg_x, exact=True, what="grad x")
    g_d2 = torch.empty_like(x)
    tri.masked_linf_project_backward(x, delta, mask, eps, grad_out, g_d2, None)
    assert_close_report(g_d2, eg_d, exact=True, what="grad delta without grad x")

    ref.pgd_step(x, delta, g, mask, eps, -0.01, expected)
    d = delta.clone()
    tri.pgd_step(x, d, g, mask, eps, -0.01, d)  # in place
    assert_close_report(d, expected, exact=True, what="pgd_step in place")


def test_fp64_scalars_keep_fp64_precision():
    # 0.1 and 1/255 are not fp32 numbers; deltas between fp32(0.1) and 0.1 must clip to 0.1.
    eps, alpha = 0.1, 1 / 255
    shape = (1, 1, 8, 8)
    x = torch.full(shape, 0.5, dtype=torch.float64)
    offsets = torch.linspace(-2e-9, 2e-9, 64, dtype=torch.float64).reshape(shape)
    delta = eps + offsets
    delta.view(-1)[::2] *= -1
    mask = torch.ones((1, 1, 8, 8), dtype=torch.float64)
    expected, out = torch.empty_like(x), torch.empty_like(x)
    ref.masked_linf_project(x, delta, mask, eps, expected)
    tri.masked_linf_project(x, delta, mask, eps, out)
    assert_close_report(out, expected, exact=True, what="fp64 eps")
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    between = (delta.abs() > eps) & (delta.abs() < eps32)  # clipped only with the fp64 eps
    assert between.any() and torch.all(out.abs()[between] == eps)

    g = torch.randn(shape, generator=_gen(7), dtype=torch.float64)
    g[0, 0, 0, 0] = float("nan")  # torch.sign(nan) is 0 on CPU
    small = torch.zeros_like(x)
    ref.pgd_step(x, small, g, mask, eps, -alpha, expected)
    tri.pgd_step(x, small, g, mask, eps, -alpha, out)
    assert_close_report(out, expected, exact=True, what="fp64 alpha")
    assert torch.all(out.abs()[g == g] == alpha) and out[0, 0, 0, 0] == 0


@triton.jit
def _scalar_roundtrip_kernel(out_ptr, bits):
    tl.store(out_ptr, load_scalar(bits, out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, -0.0, 1e-40, 8 / 255, -2 / 255, 0.1, 1e300])
def test_scalar_bits_round_trip(dtype, value):
    out = torch.empty(1, dtype=dtype)
    _scalar_roundtrip_kernel[(1,)](out, scalar_bits(value, dtype))
    expected = torch.tensor([value], dtype=dtype)  # fp32: 1e-40 is subnormal, 1e300 is inf
    assert out.view(torch.uint8).tolist() == expected.view(torch.uint8).tolist()


@triton.jit
def _mask_offsets_probe_kernel(out_ptr, base, C, HW, BLOCK: tl.constexpr):
    offs = base + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), mask_offsets(offs, C, HW))


def test_mask_offsets_use_int64_beyond_2_31():
    c, hw, block = 3, 224 * 224, 64
    base = 2**33 + 3 * hw - 17  # a channel boundary of an image far beyond 2**31 elements
    out = torch.empty(block, dtype=torch.int64)
    _mask_offsets_probe_kernel[(1,)](out, base, c, hw, BLOCK=block)
    expected = [((i // (c * hw)) * hw + i % hw) for i in range(base, base + block)]
    assert out.tolist() == expected
