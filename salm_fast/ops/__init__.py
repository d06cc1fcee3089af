"""Fused ops of the protection loop, as PyTorch autograd functions.

All ops take images and gradients as N x C x H x W float tensors; masks are
N x 1 x H x W {0, 1} in the images' dtype and are shared by all channels.

>>> import torch, salm_fast.ops as ops
>>> x = torch.rand(4, 1, 28, 28); g = torch.randn_like(x)
>>> mask = ops.saliency_topk_mask(g, k=0.1)          # top 10% pixels per image
>>> delta = ops.pgd_step(x, torch.zeros_like(x), g, mask, eps=8/255, alpha=2/255)
>>> bool((delta.abs() <= 8/255).all()), int(mask.sum()) == 4 * 78
(True, True)

Backends (``backend=`` argument or ``SALM_FAST_BACKEND``): ``torch`` (reference),
``cpp`` (CPU), ``triton`` (CUDA); see :func:`available_backends`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks as C
from ._backends import BACKENDS, ENV_VAR, BackendStatus, available_backends, backend_status, select

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "GradMagnitudeFunction",
    "MaskedLinfProjectFunction",
    "available_backends",
    "grad_magnitude",
    "masked_linf_project",
    "pgd_step",
    "resolve_k",
    "saliency_topk_mask",
    "topk_mask",
    "use_backend",
]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed code with every op forced onto backend ``name`` (None: the default).

    Checks up front that the backend can run here, so a long job fails before it starts.
    """
    if name is None:
        yield
        return
    status = backend_status(name)  # raises on an unknown name
    if not status.available:
        raise RuntimeError(f"backend {name!r} is unavailable: {status.reason}")
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


def resolve_k(k: int | float, hw: int) -> int:
    """The pixel count that ``k`` (int pixels or float fraction of ``hw``) stands for."""
    return C.resolve_k("resolve_k", k, hw)


# ---------------------------------------------------------------- grad_magnitude
class GradMagnitudeFunction(torch.autograd.Function):
    """Per-pixel saliency s = sum_c |g| (p=1) or sqrt(sum_c g^2) (p=2); N x C x H x W -> N x H x W."""

    @staticmethod
    def forward(ctx, g: Tensor, p: int, backend: str | None) -> Tensor:  # type: ignore[override]
        op = "grad_magnitude"
        C.check_tensor(op, "g", g, 4)
        p = C.check_p(op, p)
        impl = select(op, g.device, backend)
        C.check_dtype_for_backend(op, impl.NAME, g)
        g = g.contiguous()
        s = g.new_empty((g.shape[0], g.shape[2], g.shape[3]))
        impl.grad_magnitude(g.detach(), p, s)
        ctx.p = p
        ctx.save_for_backward(g, s)
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s: Tensor):  # type: ignore[override]
        g, s = ctx.saved_tensors
        gs = grad_s.unsqueeze(1)
        if ctx.p == 1:
            return gs * torch.sign(g), None, None
        # d sqrt(sum g^2)/dg = g / s; the subgradient 0 is used where s == 0.
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
        return torch.where(s.unsqueeze(1) > 0, gs * g / safe, torch.zeros_like(g)), None, None


def grad_magnitude(g: Tensor, p: int = 1, *, backend: str | None = None) -> Tensor:
    """Per-pixel gradient magnitude (saliency), N x C x H x W -> N x H x W.

    ``p=1``: sum over channels of |g|; ``p=2``: sqrt of the sum of squares.
    Differentiable with respect to ``g``.
    """
    return GradMagnitudeFunction.apply(g, p, backend)


# ---------------------------------------------------------------- top-k masks
def _mask_out(op: str, ref: Tensor, n: int, h: int, w: int, out: Tensor | None) -> Tensor:
    if out is None:
        return ref.new_empty((n, 1, h, w))
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    C.check_same(op, "the input", ref, "out", out, (n, 1, h, w))
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    return out


def _finish_mask(op: str, finite: bool, name: str, mask: Tensor) -> Tensor:
    if not finite:
        raise ValueError(f"{op}: {name} contains NaN or inf; the saliency ranking is undefined")
    return mask


def topk_mask(s: Tensor, k: int | float, *, out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """N x H x W saliency -> N x 1 x H x W {0,1} mask with exactly k ones per image.

    The k largest saliencies of each image win; equal saliencies go to the lower
    flat index (h * W + w), so every backend gives the same mask bit for bit.
    ``k``: int pixel count in [1, H*W], or float fraction in (0, 1] (rounded half
    up, at least 1 pixel). Not differentiable (the mask is a selection).
    """
    op = "topk_mask"
    C.check_tensor(op, "s", s, 3)
    impl = select(op, s.device, backend)
    C.check_dtype_for_backend(op, impl.NAME, s)
    n, h, w = s.shape
    kk = C.resolve_k(op, k, h * w)
    mask = _mask_out(op, s, n, h, w, out)
    with torch.no_grad():
        return _finish_mask(op, impl.topk_mask(s.detach().contiguous(), kk, mask), "s", mask)


def saliency_topk_mask(
    g: Tensor, k: int | float, p: int = 1, *, out: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """Fused ``topk_mask(grad_magnitude(g, p), k)``: gradient in, mask out.

    The C++ and Triton backends never materialize the N x H x W saliency; the
    result is bit-identical to the unfused composition.
    """
    op = "saliency_topk_mask"
    C.check_tensor(op, "g", g, 4)
    p = C.check_p(op, p)
    impl = select(op, g.device, backend)
    C.check_dtype_for_backend(op, impl.NAME, g)
    n, _, h, w = g.shape
    kk = C.resolve_k(op, k, h * w)
    mask = _mask_out(op, g, n, h, w, out)
    with torch.no_grad():
        return _finish_mask(op, impl.saliency_topk_mask(g.detach().contiguous(), kk, p, mask), "g", mask)


# ---------------------------------------------------------------- projection
def _check_project(op: str, x: Tensor, delta: Tensor, mask: Tensor, eps: object, backend: str | None):
    C.check_tensor(op, "x", x, 4)
    C.check_tensor(op, "delta", delta, 4)
    C.check_same(op, "x", x, "delta", delta, tuple(x.shape))
    mask = C.check_mask(op, x, mask)
    eps = C.check_eps(op, eps)
    impl = select(op, x.device, backend)
    C.check_dtype_for_backend(op, impl.NAME, x)
    return impl, mask, eps


class MaskedLinfProjectFunction(torch.autograd.Function):
    """delta' = clamp(clamp(delta * mask, -eps, eps), -x, 1 - x).

    Gradients: to ``delta`` and ``x``, the subgradients PyTorch's clamp defines
    (bounds inclusive); ``mask`` and ``eps`` get none.
    """

    @staticmethod
    def forward(ctx, x, delta, mask, eps, backend):  # type: ignore[override]
        impl, mask, eps = _check_project("masked_linf_project", x, delta, mask, eps, backend)
        x, delta = x.contiguous(), delta.contiguous()
        ctx.impl, ctx.eps = impl, eps
        ctx.save_for_backward(x, delta, mask)
        out = torch.empty_like(delta, memory_format=torch.contiguous_format)
        impl.masked_linf_project(x.detach(), delta.detach(), mask, eps, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta, mask = ctx.saved_tensors
        grad_delta = torch.empty_like(delta)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        ctx.impl.masked_linf_project_backward(x, delta, mask, ctx.eps, grad_out.contiguous(), grad_delta, grad_x)
        return grad_x, grad_delta, None, None, None


def masked_linf_project(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, *, backend: str | None = None
) -> Tensor:
    """Restrict ``delta`` to ``mask``, clip it to [-eps, eps] and keep x + delta in [0, 1].

    Differentiable with respect to ``delta`` (a generator trains through it) and ``x``.
    """
    return MaskedLinfProjectFunction.apply(x, delta, mask, eps, backend)


def pgd_step(
    x: Tensor,
    delta: Tensor,
    g: Tensor,
    mask: Tensor,
    eps: float,
    alpha: float,
    sign: int = -1,
    *,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """One fused PGD step: ``masked_linf_project(x, delta + sign * alpha * sign(g), mask, eps)``.

    ``sign=-1`` descends the loss (error-minimizing noise), ``sign=+1`` ascends it
    (error-maximizing / adversarial). No autograd graph. ``out`` (contiguous, shaped
    like x) receives the result; ``out=delta`` updates the perturbation in place.
    """
    op = "pgd_step"
    impl, mask, eps = _check_project(op, x, delta, mask, eps, backend)
    C.check_tensor(op, "g", g, 4)
    C.check_same(op, "x", x, "g", g, tuple(x.shape))
    alpha = C.check_eps(op, alpha, "alpha")
    if sign not in (-1, 1) or isinstance(sign, bool):
        raise ValueError(f"{op}: sign must be -1 (minimize the loss) or +1 (maximize it), got {sign!r}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
        C.check_same(op, "x", x, "out", out, tuple(x.shape))
        if not out.is_contiguous():
            raise ValueError(f"{op}: out must be contiguous (out=delta needs a contiguous delta)")
    with torch.no_grad():
        impl.pgd_step(x.detach().contiguous(), delta.detach().contiguous(), g.detach().contiguous(), mask, eps,
                      sign * alpha, out.detach())
    return out
