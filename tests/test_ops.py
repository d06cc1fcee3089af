"""Fused ops: every backend against the reference (outputs and gradients), invariants, bad input
(arguments and values), out= layouts and the backend choice.

One random input is built per case and cloned for each backend. Masks and the
projection are compared bit for bit: the backends do the same IEEE operations in
the same order, so there is no tolerance to hide behind.
"""
from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import salm_fast.ops as ops
from salm_fast.ops import _backends
from salm_fast.ops import _reference as ref

from .conftest import assert_close_report

BACKENDS = ["torch", "cpp", "triton"]
# (N, C, H, W): N = 1, C = 1 and 3, odd and non-square sizes, a 224 px image.
SHAPES = [(1, 1, 8, 8), (2, 3, 9, 13), (3, 1, 28, 28), (2, 3, 17, 31), (1, 3, 64, 64), (1, 3, 224, 224)]
DTYPES = [torch.float32, torch.float64]
EPS = 8 / 255


class R:
    """The reference backend, returning values instead of filling outputs."""

    @staticmethod
    def grad_magnitude(g, p):
        out = g.new_empty((g.shape[0], g.shape[2], g.shape[3]))
        ref.grad_magnitude(g, p, out)
        return out

    @staticmethod
    def topk_mask(s, k):
        out = s.new_empty((s.shape[0], 1, s.shape[1], s.shape[2]))
        assert ref.topk_mask(s, k, out)
        return out

    @staticmethod
    def masked_linf_project(x, delta, mask, eps):
        out = torch.empty_like(x)
        ref.masked_linf_project(x, delta, mask, eps, out)
        return out

    @staticmethod
    def pgd_step(x, delta, g, mask, eps, alpha):
        out = torch.empty_like(x)
        ref.pgd_step(x, delta, g, mask, eps, alpha, out)
        return out


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    status = ops.available_backends()[request.param]
    if not status.available:
        pytest.skip(f"backend {request.param} unavailable: {status.reason}")
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(shape, dtype, seed=0):
    """Images with exact 0/1 pixels, perturbations crossing eps and the box, a {0,1} mask."""
    gen = _gen(seed)
    n, c, h, w = shape
    x = torch.rand(shape, generator=gen, dtype=dtype)
    x[..., 0, :] = 0.0  # [0, 1] edges
    x[..., -1, :] = 1.0
    delta = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * 3 * EPS
    g = torch.randn(shape, generator=gen, dtype=dtype)
    g[g.abs() < 0.05] = 0.0  # sign(0) = 0 must be handled
    mask = (torch.rand((n, 1, h, w), generator=gen) < 0.3).to(dtype)
    return x, delta, g, mask


def test_reference_and_native_backends_are_available_here():
    status = ops.available_backends()
    assert status["torch"].available
    assert status["cpp"].available, status["cpp"].reason
    assert status["triton"].available, status["triton"].reason  # TRITON_INTERPRET=1 in conftest


# ------------------------------------------------------------------ grad_magnitude
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
def test_grad_magnitude_matches_reference(backend, shape, dtype, p):
    _, _, g, _ = make_inputs(shape, dtype)
    expected = R.grad_magnitude(g.clone(), p)
    g1 = g.clone().requires_grad_(True)
    out = ops.grad_magnitude(g1, p, backend=backend)
    assert out.shape == (shape[0], shape[2], shape[3])
    assert_close_report(out, expected, exact=True, what=f"grad_magnitude p={p}")
    upstream = torch.randn(out.shape, generator=_gen(1), dtype=dtype)
    out.backward(upstream)
    g2 = g.clone().requires_grad_(True)
    expected_autograd = (g2.abs().sum(1) if p == 1 else g2.pow(2).sum(1).sqrt())
    expected_autograd.backward(upstream)
    # Where the magnitude is 0, PyTorch's sqrt backward gives NaN; the op's subgradient is 0.
    expected_grad = torch.nan_to_num(g2.grad, nan=0.0)
    assert_close_report(g1.grad, expected_grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                        atol=1e-6 if dtype == torch.float32 else 1e-12, what="grad_magnitude backward")


@pytest.mark.parametrize("p", [1, 2])
def test_grad_magnitude_gradcheck(backend, p):
    g = torch.randn((2, 3, 5, 7), generator=_gen(3), dtype=torch.float64)
    g = (g + 0.1 * torch.sign(g)).requires_grad_(True)  # away from the kink at 0
    assert torch.autograd.gradcheck(lambda t: ops.grad_magnitude(t, p, backend=backend), (g,))


# ------------------------------------------------------------------ top-k masks
def _expected_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """Independent restatement of the tie rule: sort by (-value, flat index)."""
    n, h, w = s.shape
    out = torch.zeros(n, h * w, dtype=s.dtype)
    for i in range(n):
        vals = s[i].reshape(-1).tolist()
        order = sorted(range(h * w), key=lambda j: (-vals[j], j))[:k]
        out[i, order] = 1
    return out.reshape(n, 1, h, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_matches_reference(backend, shape, dtype):
    n, _, h, w = shape
    gen = _gen(5)
    s = torch.randn((n, h, w), generator=gen, dtype=dtype)
    hw = h * w
    for k in sorted({1, 2, hw // 10 + 1, hw // 2, hw - 1, hw} - {0}):
        expected = R.topk_mask(s.clone(), k)
        out = ops.topk_mask(s.clone(), k, backend=backend)
        assert_close_report(out, expected, exact=True, what=f"topk_mask k={k}")
        assert torch.all(out.sum(dim=(1, 2, 3)) == k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_tie_rule(backend, dtype):
    # All-equal saliency: the first k flat indices win.
    s = torch.full((2, 7, 9), 0.25, dtype=dtype)
    out = ops.topk_mask(s, 10, backend=backend)
    first = torch.zeros(2, 63, dtype=dtype)
    first[:, :10] = 1
    assert_close_report(out, first.reshape(2, 1, 7, 9), exact=True, what="all-equal ties")
    # Heavy ties, negative values and signed zeros (-0.0 == +0.0).
    vals = torch.tensor([-1.0, -0.0, 0.0, 0.5, 2.0], dtype=dtype)
    idx = torch.randint(0, 5, (3, 11, 13), generator=_gen(7))
    s = vals[idx]
    for k in (1, 7, 40, 77, 143):
        out = ops.topk_mask(s.clone(), k, backend=backend)
        assert_close_report(out, _expected_mask(s, k), exact=True, what=f"heavy ties k={k}")


def test_topk_mask_fraction_rounds_half_up_and_keeps_one(backend):
    s = torch.randn((2, 10, 10), generator=_gen(8))
    assert torch.all(ops.topk_mask(s, 0.125, backend=backend).sum((1, 2, 3)) == 13)  # 12.5 -> 13
    assert torch.all(ops.topk_mask(s, 0.001, backend=backend).sum((1, 2, 3)) == 1)
    assert torch.all(ops.topk_mask(s, 1.0, backend=backend).sum((1, 2, 3)) == 100)
    assert ops.resolve_k(0.1, 784) == 78 and ops.resolve_k(5, 784) == 5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
def test_saliency_topk_mask_equals_unfused_composition(backend, shape, dtype, p):
    _, _, g, _ = make_inputs(shape, dtype, seed=11)
    hw = shape[2] * shape[3]
    for k in (1, max(1, hw // 10), hw):
        expected = R.topk_mask(R.grad_magnitude(g.clone(), p), k)
        out = ops.saliency_topk_mask(g.clone(), k, p, backend=backend)
        assert_close_report(out, expected, exact=True, what=f"saliency_topk_mask k={k} p={p}")


def test_saliency_topk_mask_ties_from_integer_gradients(backend):
    g = torch.randint(-2, 3, (3, 3, 12, 10), generator=_gen(12)).float()
    for p in (1, 2):
        s = R.grad_magnitude(g, p)
        for k in (1, 30, 119, 120):
            out = ops.saliency_topk_mask(g.clone(), k, p, backend=backend)
            assert_close_report(out, _expected_mask(s, k), exact=True, what=f"integer g p={p} k={k}")


# ------------------------------------------------------------------ projection
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_linf_project_matches_reference(backend, shape, dtype):
    x, delta, _, mask = make_inputs(shape, dtype, seed=13)
    for eps in (0.0, EPS, 0.5):
        expected = R.masked_linf_project(x, delta, mask, eps)
        out = ops.masked_linf_project(x.clone(), delta.clone(), mask.clone(), eps, backend=backend)
        assert_close_report(out, expected, exact=True, what=f"masked_linf_project eps={eps}")


@pytest.mark.parametrize("shape", SHAPES[:5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_linf_project_gradients(backend, shape, dtype):
    x, delta, _, mask = make_inputs(shape, dtype, seed=17)
    # Exact kink points must follow clamp's inclusive rule too.
    delta.view(-1)[::7] = EPS
    upstream = torch.randn(shape, generator=_gen(18), dtype=dtype)

    x1, d1 = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    ops.masked_linf_project(x1, d1, mask, EPS, backend=backend).backward(upstream)

    # What PyTorch's own clamp gives for the same composition.
    x2, d2 = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    e = torch.tensor(EPS, dtype=dtype)
    torch.clamp(torch.clamp(d2 * mask, -e, e), -x2, 1.0 - x2).backward(upstream)
    assert_close_report(d1.grad, d2.grad, exact=True, what="grad delta")
    assert_close_report(x1.grad, x2.grad, exact=True, what="grad x")

    # Only delta requires grad: x gets none, delta's gradient is unchanged.
    d3 = delta.clone().requires_grad_(True)
    ops.masked_linf_project(x, d3, mask, EPS, backend=backend).backward(upstream)
    assert_close_report(d3.grad, d2.grad, exact=True, what="grad delta (x constant)")


def test_masked_linf_project_gradcheck(backend):
    gen = _gen(19)
    shape = (2, 3, 5, 6)
    x = (0.3 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64))
    x[0, 0, 0, :3] = torch.tensor([0.01, 0.99, 0.02], dtype=torch.float64)  # box clamp active
    # Magnitudes at eps/2 (inside) and 2 eps (clipped), never within 1e-3 of a kink.
    mag = torch.where(torch.rand(shape, generator=gen) < 0.5, 0.5 * EPS, 2 * EPS).to(torch.float64)
    delta = mag * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    delta[0, 0, 0, :3] = torch.tensor([-0.02, 0.02, -0.025], dtype=torch.float64)
    mask = (torch.rand((2, 1, 5, 6), generator=gen) < 0.6).to(torch.float64)
    mask[0, 0, 0, :3] = 1
    x.requires_grad_(True)
    delta.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.masked_linf_project(a, b, mask, EPS, backend=backend), (x, delta))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [-1, 1])
def test_pgd_step_matches_reference(backend, shape, dtype, sign):
    x, delta, g, mask = make_inputs(shape, dtype, seed=23)
    alpha = 2 / 255
    expected = R.pgd_step(x, delta, g, mask, EPS, sign * alpha)
    out = ops.pgd_step(x.clone(), delta.clone(), g.clone(), mask.clone(), EPS, alpha, sign, backend=backend)
    assert_close_report(out, expected, exact=True, what=f"pgd_step sign={sign}")
    # Direction: on the unclipped masked pixels, the step moves against (sign=-1) or with g.
    free = (mask.expand_as(x) > 0) & (g != 0) & (delta.abs() < EPS - alpha) & (x + delta > alpha) & (
        x + delta < 1 - alpha)
    moved = (out - delta)[free]
    assert torch.all(torch.sign(moved) == sign * torch.sign(g[free]))


def test_non_contiguous_and_channels_last_inputs(backend):
    x, delta, g, mask = make_inputs((2, 3, 12, 9), torch.float32, seed=29)
    cl = [t.to(memory_format=torch.channels_last) for t in (x, delta, g)]
    expected = R.pgd_step(x, delta, g, mask, EPS, -EPS / 4)
    out = ops.pgd_step(*cl[:2], cl[2], mask, EPS, EPS / 4, backend=backend)
    assert_close_report(out, expected, exact=True, what="channels_last pgd_step")
    gt = g.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous view, same values
    assert not gt.is_contiguous()
    assert_close_report(ops.saliency_topk_mask(gt, 0.2, backend=backend),
                        R.topk_mask(R.grad_magnitude(g, 1), ops.resolve_k(0.2, 108)),
                        exact=True, what="non-contiguous saliency_topk_mask")


# ------------------------------------------------------------------ invariants
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(8, 40), w=st.integers(8, 40),
    frac=st.floats(0.001, 1.0), eps=st.floats(0.0, 0.2), seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["torch", "cpp"]),
)
def test_budget_invariants_hold(n, c, h, w, frac, eps, seed, backend):
    gen = _gen(seed)
    x = torch.rand((n, c, h, w), generator=gen)
    g = torch.randn((n, c, h, w), generator=gen)
    delta = torch.randn((n, c, h, w), generator=gen)
    k = ops.resolve_k(frac, h * w)
    mask = ops.saliency_topk_mask(g, frac, backend=backend)
    assert torch.all(mask.sum(dim=(1, 2, 3)) == k)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for out in (ops.masked_linf_project(x, delta, mask, eps, backend=backend),
                ops.pgd_step(x, delta, g, mask, eps, eps / 4, backend=backend)):
        assert float(out.abs().max()) <= torch.tensor(eps, dtype=x.dtype).item()  # eps as the op rounds it
        assert torch.all(out[(mask == 0).expand_as(out)] == 0)
        adv = x + out
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        changed = (out != 0).any(dim=1)
        assert torch.all(changed.sum(dim=(1, 2)) <= k)


# ------------------------------------------------------------------ bad input
def _bad_cases():
    x = torch.rand(2, 3, 8, 8)
    m = torch.ones(2, 1, 8, 8)
    s = torch.rand(2, 8, 8)
    nan_s = s.clone()
    nan_s[1, 2, 3] = float("nan")
    inf_g = x.clone()
    inf_g[0, 1, 0, 0] = float("inf")
    return [
        (lambda: ops.grad_magnitude(torch.rand(3, 8, 8)), ValueError, r"grad_magnitude: g must have rank 4"),
        (lambda: ops.grad_magnitude(x, p=3), ValueError, r"p must be 1 or 2"),
        (lambda: ops.grad_magnitude(x.to(torch.int32)), TypeError, r"g must be a floating-point tensor"),
        (lambda: ops.grad_magnitude(x.numpy()), TypeError, r"g must be a torch.Tensor"),
        (lambda: ops.topk_mask(s, 0), ValueError, r"k must be between 1 and H\*W=64"),
        (lambda: ops.topk_mask(s, 65), ValueError, r"k must be between 1 and H\*W=64"),
        (lambda: ops.topk_mask(s, 1.5), ValueError, r"k as a fraction must be in \(0, 1\]"),
        (lambda: ops.topk_mask(s, 0.0), ValueError, r"k as a fraction must be in \(0, 1\]"),
        (lambda: ops.topk_mask(s, True), TypeError, r"k must be an int"),
        (lambda: ops.topk_mask(s, "10"), TypeError, r"k must be an int"),
        (lambda: ops.topk_mask(nan_s, 3), ValueError, r"topk_mask: s contains NaN or inf"),
        (lambda: ops.saliency_topk_mask(inf_g, 3), ValueError, r"saliency_topk_mask: g contains NaN or inf"),
        (lambda: ops.topk_mask(x, 3), ValueError, r"s must have rank 3"),
        (lambda: ops.masked_linf_project(x, x, m, -0.1), ValueError, r"eps must be a finite number >= 0"),
        (lambda: ops.masked_linf_project(x, x, m, float("nan")), ValueError, r"eps must be a finite"),
        (lambda: ops.masked_linf_project(x, x[:1], m, 0.1), ValueError, r"delta has shape \(1, 3, 8, 8\)"),
        (lambda: ops.masked_linf_project(x, x, m[:, :, :4], 0.1), ValueError, r"mask has shape"),
        (lambda: ops.masked_linf_project(x, x.double(), m, 0.1), TypeError, r"delta has dtype torch.float64"),
        (lambda: ops.pgd_step(x, x, x[:, :1], m, 0.1, 0.01), ValueError, r"pgd_step: g has shape"),
        (lambda: ops.pgd_step(x, x, x, m, 0.1, -0.01), ValueError, r"alpha must be a finite number >= 0"),
        (lambda: ops.pgd_step(x, x, x, m, 0.1, 0.01, sign=0), ValueError, r"sign must be -1"),
        (lambda: ops.grad_magnitude(x, backend="cuda"), ValueError, r"unknown backend"),
        (lambda: ops.grad_magnitude(x, backend=3), ValueError, r"unknown backend backend=3"),
        (lambda: ops.masked_linf_project(x, x, m, torch.tensor(0.1, device="meta")), TypeError,
         r"masked_linf_project: eps is a meta tensor, which has no value; pass a number"),
        (lambda: ops.topk_mask(s, torch.tensor(3, device="meta")), TypeError, r"topk_mask: k is a meta tensor"),
        (lambda: ops.pgd_step(x, x, x, m, 0.1, 0.01, out=x.numpy()), TypeError, r"out must be a torch.Tensor"),
        (lambda: ops.masked_linf_project(x, x, m.cfloat(), 0.1), TypeError, r"mask must be real"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    fn, exc, pattern = _bad_cases()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SALM_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend SALM_FAST_BACKEND='nonsense'"):
        ops.grad_magnitude(torch.rand(1, 1, 8, 8))
    monkeypatch.setenv("SALM_FAST_BACKEND", "torch")
    s = torch.rand(1, 1, 8, 8)
    assert torch.equal(ops.grad_magnitude(s), s[:, 0])


def test_triton_without_cuda_or_interpreter_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: triton is legitimately available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is unavailable: .*no CUDA device"):
        ops.grad_magnitude(torch.rand(1, 1, 8, 8), backend="triton")


def test_out_arguments_write_in_place(backend):
    x, delta, g, mask = make_inputs((2, 3, 10, 11), torch.float32, seed=31)
    expected = R.pgd_step(x, delta, g, mask, EPS, -EPS / 4)
    d = delta.clone()
    result = ops.pgd_step(x, d, g, mask, EPS, EPS / 4, out=d, backend=backend)
    assert result.data_ptr() == d.data_ptr()
    assert_close_report(d, expected, exact=True, what="pgd_step out=delta")
    m = torch.full((2, 1, 10, 11), 7.0)
    ops.saliency_topk_mask(g, 5, out=m, backend=backend)
    assert torch.all(m.sum((1, 2, 3)) == 5)
    with pytest.raises(ValueError, match=r"out has shape"):
        ops.pgd_step(x, delta, g, mask, EPS, 0.01, out=delta[:1], backend=backend)


# ------------------------------------------------------------------ never wrong silently: values
def _poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2 + 1] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["x", "delta"])
def test_nonfinite_images_and_perturbations_are_refused(backend, name, value):
    x, delta, g, mask = make_inputs((2, 3, 9, 13), torch.float32, seed=41)
    args = {"x": x, "delta": delta}
    args[name] = _poisoned(args[name], value)
    pattern = rf"^{{op}}: {name} contains NaN or inf$"
    with pytest.raises(ValueError, match=pattern.format(op="masked_linf_project")):
        ops.masked_linf_project(args["x"], args["delta"], mask, EPS, backend=backend)
    d = args["delta"].clone()
    with pytest.raises(ValueError, match=pattern.format(op="pgd_step")):
        ops.pgd_step(args["x"], d, g, mask, EPS, EPS / 4, out=d, backend=backend)
    assert_close_report(d, args["delta"], exact=True, what="out=delta after the refusal")  # nothing written


def test_pgd_step_refuses_nan_gradients_but_steps_along_infinite_ones(backend):
    x, delta, g, mask = make_inputs((2, 3, 9, 13), torch.float32, seed=43)
    d = delta.clone()
    with pytest.raises(ValueError, match=r"^pgd_step: g contains NaN \(its sign is undefined\)$"):
        ops.pgd_step(x, d, _poisoned(g, float("nan")), mask, EPS, EPS / 4, out=d, backend=backend)
    assert torch.equal(d, delta)  # checked before anything is written
    g_inf = _poisoned(g, float("inf"))
    expected = R.pgd_step(x, delta, g_inf, mask, EPS, -EPS / 4)
    assert_close_report(ops.pgd_step(x, delta, g_inf, mask, EPS, EPS / 4, backend=backend), expected, exact=True,
                        what="pgd_step with an infinite gradient")


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, float("nan"), float("inf")])
def test_masks_other_than_zero_one_are_refused(backend, value):
    x, delta, g, mask = make_inputs((2, 3, 9, 13), torch.float32, seed=47)
    bad = _poisoned(mask, value)
    with pytest.raises(ValueError, match=r"^masked_linf_project: mask must hold only 0 and 1 .*, found "):
        ops.masked_linf_project(x, delta, bad, EPS, backend=backend)
    d = delta.clone()
    with pytest.raises(ValueError, match=rf"^pgd_step: mask must hold only 0 and 1 .*, found {value!r}$"):
        ops.pgd_step(x, d, g, bad, EPS, EPS / 4, out=d, backend=backend)
    assert torch.equal(d, delta)


def test_bool_and_integer_masks_are_selections(backend):
    x, delta, g, mask = make_inputs((2, 3, 9, 13), torch.float32, seed=53)
    expected = R.masked_linf_project(x, delta, mask, EPS)
    for m in (mask.bool(), mask.to(torch.uint8), mask.to(torch.int64), mask.double()):
        assert_close_report(ops.masked_linf_project(x, delta, m, EPS, backend=backend), expected, exact=True,
                            what=f"mask of {m.dtype}")
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*, found 3$"):
        ops.masked_linf_project(x, delta, mask.to(torch.int64) * 3, EPS, backend=backend)


@pytest.mark.parametrize("p", [1, 2])
def test_grad_magnitude_refuses_nonfinite_saliency(backend, p):
    g = torch.randn((2, 3, 8, 8), generator=_gen(59))
    with pytest.raises(ValueError, match=r"^grad_magnitude: g contains NaN or inf, or its saliency overflows "
                                         r"torch.float32$"):
        ops.grad_magnitude(_poisoned(g, float("nan")), p, backend=backend)
    big = g.clone()
    big[1, :, 5, 5] = 3e38 if p == 1 else 3e19  # finite gradient, saliency beyond float32
    with np.errstate(over="ignore"):  # Triton's interpreter computes with numpy
        with pytest.raises(ValueError, match=r"saliency overflows torch.float32"):
            ops.grad_magnitude(big, p, backend=backend)
        with pytest.raises(ValueError, match=r"^saliency_topk_mask: g contains NaN or inf, or its saliency overflows"):
            ops.saliency_topk_mask(big, 3, p, backend=backend)


# ------------------------------------------------------------------ out= in any layout
def test_pgd_step_in_place_into_a_channels_last_delta(backend):
    # The README's idiom, pgd_step(..., out=delta), with a channels_last delta (as a channels_last model yields).
    x, delta, g, mask = make_inputs((2, 3, 12, 9), torch.float32, seed=61)
    expected = R.pgd_step(x, delta, g, mask, EPS, EPS / 4)
    d = delta.to(memory_format=torch.channels_last)
    ptr = d.data_ptr()
    result = ops.pgd_step(x, d, g, mask, EPS, EPS / 4, sign=1, out=d, backend=backend)
    assert result is d and d.data_ptr() == ptr
    assert d.is_contiguous(memory_format=torch.channels_last) and not d.is_contiguous()
    assert_close_report(d, expected, exact=True, what="pgd_step out=channels_last delta")
    cl = [t.to(memory_format=torch.channels_last) for t in (x, delta, g)]
    out = torch.empty_like(cl[0])
    ops.pgd_step(*cl, mask, EPS, EPS / 4, sign=1, out=out, backend=backend)
    assert_close_report(out, expected, exact=True, what="pgd_step all channels_last")


def test_masks_written_into_non_contiguous_out(backend):
    _, _, g, _ = make_inputs((3, 3, 10, 11), torch.float32, seed=67)
    expected = R.topk_mask(R.grad_magnitude(g, 1), 9)
    big = torch.full((3, 1, 10, 22), 7.0)
    view = big[..., ::2]  # every other column: strided
    assert not view.is_contiguous()
    ops.saliency_topk_mask(g, 9, out=view, backend=backend)
    assert_close_report(view, expected, exact=True, what="saliency_topk_mask into a strided out")
    assert torch.all(big[..., 1::2] == 7.0)
    view.fill_(7.0)
    ops.topk_mask(R.grad_magnitude(g, 1), 9, out=view, backend=backend)
    assert_close_report(view, expected, exact=True, what="topk_mask into a strided out")


def test_out_bumps_the_version_counter(backend):
    x, delta, g, mask = make_inputs((2, 3, 8, 8), torch.float32, seed=71)
    d = delta.clone()
    before = d._version
    ops.pgd_step(x, d, g, mask, EPS, EPS / 4, out=d, backend=backend)
    assert d._version > before  # autograd sees the in-place update of a saved tensor


# ------------------------------------------------------------------ backend choice
def test_use_backend_leaves_the_environment_alone_and_nests(monkeypatch):
    monkeypatch.delenv("SALM_FAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with ops.use_backend("torch"):
        assert "SALM_FAST_BACKEND" not in os.environ
        assert _backends.select("t", cpu).NAME == "torch"
        with ops.use_backend("cpp"):
            assert _backends.select("t", cpu).NAME == "cpp"
        assert _backends.select("t", cpu).NAME == "torch"
        assert _backends.select("t", cpu, "cpp").NAME == "cpp"  # backend= wins
        with ops.use_backend(None):
            assert _backends.select("t", cpu).NAME == "torch"
    assert _backends.select("t", cpu).NAME == "cpp"  # the CPU default again
    monkeypatch.setenv("SALM_FAST_BACKEND", "nonsense")
    with ops.use_backend("torch"):  # a use_backend block wins over the environment variable
        assert torch.equal(ops.grad_magnitude(torch.ones(1, 1, 2, 2)), torch.ones(1, 2, 2))


def test_use_backend_is_local_to_each_thread(monkeypatch):
    monkeypatch.delenv("SALM_FAST_BACKEND", raising=False)
    barrier = threading.Barrier(2, timeout=60)
    seen: dict[str, tuple[str, str]] = {}

    def worker(name: str) -> None:
        with ops.use_backend(name):
            barrier.wait()  # both threads are inside their own block now
            inside = _backends.select("t", torch.device("cpu")).NAME
            barrier.wait()
        seen[name] = (inside, _backends.select("t", torch.device("cpu")).NAME)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("torch", "cpp")]
    with ops.use_backend("torch"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen == {"torch": ("torch", "cpp"), "cpp": ("cpp", "cpp")}


def test_use_backend_is_local_to_each_asyncio_task(monkeypatch):
    monkeypatch.delenv("SALM_FAST_BACKEND", raising=False)

    async def task(name: str | None) -> list[str]:
        names = []
        with ops.use_backend(name):
            for _ in range(3):
                names.append(_backends.select("t", torch.device("cpu")).NAME)
                await asyncio.sleep(0)  # let the other tasks run inside their blocks
        return names

    async def main():
        return await asyncio.gather(task("torch"), task("cpp"), task(None))

    assert asyncio.run(main()) == [["torch"] * 3, ["cpp"] * 3, ["cpp"] * 3]


def test_check_backend_says_why_in_one_line(monkeypatch):
    assert ops.check_backend("torch") is None and ops.check_backend(None) is None
    with pytest.raises(ValueError, match=r"^unknown backend 'cuda'; choose one of torch, cpp, triton$"):
        ops.check_backend("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"^backend 'triton' is unavailable: no CUDA device"):
            ops.check_backend("triton")
        with pytest.raises(RuntimeError, match=r"^backend 'triton' is unavailable"):
            with ops.use_backend("triton"):
                pass
