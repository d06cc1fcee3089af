"""The fused ops registered with ``torch.library`` as ``torch.ops.salm_fast.<op>``.

Registered ops are what ``torch.compile``, ``torch.export``, ``make_fx`` and meta / fake
tensors understand. Each op has

* a real kernel, for every device (``CompositeExplicitAutograd``): structural checks, the
  value checks (:func:`_checks.require_values`, before anything is written), the backend
  choice (:func:`_backends.select`, made when the kernel runs, so a compiled graph follows
  ``use_backend``) and the half-precision path (:mod:`._precision`);
* a fake kernel (also the meta kernel): the same structural checks, outputs of the right
  shape and dtype, no values read;
* an autograd formula where the op is differentiable (``grad_magnitude``,
  ``masked_linf_project``); the others fall through autograd (their outputs never
  require grad: a mask is a selection, a PGD step is an update).

Schemas (``k`` an int pixel count or a float fraction; ``sign`` -1 or +1)::

    grad_magnitude(Tensor g, int p, str? backend) -> Tensor
    topk_mask(Tensor s, Scalar k, str? backend) -> Tensor
    topk_mask_out(Tensor s, Scalar k, str? backend, Tensor(a!) out) -> ()
    saliency_topk_mask(Tensor g, Scalar k, int p, str? backend) -> Tensor
    saliency_topk_mask_out(Tensor g, Scalar k, int p, str? backend, Tensor(a!) out) -> ()
    masked_linf_project(Tensor x, Tensor delta, Tensor mask, float eps, str? backend) -> Tensor
    masked_linf_project_backward(Tensor x, Tensor delta, Tensor mask, float eps, Tensor grad_out,
                                 bool grad_x, str? backend) -> Tensor[]
    pgd_step(Tensor x, Tensor delta, Tensor g, Tensor mask, float eps, float alpha, int sign,
             str? backend) -> Tensor
    pgd_step_out(..., int sign, str? backend, Tensor(a!) out) -> ()   # out may be delta itself

The ``_out`` variants write into a caller's tensor of any layout (a non-contiguous one
through a contiguous temporary) and bump its version counter.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks as C
from . import _precision as P
from ._backends import select

_LIB = torch.library.Library("salm_fast", "DEF")

_SCHEMAS = {
    "grad_magnitude": "(Tensor g, int p, str? backend) -> Tensor",
    "topk_mask": "(Tensor s, Scalar k, str? backend) -> Tensor",
    "topk_mask_out": "(Tensor s, Scalar k, str? backend, Tensor(a!) out) -> ()",
    "saliency_topk_mask": "(Tensor g, Scalar k, int p, str? backend) -> Tensor",
    "saliency_topk_mask_out": "(Tensor g, Scalar k, int p, str? backend, Tensor(a!) out) -> ()",
    "masked_linf_project": "(Tensor x, Tensor delta, Tensor mask, float eps, str? backend) -> Tensor",
    "masked_linf_project_backward":
        "(Tensor x, Tensor delta, Tensor mask, float eps, Tensor grad_out, bool grad_x, str? backend) -> Tensor[]",
    "pgd_step": "(Tensor x, Tensor delta, Tensor g, Tensor mask, float eps, float alpha, int sign, str? backend)"
                " -> Tensor",
    "pgd_step_out": "(Tensor x, Tensor delta, Tensor g, Tensor mask, float eps, float alpha, int sign, str? backend,"
                    " Tensor(a!) out) -> ()",
}
for _name, _schema in _SCHEMAS.items():
    _LIB.define(_name + _schema)


def _register(name: str, real: Callable, fake: Callable, differentiable: bool = False) -> None:
    _LIB.impl(name, real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"salm_fast::{name}", fake, lib=_LIB)
    if not differentiable:
        _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")


# ---------------------------------------------------------------- structural checks
# Shared by the real and the fake kernels: no values are read.
def _mask_shape(t: Tensor) -> tuple[int, int, int, int]:
    return (t.shape[0], 1, t.shape[-2], t.shape[-1])


def _check_grad_magnitude(op: str, g: Tensor, p: int) -> None:
    C.check_tensor(op, "g", g, 4)
    C.check_p(op, p)


def _check_topk(op: str, s: Tensor, k: object, out: Tensor | None) -> int:
    C.check_tensor(op, "s", s, 3)
    if out is not None:
        C.check_same(op, "the input", s, "out", out, _mask_shape(s))
    return C.resolve_k(op, k, s.shape[1] * s.shape[2])


def _check_saliency_topk(op: str, g: Tensor, k: object, p: int, out: Tensor | None) -> int:
    _check_grad_magnitude(op, g, p)
    if out is not None:
        C.check_same(op, "the input", g, "out", out, _mask_shape(g))
    return C.resolve_k(op, k, g.shape[2] * g.shape[3])


def _check_project(op: str, x: Tensor, delta: Tensor, mask: Tensor, eps: float) -> float:
    C.check_tensor(op, "x", x, 4)
    C.check_tensor(op, "delta", delta, 4)
    C.check_same(op, "x", x, "delta", delta, tuple(x.shape))
    C.check_mask(op, x, mask)
    return C.check_eps(op, eps)


def _check_pgd(op: str, x, delta, g, mask, eps, alpha, sign, out) -> float:
    eps = _check_project(op, x, delta, mask, eps)
    C.check_tensor(op, "g", g, 4)
    C.check_same(op, "x", x, "g", g, tuple(x.shape))
    C.check_eps(op, alpha, "alpha")
    C.check_sign(op, sign)
    if out is not None:
        C.check_same(op, "x", x, "out", out, tuple(x.shape))
    return eps


# ---------------------------------------------------------------- shared real-kernel steps
def _prepare(*ts: Tensor) -> list[Tensor]:
    # The kernels read contiguous memory; detach(): they never record autograd.
    return [t.detach().contiguous() for t in ts]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if P.is_low_precision(dtype) else dtype


def _saliency_error(op: str, dtype: torch.dtype) -> ValueError:
    ranking = "" if op == "grad_magnitude" else "; the saliency ranking is undefined"
    return ValueError(f"{op}: g contains NaN or inf, or its saliency overflows {dtype}{ranking}")


def _saliency(impl, g: Tensor, p: int) -> Tensor:
    """N x H x W saliency of the contiguous g, in g's dtype (half precision: float32 rounded once)."""
    n, _, h, w = g.shape
    s = torch.empty((n, h, w), dtype=_compute_dtype(g.dtype), device=g.device)
    impl.grad_magnitude(g.to(s.dtype), p, s)
    return s.to(g.dtype)


def _mask_into(out: Tensor, fill: Callable[[Tensor], bool], dtype: torch.dtype) -> bool:
    """Let ``fill`` write a mask of ``dtype`` (contiguous) and land it in ``out``.

    ``out`` is written directly when it can be; otherwise (non-contiguous, half precision)
    through a temporary that is copied only if ``fill`` reports finite saliencies.
    """
    if out.is_contiguous() and out.dtype == dtype:
        return fill(out)
    buf = torch.empty(out.shape, dtype=dtype, device=out.device)
    finite = fill(buf)
    if finite:
        out.copy_(buf)  # 0 and 1 are exact in every dtype
    return finite


def _project_into(kernel: Callable, x: Tensor, inputs: list[Tensor], mask: Tensor, eps: float,
                  scalars: tuple, out: Tensor) -> None:
    """``kernel(x, *inputs, mask, eps, *scalars, out)`` for a projection kernel, any dtype and out layout.

    Half precision: float32 kernel on widened copies with the budget rounded down, the
    result rounded back without crossing a bound (:mod:`._precision`).
    """
    dtype = x.dtype
    mask = mask.to(_compute_dtype(dtype))
    if P.is_low_precision(dtype):
        x32 = x.float()
        result = torch.empty_like(x32)
        kernel(x32, *(t.float() for t in inputs), mask, P.budget(eps, dtype), *scalars, result)
        out.copy_(P.round_perturbation(result, x32, dtype))
        return
    buf = out if out.is_contiguous() else torch.empty_like(x)
    kernel(x, *inputs, mask, eps, *scalars, buf)
    if buf is not out:
        out.copy_(buf)


# ---------------------------------------------------------------- grad_magnitude
def _grad_magnitude_real(g: Tensor, p: int, backend: str | None) -> Tensor:
    op = "grad_magnitude"
    _check_grad_magnitude(op, g, p)
    impl = select(op, g.device, backend)
    (g,) = _prepare(g)
    with torch.no_grad():
        s = _saliency(impl, g, p)
    if not C.values_ok(s, C.FINITE):
        raise _saliency_error(op, g.dtype)
    return s


def _grad_magnitude_fake(g: Tensor, p: int, backend: str | None) -> Tensor:
    _check_grad_magnitude("grad_magnitude", g, p)
    return g.new_empty((g.shape[0], g.shape[2], g.shape[3]))


def grad_magnitude_backward(g: Tensor, s: Tensor, p: int, grad_s: Tensor) -> Tensor:
    """d s / d g: sign(g) (p=1); g / s (p=2), with the subgradient 0 where s == 0."""
    gs = grad_s.unsqueeze(1)
    if p == 1:
        return gs * torch.sign(g)
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    return torch.where(s.unsqueeze(1) > 0, gs * g / safe, torch.zeros_like(g))


def _grad_magnitude_setup(ctx, inputs, output) -> None:
    g, p, _ = inputs
    ctx.p = p
    ctx.save_for_backward(g, output)


def _grad_magnitude_autograd(ctx, grad_s: Tensor):
    g, s = ctx.saved_tensors
    return grad_magnitude_backward(g, s, ctx.p, grad_s), None, None


_register("grad_magnitude", _grad_magnitude_real, _grad_magnitude_fake, differentiable=True)
torch.library.register_autograd("salm_fast::grad_magnitude", _grad_magnitude_autograd,
                                setup_context=_grad_magnitude_setup, lib=_LIB)


# ---------------------------------------------------------------- top-k masks
def _topk_mask_into(s: Tensor, k: int, backend: str | None, out: Tensor) -> None:
    op = "topk_mask"
    impl = select(op, s.device, backend)
    (s,) = _prepare(s)
    cdt = _compute_dtype(s.dtype)
    with torch.no_grad():
        finite = _mask_into(out.detach(), lambda m: impl.topk_mask(s.to(cdt), k, m), cdt)
    torch.autograd.graph.increment_version(out)
    if not finite:
        raise ValueError(f"{op}: s contains NaN or inf; the saliency ranking is undefined")


def _topk_mask_out_real(s: Tensor, k, backend: str | None, out: Tensor) -> None:
    _topk_mask_into(s, _check_topk("topk_mask", s, k, out), backend, out)


def _topk_mask_real(s: Tensor, k, backend: str | None) -> Tensor:
    k = _check_topk("topk_mask", s, k, None)
    out = s.new_empty(_mask_shape(s))
    _topk_mask_into(s, k, backend, out)
    return out


def _topk_mask_fake(s: Tensor, k, backend: str | None) -> Tensor:
    _check_topk("topk_mask", s, k, None)
    return s.new_empty(_mask_shape(s))


def _topk_mask_out_fake(s: Tensor, k, backend: str | None, out: Tensor) -> None:
    _check_topk("topk_mask", s, k, out)


def _saliency_topk_mask_into(g: Tensor, k: int, p: int, backend: str | None, out: Tensor) -> None:
    op = "saliency_topk_mask"
    impl = select(op, g.device, backend)
    (g,) = _prepare(g)
    cdt = _compute_dtype(g.dtype)

    def fill(mask: Tensor) -> bool:
        if not P.is_low_precision(g.dtype):
            return impl.saliency_topk_mask(g, k, p, mask)
        # Rank the saliency as rounded to g's dtype: the unfused composition's result.
        return impl.topk_mask(_saliency(impl, g, p).to(cdt), k, mask)

    with torch.no_grad():
        finite = _mask_into(out.detach(), fill, cdt)
    torch.autograd.graph.increment_version(out)
    if not finite:
        raise _saliency_error(op, g.dtype)


def _saliency_topk_mask_out_real(g: Tensor, k, p: int, backend: str | None, out: Tensor) -> None:
    _saliency_topk_mask_into(g, _check_saliency_topk("saliency_topk_mask", g, k, p, out), p, backend, out)


def _saliency_topk_mask_real(g: Tensor, k, p: int, backend: str | None) -> Tensor:
    k = _check_saliency_topk("saliency_topk_mask", g, k, p, None)
    out = g.new_empty(_mask_shape(g))
    _saliency_topk_mask_into(g, k, p, backend, out)
    return out


def _saliency_topk_mask_fake(g: Tensor, k, p: int, backend: str | None) -> Tensor:
    _check_saliency_topk("saliency_topk_mask", g, k, p, None)
    return g.new_empty(_mask_shape(g))


def _saliency_topk_mask_out_fake(g: Tensor, k, p: int, backend: str | None, out: Tensor) -> None:
    _check_saliency_topk("saliency_topk_mask", g, k, p, out)


_register("topk_mask", _topk_mask_real, _topk_mask_fake)
_register("topk_mask_out", _topk_mask_out_real, _topk_mask_out_fake)
_register("saliency_topk_mask", _saliency_topk_mask_real, _saliency_topk_mask_fake)
_register("saliency_topk_mask_out", _saliency_topk_mask_out_real, _saliency_topk_mask_out_fake)


# ---------------------------------------------------------------- projection
def _masked_linf_project_real(x: Tensor, delta: Tensor, mask: Tensor, eps: float, backend: str | None) -> Tensor:
    op = "masked_linf_project"
    eps = _check_project(op, x, delta, mask, eps)
    impl = select(op, x.device, backend)
    x, delta, mask = _prepare(x, delta, mask)
    C.require_values(op, ("x", x, C.FINITE), ("delta", delta, C.FINITE), ("mask", mask, C.BINARY))
    out = torch.empty_like(x)
    with torch.no_grad():
        _project_into(impl.masked_linf_project, x, [delta], mask, eps, (), out)
    return out


def _masked_linf_project_fake(x: Tensor, delta: Tensor, mask: Tensor, eps: float, backend: str | None) -> Tensor:
    _check_project("masked_linf_project", x, delta, mask, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _masked_linf_project_backward_real(x: Tensor, delta: Tensor, mask: Tensor, eps: float, grad_out: Tensor,
                                       grad_x: bool, backend: str | None) -> list[Tensor]:
    op = "masked_linf_project_backward"
    eps = _check_project(op, x, delta, mask, eps)
    C.check_same(op, "x", x, "grad_out", grad_out, tuple(x.shape))
    impl = select(op, x.device, backend)
    x, delta, mask, grad_out = _prepare(x, delta, mask, grad_out)
    dtype, cdt = x.dtype, _compute_dtype(x.dtype)
    if cdt != dtype:
        x, delta, grad_out, eps = x.to(cdt), delta.to(cdt), grad_out.to(cdt), P.budget(eps, dtype)
    gd = torch.empty_like(x)
    gx = torch.empty_like(x) if grad_x else None
    with torch.no_grad():
        impl.masked_linf_project_backward(x, delta, mask.to(cdt), eps, grad_out, gd, gx)
    # grad_out * mask, -grad_out or 0: exact in the input dtype.
    return [gd.to(dtype), gx.to(dtype)] if gx is not None else [gd.to(dtype)]


def _masked_linf_project_backward_fake(x, delta, mask, eps, grad_out, grad_x, backend) -> list[Tensor]:
    op = "masked_linf_project_backward"
    _check_project(op, x, delta, mask, eps)
    C.check_same(op, "x", x, "grad_out", grad_out, tuple(x.shape))
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2 if grad_x else 1)]


def resolved_backend(op: str, t: Tensor, backend: str | None) -> str | None:
    """The backend name a real kernel would pick now (meta tensors: ``backend`` as given)."""
    return backend if t.device.type == "meta" else select(op, t.device, backend).NAME


def _masked_linf_project_setup(ctx, inputs, output) -> None:
    x, delta, mask, eps, backend = inputs
    # The backward runs on the backend the forward ran on, even outside its use_backend block.
    ctx.eps, ctx.backend = eps, resolved_backend("masked_linf_project", x, backend)
    ctx.save_for_backward(x, delta, mask)


def masked_linf_project_autograd_grads(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor]:
    """(grad_x or None, grad_delta) of masked_linf_project for a ctx holding x, delta, mask, eps, backend."""
    x, delta, mask = ctx.saved_tensors
    want_x = ctx.needs_input_grad[0]
    grads = torch.ops.salm_fast.masked_linf_project_backward(x, delta, mask, ctx.eps, grad_out, want_x, ctx.backend)
    return (grads[1] if want_x else None), grads[0]


def _masked_linf_project_autograd(ctx, grad_out: Tensor):
    grad_x, grad_delta = masked_linf_project_autograd_grads(ctx, grad_out)
    return grad_x, grad_delta, None, None, None


_register("masked_linf_project", _masked_linf_project_real, _masked_linf_project_fake, differentiable=True)
torch.library.register_autograd("salm_fast::masked_linf_project", _masked_linf_project_autograd,
                                setup_context=_masked_linf_project_setup, lib=_LIB)
_register("masked_linf_project_backward", _masked_linf_project_backward_real, _masked_linf_project_backward_fake)


# ---------------------------------------------------------------- pgd_step
def _pgd_step_into(x, delta, g, mask, eps: float, alpha: float, sign: int, backend: str | None,
                   out: Tensor) -> None:
    op = "pgd_step"
    impl = select(op, x.device, backend)
    x, delta, g, mask = _prepare(x, delta, g, mask)
    C.require_values(op, ("x", x, C.FINITE), ("delta", delta, C.FINITE), ("g", g, C.NOT_NAN),
                     ("mask", mask, C.BINARY))
    with torch.no_grad():
        _project_into(impl.pgd_step, x, [delta, g], mask, eps, (sign * alpha,), out.detach())
    torch.autograd.graph.increment_version(out)


def _pgd_step_out_real(x, delta, g, mask, eps: float, alpha: float, sign: int, backend: str | None,
                       out: Tensor) -> None:
    eps = _check_pgd("pgd_step", x, delta, g, mask, eps, alpha, sign, out)
    _pgd_step_into(x, delta, g, mask, eps, alpha, sign, backend, out)


def _pgd_step_real(x, delta, g, mask, eps: float, alpha: float, sign: int, backend: str | None) -> Tensor:
    eps = _check_pgd("pgd_step", x, delta, g, mask, eps, alpha, sign, None)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _pgd_step_into(x, delta, g, mask, eps, alpha, sign, backend, out)
    return out


def _pgd_step_fake(x, delta, g, mask, eps, alpha, sign, backend) -> Tensor:
    _check_pgd("pgd_step", x, delta, g, mask, eps, alpha, sign, None)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _pgd_step_out_fake(x, delta, g, mask, eps, alpha, sign, backend, out) -> None:
    _check_pgd("pgd_step", x, delta, g, mask, eps, alpha, sign, out)


_register("pgd_step", _pgd_step_real, _pgd_step_fake)
_register("pgd_step_out", _pgd_step_out_real, _pgd_step_out_fake)
