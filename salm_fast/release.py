"""The release: perturbations quantized onto the uint8 grid, and the budget checked on the bytes.

What is released is what is judged. A float perturbation is turned into whole 8-bit
levels here, once, so that every evaluation trains on exactly the stored bytes:

* each nonzero perturbation moves its pixel by at least one level (plain rounding
  would silently erase every |delta| < 0.5/255) and by at most ``floor(eps * 255)``
  levels, so the L-inf budget holds on the stored bytes, not just on the float tensor;
* pixels the perturbation leaves at 0 stay byte-identical, so L0 never grows.

Images stored at a higher bit depth (12/16-bit DICOM, 16-bit PNG/TIFF) go through the same rule
on their own grid (:func:`stored_steps`, :func:`measure_stored_budget`): eps is a fraction of the
stored range ``maxval = 2**bits - 1``, so a pixel moves by at most ``floor(eps * maxval)`` stored
levels (8/255 of a 12-bit range: 128 levels).
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
    return stored_budget_levels(eps, LEVELS)


def stored_budget_levels(eps: float, maxval: int) -> int:
    """The largest whole number of stored levels within ``eps``, a fraction of the stored range [0, maxval]."""
    return int(math.floor(eps * maxval + 1e-6))


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
    step = stored_steps(delta, eps, LEVELS)
    out = (images.to(torch.int16) + step.to(torch.int16)).clamp(0, LEVELS)
    return out.to(torch.uint8)


def stored_steps(delta: Tensor, eps: float, maxval: int | Tensor) -> Tensor:
    """A float perturbation ([0, 1] units) as whole steps on a grid of ``maxval + 1`` levels (int64, same shape).

    ``maxval``: an int, or a tensor that broadcasts against ``delta`` (one per image: N x 1 x 1 x 1).
    Each nonzero entry becomes at least 1 and at most ``floor(eps * maxval)`` levels, with its sign;
    zeros stay 0. The caller adds the steps to the stored values and clamps to the stored range.
    """
    eps = parse_eps(eps)  # eps < 1/255 would clamp every step to 0 and silently erase the perturbation
    maxval = torch.as_tensor(maxval, dtype=torch.float64)
    levels = torch.floor(eps * maxval + 1e-6)
    scaled = delta.double() * maxval
    magnitude = torch.minimum(scaled.abs().round().clamp(min=1), levels)  # >= 1 level where delta != 0
    return torch.where(scaled != 0, torch.sign(scaled) * magnitude, torch.zeros_like(scaled)).to(torch.int64)


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
    return measure_stored_budget(a, b, LEVELS)


def measure_stored_budget(clean: np.ndarray | Tensor, release: np.ndarray | Tensor, maxval: int) -> BudgetReport:
    """:func:`measure_budget` on integer stored values of range ``maxval`` (e.g. 4095 for 12-bit):
    ``linf_levels`` in stored levels, ``linf`` as a fraction of the stored range."""
    a, b = _as_tensor(clean), _as_tensor(release)
    if a.is_floating_point() or b.is_floating_point() or a.dtype == torch.bool or b.dtype == torch.bool:
        raise TypeError(f"clean and release must be integer stored values, got {a.dtype} and {b.dtype}")
    a, b = a.to(torch.int32), b.to(torch.int32)
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
        linf=linf_levels / maxval,
        linf_levels=linf_levels,
        l0_fraction=float(changed.float().mean()),
        l0_max_per_image=int(per_image.max()) if n else 0,
        changed_images=int((per_image > 0).sum()),
        n_images=n,
    )
