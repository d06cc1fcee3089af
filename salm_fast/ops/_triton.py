"""Triton backend: the fused ops on CUDA tensors (or on CPU under TRITON_INTERPRET=1).

Thin adapter from the backend contract (see ``_reference``) to the launchers in
``salm_fast.kernels``. Triton launches on the current CUDA device, so every launch
runs under a guard for the tensors' device.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from salm_fast.kernels import grad_magnitude as _gm
from salm_fast.kernels import masked_linf_project as _proj
from salm_fast.kernels import pgd_step as _pgd
from salm_fast.kernels import topk_mask as _topk

NAME = "triton"


def _on(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def grad_magnitude(g: Tensor, p: int, out: Tensor) -> None:
    with _on(g):
        _gm.grad_magnitude(g, p, out)


def topk_mask(s: Tensor, k: int, out: Tensor) -> bool:
    with _on(s):
        nonfinite = _topk.topk_mask(s, k, out)
    return not bool(nonfinite.any())  # the one host sync


def saliency_topk_mask(g: Tensor, k: int, p: int, out: Tensor) -> bool:
    with _on(g):
        nonfinite = _topk.saliency_topk_mask(g, k, p, out)
    return not bool(nonfinite.any())


def masked_linf_project(x: Tensor, delta: Tensor, mask: Tensor, eps: float, out: Tensor) -> None:
    with _on(x):
        _proj.masked_linf_project(x, delta, mask, eps, out)


def masked_linf_project_backward(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, grad_out: Tensor,
    grad_delta: Tensor, grad_x: Tensor | None,
) -> None:
    with _on(x):
        _proj.masked_linf_project_backward(x, delta, mask, eps, grad_out, grad_delta, grad_x)


def pgd_step(x: Tensor, delta: Tensor, g: Tensor, mask: Tensor, eps: float, alpha: float, out: Tensor) -> None:
    with _on(x):
        _pgd.pgd_step(x, delta, g, mask, eps, alpha, out)
