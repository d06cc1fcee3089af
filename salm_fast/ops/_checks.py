"""Argument checks shared by every backend: one clear error per bad input.

Each check names the op and the argument, so that a user reading
``ValueError: masked_linf_project: eps must be >= 0, got -0.1`` knows what to fix.
Structural checks (type, rank, shape, dtype, device) need no values and also run on
meta and fake tensors; :func:`require_values` reads the values and runs only where the
op computes.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

try:  # the value scans' fast path; the torch fallback covers a missing extension
    from salm_fast import _C
except ImportError:  # pragma: no cover - exercised only without the compiled module
    _C = None

#: dtypes the kernels compute in; float16 and bfloat16 are computed in float32 (see _precision).
KERNEL_DTYPES = (torch.float32, torch.float64)

#: Rules of :func:`require_values`.
FINITE = "finite"  # no NaN, no inf (images, perturbations)
NOT_NAN = "not NaN"  # inf allowed: sign(inf) is still a direction (gradients)
BINARY = "binary"  # each value 0 or 1 (masks)


def check_tensor(op: str, name: str, t: object, ndim: int) -> Tensor:
    check_is_tensor(op, name, t)
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


def check_mask(op: str, x: Tensor, mask: object) -> None:
    """N x 1 x H x W mask of any real dtype (bool, integer or float; the op converts it)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    n, _, h, w = x.shape
    check_same(op, "x", x, "mask", mask, (n, 1, h, w))
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be real, got dtype {mask.dtype}")


def _scalar_value(op: str, name: str, t: Tensor) -> object:
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape {tuple(t.shape)}")
    if t.device.type == "meta":
        raise TypeError(f"{op}: {name} is a meta tensor, which has no value; pass a number")
    return t.item()


def check_eps(op: str, eps: object, name: str = "eps") -> float:
    """A finite real >= 0 (the L-inf budget, or a PGD step size with name='alpha')."""
    if isinstance(eps, Tensor):
        eps = _scalar_value(op, name, eps)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {eps}")
    return eps


def check_k(op: str, k: object) -> int | float:
    """k's type: an int (pixels) or a float (fraction of H*W); its range needs H*W (resolve_k)."""
    if isinstance(k, Tensor):
        k = _scalar_value(op, "k", k)
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{op}: k must be an int (pixels) or a float fraction, got {type(k).__name__}")
    return int(k) if isinstance(k, numbers.Integral) else float(k)


def check_sign(op: str, sign: object) -> int:
    if sign not in (-1, 1) or isinstance(sign, bool):
        raise ValueError(f"{op}: sign must be -1 (minimize the loss) or +1 (maximize it), got {sign!r}")
    return int(sign)  # type: ignore[arg-type]


def check_is_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_p(op: str, p: object) -> int:
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    return int(p)  # type: ignore[arg-type]


def resolve_k(op: str, k: object, hw: int) -> int:
    """k as a pixel count (int, 1..H*W) or a fraction of H*W (float in (0, 1]).

    A fraction is rounded half up and kept at least 1, so every image gets a mask.
    """
    k = check_k(op, k)
    if isinstance(k, int):
        if not 1 <= k <= hw:
            raise ValueError(f"{op}: k must be between 1 and H*W={hw} pixels, got {k}")
        return k
    if not (math.isfinite(k) and 0.0 < k <= 1.0):
        raise ValueError(f"{op}: k as a fraction must be in (0, 1], got {k}")
    return max(1, min(hw, int(math.floor(k * hw + 0.5))))


def _scan_c(t: Tensor, rule: str) -> bool:
    scan = _C.all_finite if rule == FINITE else _C.none_nan if rule == NOT_NAN else _C.all_binary
    return scan(t.numpy(), torch.get_num_threads())  # t comes detached from the kernels' _prepare


def _bad_torch(t: Tensor, rule: str) -> Tensor:
    """0-d bool tensor on t's device: does t break ``rule``? (one reduction, no host sync)"""
    if rule == BINARY:
        if t.dtype == torch.bool:
            return torch.zeros((), dtype=torch.bool, device=t.device)
        return ((t != 0) & (t != 1)).any()
    if rule == NOT_NAN:
        return torch.isnan(t).any()
    lo, hi = torch.aminmax(t)  # NaN propagates; inf shows in one of the two
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _value_error(op: str, name: str, t: Tensor, rule: str) -> ValueError:
    if rule == FINITE:
        return ValueError(f"{op}: {name} contains NaN or inf")
    if rule == NOT_NAN:
        return ValueError(f"{op}: {name} contains NaN (its sign is undefined)")
    other = t[(t != 0) & (t != 1)].reshape(-1)[0].item()
    return ValueError(f"{op}: {name} must hold only 0 and 1 (a selection, not a weight), found {other!r}")


def values_ok(t: Tensor, rule: str) -> bool:
    """Whether every value of the detached ``t`` obeys ``rule`` (one read of t; a host sync off the CPU)."""
    if _C is not None and t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous():
        return _scan_c(t, rule)
    return not bool(_bad_torch(t, rule))


def require_values(op: str, *checks: tuple[str, Tensor, str]) -> None:
    """Raise a ValueError naming the first (name, detached tensor, rule) whose values break the rule.

    Rules: FINITE, NOT_NAN, BINARY. Cost: one read of each tensor. Contiguous float32/64
    CPU tensors are scanned by ``salm_fast._C`` (one vectorized OpenMP pass, no allocation);
    others (CUDA, float16/bfloat16, integer masks) by one torch reduction each and a single
    host synchronization for all of them.
    """
    fallback = []
    for name, t, rule in checks:
        if _C is not None and t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous():
            if not _scan_c(t, rule):
                raise _value_error(op, name, t, rule)
        else:
            fallback.append((name, t, rule))
    if fallback:
        bad = torch.stack([_bad_torch(t, rule) for _, t, rule in fallback]).tolist()
        for (name, t, rule), is_bad in zip(fallback, bad):
            if is_bad:
                raise _value_error(op, name, t, rule)
