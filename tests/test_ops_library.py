"""The ops as torch.library ops: registration checks, meta/fake tensors, torch.compile, tracing, modules.

``torch.library.opcheck`` runs PyTorch's own consistency tests on every registered op
(schema and mutation, autograd registration, fake kernel against the real one, AOT
dispatch). The compile tests run a small protection step eagerly and compiled and
compare outputs and gradients bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import salm_fast.ops as ops
from salm_fast.ops import _reference as ref

from .conftest import assert_close_report

EPS = 8 / 255
OPS = ["grad_magnitude", "topk_mask", "topk_mask_out", "saliency_topk_mask", "saliency_topk_mask_out",
       "masked_linf_project", "masked_linf_project_backward", "pgd_step", "pgd_step_out"]


def _inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, 5, 6)
    x = torch.rand(shape, generator=gen, dtype=dtype)
    delta = (torch.rand(shape, generator=gen, dtype=dtype) - 0.5) * 4 * EPS
    g = torch.randn(shape, generator=gen, dtype=dtype)
    mask = (torch.rand((2, 1, 5, 6), generator=gen) < 0.5).to(dtype)
    return x, delta, g, mask


def _opcheck_cases():
    x, delta, g, mask = _inputs()
    s = g.abs().sum(1)
    m_out = torch.empty((2, 1, 5, 6), dtype=torch.float64)
    return {
        "grad_magnitude": (g.clone().requires_grad_(True), 2, None),
        "topk_mask": (s, 7, None),
        "topk_mask_out": (s, 0.2, "torch", m_out.clone()),
        "saliency_topk_mask": (g, 7, 1, None),
        "saliency_topk_mask_out": (g, 0.3, 2, "cpp", m_out.clone()),
        "masked_linf_project": (x.clone().requires_grad_(True), delta.clone().requires_grad_(True), mask, EPS, None),
        "masked_linf_project_backward": (x, delta, mask, EPS, torch.randn_like(x), True, None),
        "pgd_step": (x, delta, g, mask, EPS, EPS / 4, -1, None),
        "pgd_step_out": (x, delta, g, mask, EPS, EPS / 4, 1, None, torch.empty_like(x)),
    }


@pytest.mark.parametrize("name", OPS)
def test_registered_op_passes_opcheck(name):
    op = getattr(torch.ops.salm_fast, name)
    torch.library.opcheck(op, _opcheck_cases()[name], raise_exception=True)


def test_public_functions_run_the_registered_ops():
    x, delta, g, mask = _inputs(torch.float32)
    graph = make_fx(lambda x, d, g, m: ops.pgd_step(x, ops.masked_linf_project(x, d, m, EPS), g,
                                                    ops.saliency_topk_mask(g, 0.2), EPS, EPS / 4))(x, delta, g, mask)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == ["salm_fast.masked_linf_project.default", "salm_fast.saliency_topk_mask.default",
                       "salm_fast.pgd_step.default"]


def test_meta_tensors_get_shapes_without_values():
    meta = torch.device("meta")
    x = torch.empty((4, 3, 28, 28), device=meta)
    m = torch.empty((4, 1, 28, 28), device=meta)
    with ops.use_backend("cpp"):  # a forced CPU backend is not consulted: a meta tensor has no data
        assert ops.grad_magnitude(x, 2).shape == (4, 28, 28)
        assert ops.topk_mask(torch.empty((4, 28, 28), device=meta), 0.1).shape == (4, 1, 28, 28)
        mask = ops.saliency_topk_mask(x, 10)
        assert mask.shape == (4, 1, 28, 28) and mask.device == meta
        assert ops.masked_linf_project(x, x, m, EPS).shape == (4, 3, 28, 28)
        assert ops.pgd_step(x, x, x, m, EPS, EPS / 4, out=x) is x
        assert ops.pgd_step(x, x, x, m, EPS, EPS / 4, backend="cpp").shape == (4, 3, 28, 28)
    d = torch.empty((4, 3, 28, 28), device=meta, requires_grad=True)
    out = ops.masked_linf_project(x, d, m, EPS)
    assert out.requires_grad and out.shape == d.shape
    # Structural errors still come from the fake kernels, one line each.
    with pytest.raises(ValueError, match=r"^masked_linf_project: mask has shape \(4, 3, 28, 28\)"):
        ops.masked_linf_project(x, x, x, EPS)
    with pytest.raises(ValueError, match=r"^topk_mask: k must be between 1 and H\*W=784 pixels, got 785$"):
        ops.topk_mask(torch.empty((4, 28, 28), device=meta), 785)


def _protection_step(x, delta, g, eps):
    mask = ops.saliency_topk_mask(g, 0.25)
    projected = ops.masked_linf_project(x, delta, mask, eps)
    stepped = ops.pgd_step(x, projected.detach(), g, mask, eps, eps / 4)
    return projected * 2 + stepped


# Inductor's own import of torch.jit warns in torch 2.13; the warning is PyTorch's, not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compiled_step_matches_eager(compiler):
    # inductor compiles the graph around the ops to C++ with this machine's compiler (~15-45 s cold).
    x, delta, g, _ = _inputs(torch.float32, seed=3)
    d_eager = delta.clone().requires_grad_(True)
    expected = _protection_step(x, d_eager, g, EPS)
    expected.sum().backward()
    step = torch.compile(_protection_step, backend=compiler, fullgraph=True)
    d = delta.clone().requires_grad_(True)
    out = step(x, d, g, EPS)
    out.sum().backward()
    assert_close_report(out, expected, exact=True, what=f"{compiler} output")
    assert_close_report(d.grad, d_eager.grad, exact=True, what=f"{compiler} grad delta")


def test_compiled_graph_follows_use_backend_at_run_time(monkeypatch):
    calls, reference_pgd_step = [], ref.pgd_step
    monkeypatch.setattr(ref, "pgd_step", lambda *args: calls.append("torch") or reference_pgd_step(*args))
    x, delta, g, mask = _inputs(torch.float32, seed=5)
    step = torch.compile(lambda x, d, g, m: ops.pgd_step(x, d, g, m, EPS, EPS / 4), backend="aot_eager",
                         fullgraph=True)
    default = step(x, delta, g, mask)
    assert calls == []  # cpp, the CPU default
    with ops.use_backend("torch"):
        forced = step(x, delta, g, mask)
    assert calls == ["torch"]
    assert_close_report(forced, default, exact=True, what="same bits on either backend")



def test_values_are_checked_when_a_compiled_graph_runs():
    x, delta, g, mask = _inputs(torch.float32, seed=7)
    step = torch.compile(lambda x, d, g, m: ops.pgd_step(x, d, g, m, EPS, EPS / 4), backend="aot_eager",
                         fullgraph=True)
    step(x, delta, g, mask)
    with pytest.raises(ValueError, match=r"pgd_step: mask must hold only 0 and 1"):
        step(x, delta, g, mask * 2)


# ------------------------------------------------------------------ nn.Module wrappers
def test_saliency_topk_mask_module():
    _, _, g, _ = _inputs(torch.float32, seed=9)
    module = ops.SaliencyTopKMask(k=0.2, p=2)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert repr(module) == "SaliencyTopKMask(k=0.2, p=2)"
    assert_close_report(module(g), ops.saliency_topk_mask(g, 0.2, 2), exact=True, what="module vs function")
    assert torch.all(module(g).sum((1, 2, 3)) == ops.resolve_k(0.2, 30))
    assert torch.equal(ops.SaliencyTopKMask(5, backend="torch")(g), ops.saliency_topk_mask(g, 5))
    with pytest.raises(ValueError, match=r"^SaliencyTopKMask: k as a fraction must be in \(0, 1\], got 1.5$"):
        ops.SaliencyTopKMask(1.5)
    with pytest.raises(ValueError, match=r"^SaliencyTopKMask: p must be 1 or 2, got 3$"):
        ops.SaliencyTopKMask(5, p=3)
    with pytest.raises(ValueError, match=r"^saliency_topk_mask: k must be between 1 and H\*W=30 pixels, got 31$"):
        ops.SaliencyTopKMask(31)(g)
    with pytest.raises(ValueError, match=r"^unknown backend 'gpu'"):
        ops.SaliencyTopKMask(5, backend="gpu")


def test_masked_linf_project_module_is_differentiable_and_keeps_the_budget():
    x, delta, _, mask = _inputs(torch.float32, seed=11)
    module = ops.MaskedLinfProject(eps=EPS)
    assert list(module.parameters()) == [] and repr(module) == f"MaskedLinfProject(eps={EPS!r})"
    d = delta.clone().requires_grad_(True)
    out = module(x, d, mask)
    assert_close_report(out, ops.masked_linf_project(x, delta, mask, EPS), exact=True, what="module vs function")
    values = out.detach()
    assert float(values.abs().max()) <= torch.tensor(EPS, dtype=torch.float32).item()
    assert float((x + values).min()) >= 0.0 and float((x + values).max()) <= 1.0
    assert torch.all(values[(mask == 0).expand_as(out)] == 0)
    out.sum().backward()
    inside = (mask.bool() & (delta.abs() < EPS)).expand_as(x) & (x + delta > 0) & (x + delta < 1)
    assert torch.all(d.grad[inside] == 1) and torch.all(d.grad[(mask == 0).expand_as(x)] == 0)
    with pytest.raises(ValueError, match=r"^MaskedLinfProject: eps must be a finite number >= 0, got -0.1$"):
        ops.MaskedLinfProject(-0.1)


def test_autograd_function_classes_still_work():
    x, delta, g, mask = _inputs(torch.float64, seed=13)
    gg = g.clone().requires_grad_(True)
    ops.GradMagnitudeFunction.apply(gg, 1, None).sum().backward()
    assert torch.equal(gg.grad, torch.sign(g))
    d1, d2 = delta.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    ops.MaskedLinfProjectFunction.apply(x, d1, mask, EPS, "cpp").sum().backward()
    ops.masked_linf_project(x, d2, mask, EPS).sum().backward()
    assert_close_report(d1.grad, d2.grad, exact=True, what="Function vs registered op gradient")


def test_export_keeps_the_ops_in_the_graph():
    class Protect(torch.nn.Module):
        def forward(self, x, delta, g):
            return ops.pgd_step(x, delta, g, ops.SaliencyTopKMask(0.2)(g), EPS, EPS / 4)

    x, delta, g, _ = _inputs(torch.float32, seed=15)
    exported = torch.export.export(Protect(), (x, delta, g))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == ["salm_fast.saliency_topk_mask.default", "salm_fast.pgd_step.default"]
    assert_close_report(exported.module()(x, delta, g), Protect()(x, delta, g), exact=True, what="exported")
