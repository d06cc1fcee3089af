"""C++ CPU backend: the ``salm_fast._C`` kernels (pybind11 + OpenMP) behind the backend contract.

Same functions and signatures as :mod:`salm_fast.ops._reference` (see its docstring for
the contract). Tensors cross as NumPy arrays sharing their memory (``t.detach().numpy()``,
no copy); the C++ side checks dtype, shape, contiguity and overlap and raises
``TypeError``/``ValueError`` instead of converting. The kernels release the GIL and use
``torch.get_num_threads()`` OpenMP threads, so ``torch.set_num_threads`` governs both.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from salm_fast import _C

NAME = "cpp"


def num_threads() -> int:
    """Threads each kernel call uses (PyTorch's intra-op thread count)."""
    return torch.get_num_threads()


def _np(t: Tensor) -> np.ndarray:
    # detach(): saved tensors in backward may still require grad; numpy() refuses those.
    return t.detach().numpy()


def grad_magnitude(g: Tensor, p: int, out: Tensor) -> None:
    _C.grad_magnitude(_np(g), p, _np(out), torch.get_num_threads())


def topk_mask(s: Tensor, k: int, out: Tensor) -> bool:
    return _C.topk_mask(_np(s), k, _np(out), torch.get_num_threads())


def saliency_topk_mask(g: Tensor, k: int, p: int, out: Tensor) -> bool:
    return _C.saliency_topk_mask(_np(g), k, p, _np(out), torch.get_num_threads())


def masked_linf_project(x: Tensor, delta: Tensor, mask: Tensor, eps: float, out: Tensor) -> None:
    _C.masked_linf_project(_np(x), _np(delta), _np(mask), eps, _np(out), torch.get_num_threads())


def masked_linf_project_backward(
    x: Tensor, delta: Tensor, mask: Tensor, eps: float, grad_out: Tensor,
    grad_delta: Tensor, grad_x: Tensor | None,
) -> None:
    _C.masked_linf_project_backward(
        _np(x), _np(delta), _np(mask), eps, _np(grad_out), _np(grad_delta),
        None if grad_x is None else _np(grad_x), torch.get_num_threads(),
    )


def pgd_step(x: Tensor, delta: Tensor, g: Tensor, mask: Tensor, eps: float, alpha: float, out: Tensor) -> None:
    _C.pgd_step(_np(x), _np(delta), _np(g), _np(mask), eps, alpha, _np(out), torch.get_num_threads())
