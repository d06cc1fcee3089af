"""PyTorch reference backend: the executable specification of every fused op.

Every other backend (C++, Triton) must agree with these functions bit for bit on
float32 and float64. The arithmetic is therefore written out in a fixed order
(channel sums left to right, one rounding per IEEE operation) instead of relying
on reductions whose order PyTorch may choose.

Inputs arrive validated and contiguous (see ``salm_fast.ops._checks``); ``k`` is
already resolved to a pixel count and ``alpha`` already carries the PGD sign.
"""
from __future__ import annotations

import torch
from torch import Tensor

NAME = "torch"


def grad_magnitude(g: Tensor, p: int) -> Tensor:
    """N x C x H x W -> N x H x W: sum_c |g| (p=1) or sqrt(sum_c g*g) (p=2)."""
    if p == 1:
        acc = g[:, 0].abs()
        for c in range(1, g.shape[1]):
            acc = acc + g[:, c].abs()
        return acc
    acc = g[:, 0] * g[:, 0]
    for c in range(1, g.shape[1]):
        acc = acc + g[:, c] * g[:, c]
    return torch.sqrt(acc)


def topk_mask(s: Tensor, k: int) -> tuple[Tensor, bool]:
    """N x H x W saliency -> (N x 1 x H x W {0,1} mask, all_finite).

    Exactly ``k`` ones per image at the ``k`` largest saliencies; among equal values
    the lower flat index wins. -0.0 and +0.0 are equal (IEEE comparison). A stable
    descending sort gives exactly that order.
    """
    n, h, w = s.shape
    if not bool(torch.isfinite(s).all()):
        return s.new_empty((n, 1, h, w)), False
    flat = s.reshape(n, h * w)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat)
    mask.scatter_(1, order, 1.0)
    return mask.reshape(n, 1, h, w), True


def saliency_topk_mask(g: Tensor, k: int, p: int) -> tuple[Tensor, bool]:
    return topk_mask(grad_magnitude(g, p), k)


def masked_linf_project(x: Tensor, delta: Tensor, mask: Tensor, eps: float) -> Tensor:
    """clamp(clamp(delta * mask, -eps, eps), -x, 1 - x), elementwise, in the input dtype."""
    e = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
    d = torch.clamp(delta * mask, -e, e)
    return torch.clamp(d, -x, 1.0 - x)


def masked_linf_project_backward(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, grad_out: Tensor, need_x: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Subgradients of ``masked_linf_project`` as PyTorch's clamp defines them.

    clamp passes the gradient to its input where min <= input <= max (bounds
    inclusive) and to the active bound elsewhere. The box bounds are -x and 1 - x,
    so x receives -grad where the box clamp is active.
    """
    e = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
    d0 = delta * mask
    d1 = torch.clamp(d0, -e, e)
    in_eps = (d0 >= -e) & (d0 <= e)
    lo, hi = -x, 1.0 - x
    in_box = (d1 >= lo) & (d1 <= hi)
    zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
    grad_delta = torch.where(in_eps & in_box, grad_out * mask, zero)
    grad_x = torch.where(in_box, zero, -grad_out) if need_x else None
    return grad_delta, grad_x


def pgd_step(x: Tensor, delta: Tensor, g: Tensor, mask: Tensor, eps: float, alpha: float) -> Tensor:
    """project(delta + alpha * sign(g)); ``alpha`` is signed (negative = error-minimizing)."""
    a = torch.tensor(alpha, dtype=delta.dtype, device=delta.device)
    return masked_linf_project(x, delta + a * torch.sign(g), mask, eps)
