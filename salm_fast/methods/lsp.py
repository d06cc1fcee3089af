"""Linear-separable synthetic perturbations (LSP): one random patch pattern per class.

Yu et al., "Availability Attacks Create Shortcuts", KDD 2022 ("synthetic noise"). Model-free:
class-wise patterns that are linearly separable by construction, a shortcut a victim
learns before the images.

Patterns (deterministic from ``seed``): the image is split into a grid of ``patch`` x ``patch``
patches (default ``round(min(H, W) / 4)``: 7 px at 28 px, 8 at 32; edge patches are cut to
the image); one value per (class, channel, patch) is drawn from N(0, 1) (a seeded
generator), upsampled to the image by nearest-neighbour repetition and then scaled:

* ``norm="l2"`` (the paper's, default): each class pattern is scaled to the L2 norm ``l2``
  over the whole C x H x W image (default ``(8/255) * sqrt(C*H*W)``, the L2 norm of a full
  image perturbation of magnitude 8/255: 0.88 at 1 x 28 x 28). This mode has no L-inf budget:
  its eps is 1.0 (the default; another eps is an error, since an L-inf cut would change the
  pattern and ``protect`` clips the release to eps). The bound enforced and verified is
  ``||delta_i||_2 <= l2`` per image.
* ``norm="linf"`` (our L-inf budget): the same draws, each class pattern scaled so that its
  largest |value| is ``eps`` (default 8/255), i.e. within |delta| <= eps.

Both modes then round the pattern to whole 8-bit levels (the release's grid): in L2 mode by
rounding to nearest and, where that overshoots ``l2``, truncating toward zero the values
rounded up the most until the norm fits (so the quantized pattern's norm is <= l2); in L-inf
mode by rounding, capped at ``floor(eps * 255)`` levels. Because the pattern and the images
are both on the grid, ``protect``'s uint8 quantization reproduces the float perturbation
exactly, so the stored release holds the L2 bound too (verified by :meth:`check_release` to a
relative float tolerance of 1e-6; without the pre-rounding, rounding each value to bytes
could add up to 0.5/255 * sqrt(C*H*W) to the norm, and the one-level minimum of the release
up to twice that). Values below half a level become 0.

Every image of class c gets pattern c; ``masked_linf_project`` with a full mask then keeps
x + delta in [0, 1] (the box cut, which only shrinks values: the L2 and L-inf bounds still
hold). Shapes: ``x`` N x C x H x W in [0, 1], ``y`` N int64; patterns n_classes x C x H x W
(``fit``'s ``info`` has their norms), ``delta`` N x C x H x W.

Example::

    lsp = LinearSeparablePerturbation(norm="l2", seed=0)          # L2 = 8/255 * sqrt(C*H*W)
    p = lsp.fit(x, y, n_classes)                                  # p.delta: pattern[y], box-cut
    salm_fast.protect("synthetic", "lsp", out="out/lsp", norm="linf")  # spec: lsp:norm=linf
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..release import LEVELS, budget_levels
from .base import Method, Protection, check_int, check_number

#: The L-inf magnitude whose full-image L2 norm is the default L2 budget (eps * sqrt(C*H*W)).
L2_REFERENCE_EPS = 8 / 255
#: Relative float tolerance of the L2 checks (float32 perturbations, float64 norms).
L2_RTOL = 1e-6
MODES = ("l2", "linf")


class LinearSeparablePerturbation(Method):
    name = "lsp"
    paper = "Yu et al., Availability Attacks Create Shortcuts, KDD 2022 (linear-separable synthetic noise)"
    norm = "L2"  # per instance: "L2" or "Linf" (the mode)
    default_eps = 1.0  # the L2 mode's (no L-inf budget); norm="linf" defaults to 8/255

    def __init__(self, eps: float | None = None, *, seed: int = 0, k: int | float | None = None, norm: str = "l2",
                 l2: float | None = None, patch: int | None = None):
        if norm not in MODES:
            raise ValueError(f"lsp: norm must be 'l2' (the paper's L2 budget) or 'linf' (our L-inf eps), got {norm!r}")
        if eps is None:  # the L2 mode has no L-inf budget (1.0); the L-inf mode, the usual one
            eps = self.default_eps if norm == "l2" else Method.default_eps
        super().__init__(eps, seed=seed, k=k)
        if norm == "l2" and self.eps != 1.0:
            raise ValueError(f"lsp: norm='l2' is bounded in L2 (option l2), not in L-inf: leave eps unset (1.0), "
                             f"or use norm='linf' for an L-inf eps (got eps={self.eps!r})")
        if l2 is not None:
            if norm != "l2":
                raise ValueError("lsp: l2 applies to norm='l2' only (norm='linf' is bounded by eps)")
        self.mode = norm
        self.norm = "L2" if norm == "l2" else "Linf"
        self.l2 = None if l2 is None else check_number("lsp", "l2 (an L2 norm in [0, 1] units)", l2)
        self.patch = None if patch is None else check_int("lsp", "patch (pixels)", patch, 1)
        self.l2_bound: float | None = None  # resolved at fit (depends on C*H*W)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "norm": self.mode, "l2": self.l2, "patch": self.patch}

    def check_data(self, image_shape, n_classes):
        super().check_data(image_shape, n_classes)
        if self.patch is not None and self.patch > min(image_shape):
            raise ValueError(f"lsp: patch {self.patch} exceeds the image side {min(image_shape)}")

    def patch_size(self, image_shape: tuple[int, int]) -> int:
        return self.patch if self.patch is not None else max(1, round(min(image_shape) / 4))

    def resolve_l2(self, shape: tuple[int, int, int]) -> float:
        """The L2 bound for C x H x W images: ``l2``, or (8/255) * sqrt(C*H*W) by default."""
        return self.l2 if self.l2 is not None else L2_REFERENCE_EPS * math.sqrt(math.prod(shape))

    # ------------------------------------------------------------------ patterns
    def patterns(self, n_classes: int, shape: tuple[int, int, int]) -> Tensor:
        """The class patterns, n_classes x C x H x W float32 on the 1/255 grid (before the box cut)."""
        c, h, w = shape
        p = self.patch_size((h, w))
        gh, gw = -(-h // p), -(-w // p)
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn((n_classes, c, gh, gw), generator=gen, dtype=torch.float64)
        ah = torch.tensor([min(p, h - i * p) for i in range(gh)], dtype=torch.float64)
        aw = torch.tensor([min(p, w - j * p) for j in range(gw)], dtype=torch.float64)
        area = (ah[:, None] * aw[None, :]).expand(c, gh, gw).reshape(-1)  # pixels per value
        z = z.reshape(n_classes, -1)
        z = torch.where(z == 0, torch.full_like(z, 1e-12), z)  # a zero draw has probability 0; keep norms > 0
        if self.mode == "l2":
            bound = self.resolve_l2(shape)
            v = z * (bound / (area * z * z).sum(1, keepdim=True).sqrt())
            q = torch.stack([_round_within_l2(row, area, bound) for row in v])
        else:
            v = z * (self.eps / z.abs().amax(1, keepdim=True))
            levels = budget_levels(self.eps)
            q = (v * LEVELS).round().clamp(-levels, levels) / LEVELS
        q = q.reshape(n_classes, c, gh, gw)
        full = q.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)[:, :, :h, :w]
        return full.float().contiguous()

    def _fit(self, x, y, n_classes, ctx):
        n, c, h, w = x.shape
        pattern = self.patterns(n_classes, (c, h, w)).to(x.device)
        self.l2_bound = self.resolve_l2((c, h, w)) if self.mode == "l2" else None
        raw = pattern[y]
        mask = x.new_ones((n, 1, h, w))
        delta = ops.masked_linf_project(x, raw, mask, self.eps)  # the box cut: x + delta in [0, 1]
        flat = pattern.double().flatten(1)
        info = {
            "rounds": 0,
            "patch": self.patch_size((h, w)),
            "grid": [-(-h // self.patch_size((h, w))), -(-w // self.patch_size((h, w)))],
            "l2": self.l2_bound,
            "pattern_l2": flat.norm(dim=1).tolist(),
            "pattern_linf": flat.abs().amax(1).tolist(),
            "box_cut_fraction": float((delta != raw).double().mean()),
            "delta_l2_max": float(delta.double().flatten(1).norm(dim=1).max()),
        }
        return Protection(delta, mask, info)

    # ------------------------------------------------------------------ budget
    def _check_budget(self, x, result):
        super()._check_budget(x, result)
        if self.mode == "l2":
            l2 = result.delta.double().flatten(1).norm(dim=1)
            if float(l2.max()) > self.l2_bound * (1 + L2_RTOL):
                raise RuntimeError(f"lsp: perturbation L2 {float(l2.max()):.6f} exceeds l2={self.l2_bound:.6f} (a bug)")

    def check_release(self, clean_u8: Tensor, release_u8: Tensor) -> dict[str, Any]:
        """L2 of the stored change per image (in [0, 1] units); in L2 mode it must be <= l2 (1e-6 rel.)."""
        diff = (release_u8.double() - clean_u8.double()).flatten(1) / LEVELS
        l2 = float(diff.norm(dim=1).max()) if len(diff) else 0.0
        if self.mode == "l2" and self.l2_bound is not None and l2 > self.l2_bound * (1 + L2_RTOL):
            raise RuntimeError(f"lsp: stored L2 {l2:.6f} exceeds the budget l2={self.l2_bound:.6f} (a bug)")
        return {"l2_max": l2, "l2_budget": self.l2_bound}


def _round_within_l2(v: Tensor, area: Tensor, bound: float) -> Tensor:
    """Round ``v`` (one class's patch values, float64) to whole levels with sum(area * q^2) <= bound^2:
    round to nearest, then truncate toward zero the values rounded up the most until it fits."""
    scaled = v * LEVELS
    q = scaled.round()
    limit = (bound * LEVELS) ** 2 * (1 - 1e-12)
    total = float((area * q * q).sum())
    if total <= limit:
        return q / LEVELS
    t = scaled.trunc()
    saving = area * (q * q - t * t)  # > 0 only where rounding went up in magnitude
    order = torch.argsort(q.abs() - scaled.abs(), descending=True, stable=True)
    cum = torch.cumsum(saving[order], 0)
    m = int(torch.searchsorted(cum, torch.tensor([total - limit], dtype=cum.dtype)).item()) + 1
    q[order[:m]] = t[order[:m]]
    return q / LEVELS
