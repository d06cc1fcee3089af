"""Fused ops of the protection loop, registered as ``torch.ops.salm_fast.<op>``.

All ops take images and gradients as N x C x H x W float tensors; masks are
N x 1 x H x W {0, 1} in the images' dtype and are shared by all channels.

>>> import torch, salm_fast.ops as ops
>>> x = torch.rand(4, 1, 28, 28); g = torch.randn_like(x)
>>> mask = ops.saliency_topk_mask(g, k=0.1)          # top 10% pixels per image
>>> delta = ops.pgd_step(x, torch.zeros_like(x), g, mask, eps=8/255, alpha=2/255)
>>> bool((delta.abs() <= 8/255).all()), int(mask.sum()) == 4 * 78
(True, True)

Backends (``backend=`` argument, :func:`use_backend` or ``SALM_FAST_BACKEND``): ``torch``
(reference), ``cpp`` (CPU), ``triton`` (CUDA); see :func:`available_backends`.

Each function here checks its Python arguments and calls the registered op
(:mod:`._library`), so the ops work under ``torch.compile``, ``torch.export`` and on meta
tensors (shapes only). Inputs are checked before anything is written: NaN/inf in images,
perturbations or saliencies, NaN in gradients and masks other than {0, 1} raise one-line
ValueErrors (cost: one extra read of each input; see each op). float16 and bfloat16 are
computed in float32 and rounded back within the budget (:mod:`._precision`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _checks as C
from . import _library
from ._backends import BACKENDS, BackendStatus, available_backends, backend_status, check_backend, use_backend

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "GradMagnitudeFunction",
    "MaskedLinfProjectFunction",
    "MaskedLinfProject",
    "SaliencyTopKMask",
    "available_backends",
    "backend_status",
    "check_backend",
    "grad_magnitude",
    "masked_linf_project",
    "pgd_step",
    "resolve_k",
    "saliency_topk_mask",
    "topk_mask",
    "use_backend",
]


def resolve_k(k: int | float, hw: int) -> int:
    """The pixel count that ``k`` (int pixels or float fraction of ``hw``) stands for."""
    return C.resolve_k("resolve_k", k, hw)


def _backend_arg(op: str, backend: object) -> str | None:
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"{op}: unknown backend backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _tensors(op: str, **named: object) -> None:
    for name, t in named.items():
        C.check_is_tensor(op, name, t)


# ---------------------------------------------------------------- grad_magnitude
def grad_magnitude(g: Tensor, p: int = 1, *, backend: str | None = None) -> Tensor:
    """Per-pixel gradient magnitude (saliency), N x C x H x W -> N x H x W.

    ``p=1``: sum over channels of |g|; ``p=2``: sqrt of the sum of squares.
    Differentiable with respect to ``g``. A NaN/inf saliency (g holds NaN/inf, or the sum
    overflows the dtype) raises ValueError; the check reads the N x H x W output once.
    """
    op = "grad_magnitude"
    _tensors(op, g=g)
    return torch.ops.salm_fast.grad_magnitude(g, C.check_p(op, p), _backend_arg(op, backend))


class GradMagnitudeFunction(torch.autograd.Function):
    """:func:`grad_magnitude` as an autograd Function (``.apply(g, p, backend)``).

    Kept for code that calls it; the function itself is already differentiable.
    """

    @staticmethod
    def forward(ctx, g: Tensor, p: int, backend: str | None) -> Tensor:  # type: ignore[override]
        s = grad_magnitude(g, p, backend=backend)
        ctx.p = C.check_p("grad_magnitude", p)
        ctx.save_for_backward(g, s)
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s: Tensor):  # type: ignore[override]
        g, s = ctx.saved_tensors
        return _library.grad_magnitude_backward(g, s, ctx.p, grad_s), None, None


# ---------------------------------------------------------------- top-k masks
def topk_mask(s: Tensor, k: int | float, *, out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """N x H x W saliency -> N x 1 x H x W {0,1} mask with exactly k ones per image.

    The k largest saliencies of each image win; equal saliencies go to the lower
    flat index (h * W + w), so every backend gives the same mask bit for bit.
    ``k``: int pixel count in [1, H*W], or float fraction in (0, 1] (rounded half
    up, at least 1 pixel). Not differentiable (the mask is a selection). NaN/inf in
    ``s`` raise ValueError (found by the ranking kernel itself, no extra pass); ``out``
    (any layout) is then left unspecified.
    """
    op = "topk_mask"
    _tensors(op, s=s)
    k, backend = C.check_k(op, k), _backend_arg(op, backend)
    if out is None:
        return torch.ops.salm_fast.topk_mask(s, k, backend)
    _tensors(op, out=out)
    torch.ops.salm_fast.topk_mask_out(s, k, backend, out)
    return out


def saliency_topk_mask(
    g: Tensor, k: int | float, p: int = 1, *, out: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """Fused ``topk_mask(grad_magnitude(g, p), k)``: gradient in, mask out.

    The C++ and Triton backends never materialize the N x H x W saliency; the
    result is bit-identical to the unfused composition (in every dtype). A NaN/inf
    saliency raises ValueError, found by the kernel itself (no extra pass).
    """
    op = "saliency_topk_mask"
    _tensors(op, g=g)
    k, p, backend = C.check_k(op, k), C.check_p(op, p), _backend_arg(op, backend)
    if out is None:
        return torch.ops.salm_fast.saliency_topk_mask(g, k, p, backend)
    _tensors(op, out=out)
    torch.ops.salm_fast.saliency_topk_mask_out(g, k, p, backend, out)
    return out


# ---------------------------------------------------------------- projection
def masked_linf_project(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, *, backend: str | None = None
) -> Tensor:
    """Restrict ``delta`` to ``mask``, clip it to [-eps, eps] and keep x + delta in [0, 1].

    delta' = clamp(clamp(delta * mask, -eps, eps), -x, 1 - x). Differentiable with respect
    to ``delta`` (a generator trains through it) and ``x``: the subgradients PyTorch's clamp
    defines (bounds inclusive); ``mask`` and ``eps`` get none. ``mask``: N x 1 x H x W of
    any real dtype holding only 0 and 1. NaN/inf in ``x`` or ``delta`` and any other mask
    value raise ValueError before anything is computed (cost: one extra read of x, delta
    and mask).
    """
    op = "masked_linf_project"
    _tensors(op, x=x, delta=delta, mask=mask)
    return torch.ops.salm_fast.masked_linf_project(x, delta, mask, C.check_eps(op, eps), _backend_arg(op, backend))


class MaskedLinfProjectFunction(torch.autograd.Function):
    """:func:`masked_linf_project` as an autograd Function (``.apply(x, delta, mask, eps, backend)``).

    Kept for code that calls it; the function itself is already differentiable.
    """

    @staticmethod
    def forward(ctx, x, delta, mask, eps, backend):  # type: ignore[override]
        out = masked_linf_project(x, delta, mask, eps, backend=backend)
        ctx.eps = C.check_eps("masked_linf_project", eps)
        ctx.backend = _library.resolved_backend("masked_linf_project", x, backend)
        ctx.save_for_backward(x, delta, mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_x, grad_delta = _library.masked_linf_project_autograd_grads(ctx, grad_out)
        return grad_x, grad_delta, None, None, None


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
    (error-maximizing / adversarial). No autograd graph. ``out`` (shaped like x, any
    layout: a channels_last one is filled through a contiguous temporary) receives the
    result; ``out=delta`` updates the perturbation in place. NaN/inf in ``x`` or
    ``delta``, NaN in ``g`` (its sign is undefined; inf is a direction) and mask values
    other than 0 and 1 raise ValueError before anything is written (cost: one extra read
    of x, delta, g and mask: on the CPU one vectorized pass per tensor, no allocation; one
    thread of a 2-core CPU: +40% for a 64 x 3 x 28 x 28 batch in cache, +90% for a memory-bound
    256 x 3 x 64 x 64 one, 0.1% of a SALM protection run; elsewhere one reduction per tensor and one
    host synchronization).
    """
    op = "pgd_step"
    _tensors(op, x=x, delta=delta, g=g, mask=mask)
    eps, alpha = C.check_eps(op, eps), C.check_eps(op, alpha, "alpha")
    sign, backend = C.check_sign(op, sign), _backend_arg(op, backend)
    if out is None:
        return torch.ops.salm_fast.pgd_step(x, delta, g, mask, eps, alpha, sign, backend)
    _tensors(op, out=out)
    torch.ops.salm_fast.pgd_step_out(x, delta, g, mask, eps, alpha, sign, backend, out)
    return out


# ---------------------------------------------------------------- nn.Module wrappers
class SaliencyTopKMask(nn.Module):
    """Gradient in, top-k saliency mask out: :func:`saliency_topk_mask` as a module.

    ``k``: int pixels or float fraction of H*W per image; ``p``: 1 (sum of |g| over
    channels) or 2 (L2 norm). No parameters or buffers; forward(g: N x C x H x W) ->
    N x 1 x H x W {0, 1} mask with exactly k ones per image.

    >>> mask = SaliencyTopKMask(k=0.1)(torch.randn(2, 3, 28, 28))
    >>> mask.shape, int(mask.sum())
    (torch.Size([2, 1, 28, 28]), 156)
    """

    def __init__(self, k: int | float, p: int = 1, *, backend: str | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.k = C.check_k(name, k)
        C.resolve_k(name, self.k, 1 << 62)  # the fraction's range now; an int k meets H*W at forward
        self.p = C.check_p(name, p)
        check_backend(backend)
        self.backend = backend

    def forward(self, g: Tensor) -> Tensor:
        return saliency_topk_mask(g, self.k, self.p, backend=self.backend)

    def extra_repr(self) -> str:
        return f"k={self.k!r}, p={self.p}" + (f", backend={self.backend!r}" if self.backend else "")


class MaskedLinfProject(nn.Module):
    """The L-inf budget as a module: :func:`masked_linf_project` with a fixed ``eps``.

    forward(x, delta, mask) -> delta restricted to the {0, 1} mask, clipped to [-eps, eps]
    and cut so that x + delta stays in [0, 1]; differentiable in x and delta (e.g. the
    last layer of a noise generator). No parameters or buffers.

    >>> project = MaskedLinfProject(eps=8 / 255)
    >>> x = torch.rand(2, 1, 8, 8); mask = torch.ones(2, 1, 8, 8)
    >>> bool((project(x, torch.randn_like(x), mask).abs() <= 8 / 255).all())
    True
    """

    def __init__(self, eps: float, *, backend: str | None = None) -> None:
        super().__init__()
        self.eps = C.check_eps(type(self).__name__, eps)
        check_backend(backend)
        self.backend = backend

    def forward(self, x: Tensor, delta: Tensor, mask: Tensor) -> Tensor:
        return masked_linf_project(x, delta, mask, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps!r}" + (f", backend={self.backend!r}" if self.backend else "")
