"""The release: perturbations quantized onto the uint8 grid, and the budget checked on the bytes.

What is released is what is judged. A float perturbation is turned into whole 8-bit
levels here, once, so that every evaluation trains on exactly the stored bytes:

* each nonzero perturbation moves its pixel by at least one level (plain rounding
  would silently erase every |delta| < 0.5/255) and by at most ``floor(eps * 255)``
  levels, so the L-inf budget holds on the stored bytes, not just on the float tensor;
* pixels the perturbation leaves at 0 stay byte-identical, so L0 never grows.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

LEVELS = 255


def budget_levels(eps: float) -> int:
    """The largest whole number of 8-bit levels within an L-inf budget ``eps`` (in [0, 1] units)."""
    return int(math.floor(eps * LEVELS + 1e-6))


def parse_eps(value: object) -> float:
    """The one rule for an L-inf budget, from the CLI or the API; returns it in [0, 1] units.

    A fraction ``"8/255"`` (string), or a number in (0, 1] (``0.0314``, or ``8 / 255`` in
    Python). A bare string number of 1 or more (``"1"``, ``"2"``, ``"1.5"``) could mean a
    fraction or a count of 8-bit levels and is refused with both spellings to choose from.
    The budget must hold at least one 8-bit level (1/255): a uint8 release cannot hold less.
    Raises ValueError naming the problem.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)):
        raise ValueError(f"eps must be a number in (0, 1] or a fraction such as '8/255', got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            eps = float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps must be a fraction such as 8/255 or a number in (0, 1), got {value!r}") from None
        if "/" not in text and eps >= 1:
            raise ValueError(f"eps {text} is ambiguous: write {text}/255 for {text} levels of 255, or a number "
                             f"below 1 (e.g. 0.0314) for a fraction of the range")
    else:
        eps = float(value)
    if not (math.isfinite(eps) and 0 < eps <= 1):
        hint = f" ({value} levels would be {value}/255)" if isinstance(value, (int, float)) and 1 < eps <= 255 else ""
        raise ValueError(f"eps must be in (0, 1] (e.g. 8/255), got {value!r}{hint}")
    if budget_levels(eps) < 1:
        raise ValueError(f"eps={eps:.5f} is below one 8-bit level (1/255): a uint8 release cannot hold it")
    return eps


def quantize_release(images: Tensor, delta: Tensor, eps: float) -> Tensor:
    """uint8 images N x C x H x W + float perturbation (same shape, [0, 1] units) -> uint8 release."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if delta.shape != images.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}, images {tuple(images.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta contains NaN or inf")
    eps = parse_eps(eps)  # eps < 1/255 would clamp every step to 0 and silently erase the perturbation
    levels = budget_levels(eps)
    scaled = delta.double() * LEVELS
    magnitude = scaled.abs().round().clamp(1, levels)  # >= 1 level where delta != 0
    step = torch.where(scaled != 0, torch.sign(scaled) * magnitude, torch.zeros_like(scaled))
    out = (images.to(torch.int16) + step.to(torch.int16)).clamp(0, LEVELS)
    return out.to(torch.uint8)


@dataclass(frozen=True)
class BudgetReport:
    """Measured on the stored bytes of the perturbed split."""

    linf: float  # max |release - clean| in [0, 1] units
    linf_levels: int  # the same in 8-bit levels
    l0_fraction: float  # pixels changed in any channel / all pixels
    l0_max_per_image: int  # most pixels changed in one image
    changed_images: int
    n_images: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _as_tensor(images: np.ndarray | Tensor) -> Tensor:
    # np.array copies: stored splits are read-only arrays, which torch.from_numpy warns about.
    return images if isinstance(images, Tensor) else torch.from_numpy(np.array(images))


def measure_budget(clean: np.ndarray | Tensor, release: np.ndarray | Tensor) -> BudgetReport:
    """L-inf and L0 of a release against its clean images, both uint8 in storage layout
    (N x H x W for gray, N x H x W x C for colour, as MedMNIST stores them)."""
    a, b = _as_tensor(clean), _as_tensor(release)
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:  # float [0, 1] images would truncate to 0 here
        raise TypeError(f"clean and release must be uint8 (stored bytes), got {a.dtype} and {b.dtype}")
    a, b = a.to(torch.int16), b.to(torch.int16)
    if a.shape != b.shape:
        raise ValueError(f"clean {tuple(a.shape)} and release {tuple(b.shape)} differ in shape")
    if a.dim() not in (3, 4):
        raise ValueError(f"expected N x H x W or N x H x W x C images, got shape {tuple(a.shape)}")
    diff = (a - b).abs()
    changed = diff.amax(dim=-1) > 0 if a.dim() == 4 else diff > 0  # a pixel: any channel
    n = a.shape[0]
    per_image = changed.reshape(n, -1).sum(1)
    linf_levels = int(diff.max()) if diff.numel() else 0
    return BudgetReport(
        linf=linf_levels / LEVELS,
        linf_levels=linf_levels,
        l0_fraction=float(changed.float().mean()),
        l0_max_per_image=int(per_image.max()) if n else 0,
        changed_images=int((per_image > 0).sum()),
        n_images=n,
    )
