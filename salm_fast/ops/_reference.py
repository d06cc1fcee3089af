"""PyTorch reference backend: the executable specification of every fused op.

Every other backend (C++, Triton) must agree with these functions bit for bit on
float32 and float64. The arithmetic is therefore written out in a fixed order
(channel sums left to right, one rounding per IEEE operation) instead of relying
on reductions whose order PyTorch may choose.

Backend contract (shared by ``_cpp`` and ``_triton``): inputs arrive validated,
contiguous and of one dtype, float32 or float64 (the mask converted to it; half
precision widened, see ``_precision``); ``k`` is already a pixel count and ``alpha``
already carries the PGD sign. The dispatcher allocates every
output and the backend fills it; ``out`` may alias ``delta`` in ``pgd_step``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NAME = "torch"


def _sqrt_rn(a: Tensor) -> Tensor:
    """Correctly rounded sqrt. torch.sqrt on the CPU (vectorized, torch 2.13) is off by
    one ulp for ~15% of float32 inputs; NumPy's, C++'s std::sqrt and CUDA's are IEEE."""
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sqrt(a.numpy()))
    return torch.sqrt(a)


def _magnitude(g: Tensor, p: int) -> Tensor:
    if p == 1:
        acc = g[:, 0].abs()
        for c in range(1, g.shape[1]):
            acc = acc + g[:, c].abs()
        return acc
    acc = g[:, 0] * g[:, 0]
    for c in range(1, g.shape[1]):
        acc = acc + g[:, c] * g[:, c]
    return _sqrt_rn(acc)


def grad_magnitude(g: Tensor, p: int, out: Tensor) -> None:
    """N x C x H x W -> N x H x W: sum_c |g| (p=1) or sqrt(sum_c g*g) (p=2), c ascending."""
    out.copy_(_magnitude(g, p))


def topk_mask(s: Tensor, k: int, out: Tensor) -> bool:
    """N x H x W saliency -> N x 1 x H x W {0,1} mask in ``out``; returns False on NaN/inf.

    Exactly ``k`` ones per image at the ``k`` largest saliencies; among equal values
    the lower flat index wins. -0.0 and +0.0 are equal (IEEE comparison). A stable
    descending sort gives exactly that order.
    """
    if not bool(torch.isfinite(s).all()):
        return False
    n, h, w = s.shape
    flat = s.reshape(n, h * w)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat)
    mask.scatter_(1, order, 1.0)
    out.copy_(mask.reshape(n, 1, h, w))
    return True


def saliency_topk_mask(g: Tensor, k: int, p: int, out: Tensor) -> bool:
    return topk_mask(_magnitude(g, p), k, out)


def _project(x: Tensor, delta: Tensor, mask: Tensor, eps: float) -> Tensor:
    e = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
    d = torch.clamp(delta * mask, -e, e)
    return torch.clamp(d, -x, 1.0 - x)


def masked_linf_project(x: Tensor, delta: Tensor, mask: Tensor, eps: float, out: Tensor) -> None:
    """clamp(clamp(delta * mask, -eps, eps), -x, 1 - x), elementwise, in the input dtype."""
    out.copy_(_project(x, delta, mask, eps))


def masked_linf_project_backward(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, grad_out: Tensor,
    grad_delta: Tensor, grad_x: Tensor | None,
) -> None:
    """Subgradients of ``masked_linf_project`` as PyTorch's clamp defines them.

    clamp passes the gradient to its input where min <= input <= max (bounds
    inclusive) and to the active bound elsewhere. The box bounds are -x and 1 - x,
    so x receives -grad_out where the box clamp is active. ``grad_x`` is None when
    x needs no gradient.
    """
    e = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
    d0 = delta * mask
    d1 = torch.clamp(d0, -e, e)
    in_eps = (d0 >= -e) & (d0 <= e)
    in_box = (d1 >= -x) & (d1 <= 1.0 - x)
    zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
    grad_delta.copy_(torch.where(in_eps & in_box, grad_out * mask, zero))
    if grad_x is not None:
        grad_x.copy_(torch.where(in_box, zero, -grad_out))


def pgd_step(x: Tensor, delta: Tensor, g: Tensor, mask: Tensor, eps: float, alpha: float, out: Tensor) -> None:
    """project(delta + alpha * sign(g)); ``alpha`` is signed (negative = error-minimizing)."""
    a = torch.tensor(alpha, dtype=delta.dtype, device=delta.device)
    out.copy_(_project(x, delta + a * torch.sign(g), mask, eps))
