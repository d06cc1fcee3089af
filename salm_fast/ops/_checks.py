"""Argument checks shared by every backend: one clear error per bad input.

Each check names the op and the argument, so that a user reading
``ValueError: masked_linf_project: eps must be >= 0, got -0.1`` knows what to fix.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

#: dtypes every backend supports; the torch reference also takes float16/bfloat16.
KERNEL_DTYPES = (torch.float32, torch.float64)


def check_tensor(op: str, name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        layout = "N x C x H x W" if ndim == 4 else "N x H x W"
        raise ValueError(f"{op}: {name} must have rank {ndim} ({layout}), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")
    return t


def check_same(op: str, ref_name: str, ref: Tensor, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape} (from {ref_name})")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype and name != "mask":
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_mask(op: str, x: Tensor, mask: object) -> Tensor:
    """N x 1 x H x W mask of any numeric/bool dtype, returned in x's dtype, contiguous."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    n, _, h, w = x.shape
    check_same(op, "x", x, "mask", mask, (n, 1, h, w))
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be real, got dtype {mask.dtype}")
    return mask.to(x.dtype).contiguous()


def check_eps(op: str, eps: object, name: str = "eps") -> float:
    """A finite real >= 0 (the L-inf budget, or a PGD step size with name='alpha')."""
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {eps}")
    return eps


def check_p(op: str, p: object) -> int:
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    return int(p)  # type: ignore[arg-type]


def resolve_k(op: str, k: object, hw: int) -> int:
    """k as a pixel count (int, 1..H*W) or a fraction of H*W (float in (0, 1]).

    A fraction is rounded half up and kept at least 1, so every image gets a mask.
    """
    if isinstance(k, Tensor) and k.numel() == 1:
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{op}: k must be an int (pixels) or a float fraction, got {type(k).__name__}")
    if isinstance(k, numbers.Integral):
        k = int(k)
        if not 1 <= k <= hw:
            raise ValueError(f"{op}: k must be between 1 and H*W={hw} pixels, got {k}")
        return k
    k = float(k)
    if not (math.isfinite(k) and 0.0 < k <= 1.0):
        raise ValueError(f"{op}: k as a fraction must be in (0, 1], got {k}")
    return max(1, min(hw, int(math.floor(k * hw + 0.5))))


def check_dtype_for_backend(op: str, backend: str, t: Tensor) -> None:
    if backend != "torch" and t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{op}: the {backend} backend supports float32 and float64, got {t.dtype} "
            "(use backend='torch' for other dtypes)"
        )
