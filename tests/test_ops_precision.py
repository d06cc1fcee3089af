"""float16 and bfloat16 on every op and backend, against the float32 reference.

The contract (salm_fast/ops/_precision.py): computed in float32 on the widened inputs,
rounded once to the input dtype; the budget rounded down to the dtype; a perturbation
never rounded across a bound. So each output equals the float32 reference on the same
(widened) inputs rounded to the dtype, up to half an ulp (``UNIT_ROUNDOFF``: 2**-8 for
bfloat16, 2**-11 for float16), one ulp where a box bound was not representable; masks
and gradients of the projection are exact.
"""
from __future__ import annotations

import pytest
import torch

import salm_fast.ops as ops

from . import test_ops
from .conftest import assert_close_report
from .test_ops import EPS, R, make_inputs

backend = test_ops.backend  # the per-backend fixture (torch, cpp, triton)

LOW = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative
SHAPES = [(1, 1, 8, 8), (2, 3, 9, 13), (1, 3, 64, 64)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, ascending (float64)."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    return v[torch.isfinite(v)].unique()


def _budget(eps: float, dtype: torch.dtype) -> float:
    """Independently of the implementation: the largest value of dtype <= eps."""
    values = _all_values(dtype)
    return float(values[values <= eps].max())


def _low(dtype, shape, seed):
    x, delta, g, mask = make_inputs(shape, torch.float32, seed=seed)
    return x.to(dtype), delta.to(dtype), g.to(dtype), mask.to(dtype)


# ------------------------------------------------------------------ saliency and masks
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
def test_grad_magnitude_low_precision(backend, dtype, shape, p):
    _, _, g, _ = _low(dtype, shape, seed=1)
    reference = R.grad_magnitude(g.float(), p)
    g1 = g.clone().requires_grad_(True)
    out = ops.grad_magnitude(g1, p, backend=backend)
    assert out.dtype == dtype
    assert_close_report(out, reference.to(dtype), exact=True, what="rounded once")
    u = UNIT_ROUNDOFF[dtype]
    assert_close_report(out.float(), reference, rtol=u, atol=0.0, what="within half an ulp")
    upstream = torch.randn(out.shape, generator=_gen(2)).to(dtype)
    out.backward(upstream)
    g2 = g.float().requires_grad_(True)
    (g2.abs().sum(1) if p == 1 else g2.pow(2).sum(1).sqrt()).backward(upstream.float())
    # p=1: upstream * sign(g), exact; p=2: upstream * g / s, four roundings in the dtype.
    assert g1.grad.dtype == dtype
    assert_close_report(g1.grad.float(), torch.nan_to_num(g2.grad), rtol=4 * u,
                        atol=4 * u * float(upstream.abs().max()), what="grad_magnitude backward")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_mask_low_precision(backend, dtype, shape):
    n, _, h, w = shape
    s = torch.randn((n, h, w), generator=_gen(3)).to(dtype)  # rounding creates ties
    hw = h * w
    for k in sorted({1, hw // 10 + 1, hw // 2, hw}):
        out = ops.topk_mask(s, k, backend=backend)
        assert out.dtype == dtype
        assert_close_report(out, R.topk_mask(s.float(), k).to(dtype), exact=True, what=f"topk k={k}")
        assert torch.all(out.float().sum((1, 2, 3)) == k)  # exactly k per image, ties to the lower index


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("p", [1, 2])
def test_saliency_topk_mask_low_precision_equals_the_composition(backend, dtype, p):
    _, _, g, _ = _low(dtype, (2, 3, 17, 31), seed=4)
    g = torch.round(g * 8) / 8  # few distinct values: many ties after rounding
    for k in (1, 50, 263, 527):
        out = ops.saliency_topk_mask(g, k, p, backend=backend)
        composed = ops.topk_mask(ops.grad_magnitude(g, p, backend=backend), k, backend=backend)
        assert_close_report(out, composed, exact=True, what=f"fused vs composed k={k}")
        expected = R.topk_mask(R.grad_magnitude(g.float(), p).to(dtype).float(), k).to(dtype)
        assert_close_report(out, expected, exact=True, what=f"vs the float32 reference k={k}")
        assert torch.all(out.float().sum((1, 2, 3)) == k)


# ------------------------------------------------------------------ perturbations
def _assert_budget(out, x, mask, eps, what):
    o, xd = out.double(), x.double()
    assert float(o.abs().max()) <= eps, f"{what}: |delta| {float(o.abs().max())} > eps {eps}"
    assert float((xd + o).min()) >= 0.0 and float((xd + o).max()) <= 1.0, f"{what}: x + delta leaves [0, 1]"
    assert torch.all(o[(mask == 0).expand_as(o)] == 0), f"{what}: delta outside the mask"


def test_the_test_budgets_round_up_when_rounded_to_nearest():
    # Otherwise the budget tests below could not tell rounding down from rounding to nearest.
    for dtype in LOW:
        assert any(float(torch.tensor(eps, dtype=torch.float64).to(dtype)) > eps for eps in (EPS, 0.3))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_linf_project_low_precision(backend, dtype, shape):
    x, delta, _, mask = _low(dtype, shape, seed=5)
    u = UNIT_ROUNDOFF[dtype]
    for eps in (0.0, EPS, 0.3):
        out = ops.masked_linf_project(x, delta, mask, eps, backend=backend)
        assert out.dtype == dtype
        _assert_budget(out, x, mask, eps, f"eps={eps}")
        reference = R.masked_linf_project(x.float(), delta.float(), mask.float(), _budget(eps, dtype))
        assert_close_report(out.float(), reference, rtol=2 * u, atol=0.0, what=f"vs float32 eps={eps}")
    # Gradients: grad_out * mask, -grad_out or 0, exact in the dtype.
    upstream = torch.randn(shape, generator=_gen(6)).to(dtype)
    x1, d1 = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    ops.masked_linf_project(x1, d1, mask, EPS, backend=backend).backward(upstream)
    x2, d2 = x.float().requires_grad_(True), delta.float().requires_grad_(True)
    e = torch.tensor(_budget(EPS, dtype))
    torch.clamp(torch.clamp(d2 * mask.float(), -e, e), -x2, 1.0 - x2).backward(upstream.float())
    assert_close_report(d1.grad, d2.grad.to(dtype), exact=True, what="grad delta")
    assert_close_report(x1.grad, x2.grad.to(dtype), exact=True, what="grad x")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sign", [-1, 1])
def test_pgd_step_low_precision(backend, dtype, shape, sign):
    x, delta, g, mask = _low(dtype, shape, seed=7)
    u = UNIT_ROUNDOFF[dtype]
    alpha = 2 / 255
    out = ops.pgd_step(x, delta, g, mask, EPS, alpha, sign, backend=backend)
    assert out.dtype == dtype
    _assert_budget(out, x, mask, EPS, "pgd_step")
    reference = R.pgd_step(x.float(), delta.float(), g.float(), mask.float(), _budget(EPS, dtype), sign * alpha)
    assert_close_report(out.float(), reference, rtol=2 * u, atol=0.0, what="vs float32")
    d = delta.to(memory_format=torch.channels_last)  # in place, any layout, low precision
    ops.pgd_step(x, d, g, mask, EPS, alpha, sign, out=d, backend=backend)
    assert_close_report(d, out, exact=True, what="out=delta")


@pytest.mark.parametrize("dtype", LOW)
def test_rounding_never_crosses_the_box(backend, dtype):
    # x = 0.25 + one ulp: 1 - x lies halfway between two values of the dtype and rounds (to
    # even) up to 0.75, which would put x + delta above 1; the op takes the value below.
    ulp = float(torch.finfo(dtype).eps) * 0.25
    x = torch.full((1, 1, 4, 4), 0.25 + ulp, dtype=dtype)
    assert float(torch.tensor(1.0 - float(x[0, 0, 0, 0]), dtype=torch.float32).to(dtype)) == 0.75
    mask = torch.ones((1, 1, 4, 4), dtype=dtype)
    below = 0.75 - 2 * ulp  # the largest value of the dtype under 1 - x
    out = ops.masked_linf_project(x, torch.ones_like(x), mask, 0.9, backend=backend)
    assert torch.all(out.double() == below) and float((x.double() + out.double()).max()) <= 1.0
    step = ops.pgd_step(x, torch.full_like(x, 0.7), torch.ones_like(x), mask, 0.9, 0.2, sign=1, backend=backend)
    assert torch.all(step.double() == below)


def test_low_precision_out_variants_and_errors(backend):
    x, delta, g, mask = _low(torch.bfloat16, (2, 3, 9, 13), seed=8)
    m = torch.full((2, 1, 9, 13), 7.0, dtype=torch.bfloat16)
    ops.saliency_topk_mask(g, 11, out=m, backend=backend)
    assert_close_report(m, ops.saliency_topk_mask(g, 11, backend=backend), exact=True, what="out= bf16 mask")
    with pytest.raises(ValueError, match=r"^pgd_step: x contains NaN or inf$"):
        ops.pgd_step(x * float("inf"), delta, g, mask, EPS, EPS / 4, backend=backend)
    big = torch.full((1, 3, 4, 4), 40000.0, dtype=torch.float16)  # |g| sum 120000 > float16 max 65504
    with pytest.raises(ValueError, match=r"^grad_magnitude: g contains NaN or inf, or its saliency overflows "
                                         r"torch.float16$"):
        ops.grad_magnitude(big, backend=backend)
