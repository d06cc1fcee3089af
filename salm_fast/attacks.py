"""Drop-in attacks on a batch, torchattacks-style, on the fused ops: error-minimizing and error-maximizing PGD.

For code that already has its own training loop and wants the protection step (or the usual
adversarial example) as one call: ``x_adv = attack(x, y)``. :class:`Attack` is the small common
base; it owns everything around the core loop:

* **model mode**: the model runs in eval mode during the attack (no BatchNorm statistics
  updated, no dropout); the mode of every submodule is restored afterwards, even on error;
* **normalization**: :meth:`Attack.set_normalization_used` makes the model see
  ``(x - mean) / std`` while the attack works on pixels in [0, 1] (where the budget is);
* **device and dtype**: the attack follows the images (float32/64, float16 or bfloat16; the
  model gets them in its own parameters' dtype); the model must be on the images' device;
* **budget**: ``|x_adv - x| <= eps`` and ``0 <= x_adv <= 1`` hold exactly in the images'
  dtype, and with a top-K or given mask at most K pixels per image change (L0);
* **checks**: bad arguments raise one-line ``ValueError``/``TypeError`` before anything runs.

A subclass writes only :meth:`Attack.perturb`, its core loop. Parameter gradients of the model
are never touched (input gradients come from ``torch.autograd.grad``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = ["Attack", "MinMaxPGD", "MinMinPGD", "check_images", "check_labels"]


# ------------------------------------------------------------------ shared argument checks
def check_images(who: str, x: object) -> Tensor:
    """N x C x H x W floating-point images, finite and in [0, 1]; raises a one-line error naming ``who``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: images must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: images must be floating point in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{who}: images must be a non-empty N x C x H x W tensor, got shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{who}: images contain NaN or inf")
    if lo < 0 or hi > 1:
        raise ValueError(f"{who}: images must be in [0, 1] (pixels, before any normalization), "
                         f"got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_labels(who: str, x: Tensor, y: object) -> Tensor:
    """Integer class labels, one per image, on the images' device."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{who}: labels must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{who}: labels must be integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"{who}: labels must have shape ({x.shape[0]},) (one per image), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{who}: labels are on {y.device} but images on {x.device}")
    return y


def _fraction(who: str, name: str, value: object, *, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= upper):
        raise ValueError(f"{who}: {name} must be in (0, {upper:g}] (pixel units, e.g. 8/255), got {value}")
    return value


def _positive_int(who: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{who}: {name} must be >= 1, got {value}")
    return int(value)


def add_within_budget(x: Tensor, delta: Tensor) -> Tensor:
    """x + delta in x's dtype, rounded toward x where rounding to nearest would move farther than delta.

    The projection already keeps ``|delta| <= eps`` and ``x + delta`` in [0, 1] in exact arithmetic;
    this keeps both true of the stored sum (a plain float add may overshoot by half an ulp of x).
    """
    x_adv = x + delta
    wide = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    over = (x_adv.to(wide) - x.to(wide)).abs() > delta.to(wide).abs()
    if bool(over.any()):
        x_adv = torch.where(over, torch.nextafter(x_adv, x), x_adv)
    return x_adv.clamp_(0, 1)


# ------------------------------------------------------------------ the common base
class Attack:
    """Common base: model mode, normalization, device/dtype, the L-inf budget and argument checks.

    Subclasses implement :meth:`perturb` (images in [0, 1], labels) -> perturbation, called with
    the model in eval mode; :meth:`__call__` returns the perturbed images.
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = _fraction(who, "eps", eps)
        self.alpha = _fraction(who, "alpha", alpha)
        self.steps = _positive_int(who, "steps", steps)
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    # -------------------------------------------------------------- normalization
    def set_normalization_used(self, mean: float | Sequence[float], std: float | Sequence[float]) -> Attack:
        """The model sees ``(x - mean) / std`` (per channel, or one number for all channels).

        Use it for a model trained on normalized inputs that has no normalization layer of its
        own: the attack and its budget stay in [0, 1] pixel space. Returns the attack.
        """
        who = type(self).__name__
        m = torch.as_tensor(mean, dtype=torch.float64).flatten()
        s = torch.as_tensor(std, dtype=torch.float64).flatten()
        if m.numel() == 0 or s.numel() == 0 or not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(s).all())):
            raise ValueError(f"{who}: mean and std must be finite numbers (one, or one per channel)")
        if bool((s <= 0).any()):
            raise ValueError(f"{who}: std must be > 0, got {s.tolist()}")
        if m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise ValueError(f"{who}: mean has {m.numel()} values and std {s.numel()}: give one or one per channel")
        self._mean, self._std = m, s
        return self

    def _model_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.to(dtype)
        if self._mean is None:
            return x
        c = x.shape[1]
        for name, t in (("mean", self._mean), ("std", self._std)):
            if t.numel() not in (1, c):
                raise ValueError(f"{type(self).__name__}: normalization {name} has {t.numel()} values for {c} channels")
        mean = self._mean.to(device=x.device, dtype=dtype).view(1, -1, 1, 1)
        std = self._std.to(device=x.device, dtype=dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    # -------------------------------------------------------------- model access
    def _model_dtype(self, x: Tensor) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                if p.device != x.device:
                    raise ValueError(f"{type(self).__name__}: the model is on {p.device} but the images on {x.device}")
                return p.dtype
        return x.dtype

    def get_logits(self, x: Tensor) -> Tensor:
        """The model's logits for pixel-space images ``x`` (normalization applied)."""
        return self.model(self._model_input(x, self._model_dtype(x)))

    def input_gradient(self, x: Tensor, y: Tensor) -> Tensor:
        """d cross-entropy / d x at pixel-space images ``x``, in x's dtype (no parameter gradients)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(self.get_logits(x), y)
            (g,) = torch.autograd.grad(loss, x)
        return g

    # -------------------------------------------------------------- the call
    def perturb(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        """The core loop: the perturbation delta (x's shape and dtype) for checked images and labels."""
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Perturbed images (x's shape, dtype and device) for images ``x`` in [0, 1] and labels ``y``.

        ``mask`` (N x 1 x H x W, 0/1) restricts this call's perturbation to its pixels; it
        overrides a mask or ``k`` given at construction.
        """
        who = type(self).__name__
        x = check_images(who, x).detach()
        y = check_labels(who, x, y)
        if mask is not None:
            mask = self._check_mask(x, mask)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            delta = self.perturb(x, y, mask)
        finally:
            for m, training in modes:
                m.training = training
        return add_within_budget(x, delta).detach()

    forward = __call__

    def _check_mask(self, x: Tensor, mask: object) -> Tensor:
        who = type(self).__name__
        if not isinstance(mask, Tensor):
            raise TypeError(f"{who}: mask must be a torch.Tensor, got {type(mask).__name__}")
        n, _, h, w = x.shape
        if tuple(mask.shape) != (n, 1, h, w):
            raise ValueError(f"{who}: mask must have shape {(n, 1, h, w)} (N x 1 x H x W, shared by the channels), "
                             f"got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"{who}: mask is on {mask.device} but images on {x.device}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{who}: mask must hold only 0 and 1")
        return mask.to(x.dtype)

    def __repr__(self) -> str:
        norm = "" if self._mean is None else f", mean={self._mean.tolist()}, std={self._std.tolist()}"
        return f"{type(self).__name__}(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}{norm})"


# ------------------------------------------------------------------ L-inf PGD, both directions
class _LinfPGD(Attack):
    #: +1 ascends the loss (error-maximizing), -1 descends it (error-minimizing)
    loss_sign: int = 0

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 k: int | float | None = None, mask: Tensor | None = None, random_start: bool = False) -> None:
        super().__init__(model, eps, alpha, steps)
        who = type(self).__name__
        if k is not None and mask is not None:
            raise ValueError(f"{who}: give k (a saliency top-K mask per batch) or mask, not both")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Real):
                raise TypeError(f"{who}: k must be an int (pixels) or a float in (0, 1] (fraction), got {k!r}")
            if isinstance(k, numbers.Integral) and k < 1:
                raise ValueError(f"{who}: k must be >= 1 pixel, got {k}")
            if not isinstance(k, numbers.Integral) and not (math.isfinite(k) and 0 < k <= 1):
                raise ValueError(f"{who}: k as a fraction of the pixels must be in (0, 1], got {k}")
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"{who}: mask must be a torch.Tensor, got {type(mask).__name__}")
        self.k = k
        self.mask = mask
        self.random_start = bool(random_start)

    def _mask_for(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            return mask
        if self.mask is not None:
            return self._check_mask(x, self.mask)
        n, _, h, w = x.shape
        if self.k is None:
            return x.new_ones((n, 1, h, w))
        if isinstance(self.k, numbers.Integral) and self.k > h * w:
            raise ValueError(f"{type(self).__name__}: k={self.k} exceeds the {h * w} pixels of a {h} x {w} image")
        k = ops.resolve_k(self.k, h * w)
        # The saliency of the clean images under the model: where the loss is most sensitive.
        return ops.saliency_topk_mask(self.input_gradient(x, y), k)

    def perturb(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        mask = self._mask_for(x, y, mask)
        if self.random_start:
            delta = ops.masked_linf_project(x, torch.empty_like(x).uniform_(-self.eps, self.eps), mask, self.eps)
        else:
            delta = torch.zeros_like(x)
        for _ in range(self.steps):
            g = self.input_gradient(x + delta, y)
            ops.pgd_step(x, delta, g, mask, self.eps, self.alpha, self.loss_sign, out=delta)
        return delta

    def __repr__(self) -> str:
        extra = f", k={self.k!r}" if self.k is not None else ", mask=given" if self.mask is not None else ""
        return super().__repr__()[:-1] + f"{extra}, random_start={self.random_start})"


class MinMinPGD(_LinfPGD):
    """Error-minimizing PGD: unlearnable examples (Huang et al., "Unlearnable Examples: Making
    Personal Data Unexploitable", ICLR 2021), the inner step of the bi-level min-min.

    Finds ``delta`` that MINIMIZES the model's cross-entropy on ``x + delta``, so a model trained
    on the perturbed images learns the easy noise instead of the content. Each of ``steps``
    iterations is one fused :func:`salm_fast.ops.pgd_step` with ``sign=-1``.

    Norms: L-inf, ``|x_adv - x| <= eps`` (pixel units, images in [0, 1]); L0 through ``k``:
    ``k`` pixels per image (int, or a fraction of H*W in (0, 1]) chosen by the saliency of the
    model's input gradient at the clean ``x`` (:func:`salm_fast.ops.saliency_topk_mask`, the SALM
    mask), or through ``mask`` (N x 1 x H x W, 0/1, shared by the channels; at construction or per
    call). ``k=None`` and no mask: the whole image.

    Shapes: ``x`` N x C x H x W float in [0, 1]; ``y`` N integer labels; returns ``x_adv`` like ``x``.
    ``random_start`` starts from uniform noise in [-eps, eps] (torch's global generator).

    >>> import torch, torch.nn as nn
    >>> from salm_fast.attacks import MinMinPGD
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 2))
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    >>> atk = MinMinPGD(model, eps=8/255, alpha=2/255, steps=5, k=0.1)
    >>> x_adv = atk(x, y)
    >>> bool(((x_adv - x).abs() <= 8/255).all()), int((x_adv != x).sum((1, 2, 3)).max()) <= 78
    (True, True)
    """

    loss_sign = -1


class MinMaxPGD(_LinfPGD):
    """Error-maximizing PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018): the usual adversarial example, and the error-maximizing twin of
    :class:`MinMinPGD` (adversarial poisoning baselines use it).

    Finds ``delta`` that MAXIMIZES the model's cross-entropy on ``x + delta``; each step is one
    fused :func:`salm_fast.ops.pgd_step` with ``sign=+1``. Arguments, norms (L-inf ``eps``, L0
    through ``k`` or ``mask``) and shapes as :class:`MinMinPGD`.

    >>> import torch, torch.nn as nn
    >>> from salm_fast.attacks import MinMaxPGD
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([2, 0])
    >>> atk = MinMaxPGD(model, eps=4/255, steps=3).set_normalization_used([0.5] * 3, [0.25] * 3)
    >>> bool(((atk(x, y) - x).abs() <= 4/255).all())
    True
    """

    loss_sign = 1
