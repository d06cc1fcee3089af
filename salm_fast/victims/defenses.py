"""Counter-measures an unauthorized trainer may use against unlearnable examples.

Two kinds, both named by a short string (see :data:`DEFENSES`) and combined with ``+``
(``"jpeg-50+crop_flip+mixup"``):

- **data-level** (:class:`DataDefense`): applied once to the released training images before
  training, uint8 N x C x H x W in, uint8 out (what the attacker would store):
  ``jpeg-<quality>``, ``blur[-<sigma>]``, ``bitdepth-<bits>``, ``grayscale``,
  ``iss[-<quality>-<bits>]``.
- **training-time** (:class:`BatchDefense`, :class:`AdversarialTraining`): applied to every
  training batch, float N x C x H x W in [0, 1] with soft targets N x K, vectorized over the
  batch: ``crop_flip``, ``cutout[-<px>]``, ``mixup[-<alpha>]``, ``cutmix[-<alpha>]``,
  ``adv-<eps in /255>``.

Batch defenses run in a fixed order whatever the order written: crop_flip, cutout, mixup,
cutmix, then adversarial training on the result (PGD against the mixed soft targets). Data
defenses run in the order written. Randomness comes only from the ``torch.Generator`` passed
in, drawn on the CPU, so a run is reproducible on any device.

>>> plan = parse_defenses("jpeg-50+crop_flip+adv-8")
>>> [d.name for d in plan.data], [d.name for d in plan.batch], plan.adversarial.name
(['jpeg-50'], ['crop_flip'], 'adv-8')
"""
from __future__ import annotations

import io
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..runtime import autocast, crop_flip

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Luma weights of ITU-R BT.601 (what PIL's ``convert("L")`` uses).
LUMA_601 = (0.299, 0.587, 0.114)


def _check_uint8_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"data-level defenses take uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, seeded from ``gen`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


# =============================================================================================
# Data-level defenses (run once on the released uint8 training images)

class DataDefense(ABC):
    """Transform of the released training set: uint8 N x C x H x W -> same shape and dtype."""

    name: str

    @abstractmethod
    def __call__(self, images: Tensor) -> Tensor: ...

    def note(self, channels: int) -> str | None:
        """A remark for the report when the defense does nothing on such images, else None."""
        del channels
        return None


class JPEG(DataDefense):
    """JPEG re-compression round trip with PIL at ``quality`` (1..100), image by image; 1- and
    3-channel images are encoded as L / RGB, other channel counts channel by channel.
    Against unlearnable examples: Liu et al. 2023 ("Image Shortcut Squeezing", ICML)."""

    def __init__(self, quality: int):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
        self.quality = int(quality)
        self.name = f"jpeg-{self.quality}"

    def _roundtrip(self, arr: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as img:
            return np.asarray(img.convert("RGB" if arr.ndim == 3 else "L"))

    def __call__(self, images: Tensor) -> Tensor:
        _check_uint8_images(images)
        arr = images.cpu().numpy()
        out = np.empty_like(arr)
        for i in range(arr.shape[0]):
            if arr.shape[1] == 3:
                out[i] = self._roundtrip(np.ascontiguousarray(arr[i].transpose(1, 2, 0))).transpose(2, 0, 1)
            else:
                for c in range(arr.shape[1]):
                    out[i, c] = self._roundtrip(np.ascontiguousarray(arr[i, c]))
        return torch.from_numpy(out).to(images.device)


class GaussianBlur(DataDefense):
    """Gaussian blur, 3x3 kernel, standard deviation ``sigma`` px, reflect padding, per
    channel (a depthwise conv2d), rounded back to uint8."""

    def __init__(self, sigma: float = 1.0, kernel: int = 3):
        if not sigma > 0:
            raise ValueError(f"blur sigma must be > 0, got {sigma}")
        self.sigma, self.kernel = float(sigma), int(kernel)
        self.name = "blur" if self.sigma == 1.0 else f"blur-{self.sigma:g}"

    def __call__(self, images: Tensor) -> Tensor:
        _check_uint8_images(images)
        c, r = images.shape[1], self.kernel // 2
        offs = torch.arange(-r, r + 1, dtype=torch.float32, device=images.device)
        k1 = torch.exp(-0.5 * (offs / self.sigma) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(c, 1, -1, -1)
        x = F.pad(images.float(), (r, r, r, r), mode="reflect")
        return F.conv2d(x, k2, groups=c).round_().clamp_(0, 255).to(torch.uint8)


class BitDepth(DataDefense):
    """Bit-depth reduction to ``bits`` (1..8) bits per channel: each value goes to the nearest
    of 2**bits evenly spaced levels of [0, 255] (Xu et al. 2018, "Feature Squeezing"; used
    against unlearnable examples by Liu et al. 2023)."""

    def __init__(self, bits: int):
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bitdepth bits must be in 1..8, got {bits}")
        self.bits = int(bits)
        self.name = f"bitdepth-{self.bits}"

    def __call__(self, images: Tensor) -> Tensor:
        _check_uint8_images(images)
        top = 2**self.bits - 1
        levels = torch.round(images.double() * (top / 255.0))
        return torch.round(levels * (255.0 / top)).to(torch.uint8)


class Grayscale(DataDefense):
    """RGB -> gray (BT.601 luma, as PIL's ``convert("L")``), replicated to 3 channels so the
    victim's input shape is kept. A no-op on 1-channel images (already gray): see ``note``.
    Liu et al. 2023 ("Image Shortcut Squeezing") found it removes low-frequency poisons."""

    name = "grayscale"

    def __call__(self, images: Tensor) -> Tensor:
        _check_uint8_images(images)
        if images.shape[1] == 1:
            return images.clone()
        if images.shape[1] != 3:
            raise ValueError(f"grayscale needs 1- or 3-channel images, got {images.shape[1]} channels")
        w = torch.tensor(LUMA_601, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        gray = (images.double() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        return gray.expand(-1, 3, -1, -1).contiguous()

    def note(self, channels: int) -> str | None:
        return "grayscale: no-op, the images have 1 channel" if channels == 1 else None


class ISS(DataDefense):
    """Image Shortcut Squeezing (Liu, Zhao & Larson, ICML 2023): grayscale, then JPEG at
    ``quality``, then bit-depth reduction to ``bits``. The paper evaluates each squeeze on its
    own (JPEG-10 its headline setting); chaining the three is this project's strongest
    compression option. Defaults: quality 10, 4 bits (the bit count is our choice)."""

    def __init__(self, quality: int = 10, bits: int = 4):
        self.steps = (Grayscale(), JPEG(quality), BitDepth(bits))
        self.name = "iss" if (quality, bits) == (10, 4) else f"iss-{quality}-{bits}"

    def __call__(self, images: Tensor) -> Tensor:
        for step in self.steps:
            images = step(images)
        return images

    def note(self, channels: int) -> str | None:
        return "iss: grayscale step is a no-op on 1-channel images" if channels == 1 else None


# =============================================================================================
# Training-time defenses (run on every batch)

class BatchDefense(ABC):
    """Batch transform: float N x C x H x W in [0, 1] and soft targets N x K -> the same."""

    name: str
    order: int  # position in the fixed pipeline order

    @abstractmethod
    def __call__(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]: ...


class CropFlip(BatchDefense):
    """Standard augmentation: random crop with ``pad`` px of padding (zero as torchvision's
    ``RandomCrop(padding=4)``, or reflect), i.e. a per-image shift in [-pad, pad]^2, and a
    horizontal flip with probability 1/2. Vectorized: one gather with per-image offsets."""

    order = 0

    def __init__(self, pad: int = 4, pad_mode: str = "constant"):
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be constant or reflect, got {pad_mode!r}")
        self.pad, self.pad_mode = int(pad), pad_mode
        self.name = "crop_flip"

    def __call__(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return crop_flip(x, gen, pad=self.pad, pad_mode=self.pad_mode), targets


class Cutout(BatchDefense):
    """Cutout (DeVries & Taylor 2017): zero a ``length`` x ``length`` square per image, centre
    uniform over the image, clipped at the borders (so near an edge less is cut). Default
    length: half the image side (16 px at 32 px, the paper's CIFAR-10 setting)."""

    order = 1

    def __init__(self, length: int | None = None):
        if length is not None and int(length) < 1:
            raise ValueError(f"cutout length must be >= 1 px, got {length}")
        self.length = None if length is None else int(length)
        self.name = "cutout" if length is None else f"cutout-{self.length}"

    def __call__(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        length = self.length or max(1, round(h / 2))
        cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
        cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
        y0, x0 = cy - length // 2, cx - length // 2
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_y = (ar_h[None] >= y0[:, None]) & (ar_h[None] < (y0 + length)[:, None])
        in_x = (ar_w[None] >= x0[:, None]) & (ar_w[None] < (x0 + length)[:, None])
        hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
        return x.masked_fill(hole, 0.0), targets


class Mixup(BatchDefense):
    """mixup (Zhang et al. 2018): x <- lam x + (1 - lam) x[perm], same for the soft targets,
    one lam ~ Beta(alpha, alpha) per batch (alpha 1.0: the paper's CIFAR setting)."""

    order = 2

    def __init__(self, alpha: float = 1.0):
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.name = "mixup" if self.alpha == 1.0 else f"mixup-{self.alpha:g}"

    def __call__(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


class CutMix(BatchDefense):
    """CutMix (Yun et al. 2019): with probability ``prob`` per batch, paste a box of another
    image of the batch (side sqrt(1 - lam) of the image, lam ~ Beta(alpha, alpha), centre
    uniform, clipped) and mix the targets by the pasted area. Defaults alpha 1.0, prob 0.5:
    the paper's CIFAR setting."""

    order = 3

    def __init__(self, alpha: float = 1.0, prob: float = 0.5):
        if not alpha > 0 or not 0 <= prob <= 1:
            raise ValueError(f"cutmix needs alpha > 0 and prob in [0, 1], got {alpha}, {prob}")
        self.alpha, self.prob = float(alpha), float(prob)
        self.name = "cutmix" if self.alpha == 1.0 else f"cutmix-{self.alpha:g}"

    def __call__(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        apply = float(torch.rand((), generator=gen)) < self.prob
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(n, generator=gen).to(x.device)
        cy = int(torch.randint(0, h, (1,), generator=gen))
        cx = int(torch.randint(0, w, (1,), generator=gen))
        if not apply:
            return x, targets
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return out, kept * targets + (1 - kept) * targets[perm]


class AdversarialTraining:
    """PGD adversarial training (Madry et al. 2018): every training batch is replaced by its
    L-inf PGD adversarial example against the current victim, ``eps`` (in [0, 1] units, given
    in /255 in the name ``adv-<eps>``), ``steps`` steps of size ``step_size`` (default eps/4),
    uniform random start, the image kept in [0, 1]. The attack runs with the victim in eval
    mode (so BatchNorm statistics are not updated by attack passes), then training resumes.
    Costs ``steps`` extra forward+backward passes per batch."""

    def __init__(self, eps_255: float, steps: int = 5, step_size_255: float | None = None):
        if not 0 < eps_255 <= 64:
            raise ValueError(f"adv eps must be in (0, 64] (/255 units), got {eps_255}")
        self.eps = float(eps_255) / 255.0
        self.steps = int(steps)
        self.step_size = (float(step_size_255) / 255.0) if step_size_255 is not None else self.eps / 4
        self.name = f"adv-{eps_255:g}"

    def perturb(self, model: nn.Module, x: Tensor, targets: Tensor, loss_fn: LossFn, gen: torch.Generator,
                precision: str = "fp32") -> Tensor:
        """Return the adversarial batch (detached), |x_adv - x| <= eps, x_adv in [0, 1]."""
        was_training = model.training
        model.eval()
        delta = torch.empty_like(x).copy_((torch.rand(tuple(x.shape), generator=gen) * 2 - 1) * self.eps)
        delta = (x + delta).clamp_(0, 1) - x
        try:
            for _ in range(self.steps):
                delta.requires_grad_(True)
                with autocast(precision, x.device):
                    loss = loss_fn(model(x + delta), targets)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta + self.step_size * grad.sign()).clamp_(-self.eps, self.eps)
                    delta = (x + delta).clamp_(0, 1) - x
        finally:
            model.train(was_training)
        return (x + delta).clamp_(0, 1).detach()  # the clamp only absorbs float rounding


# =============================================================================================
# Registry and parsing

@dataclass(frozen=True)
class DefenseSpec:
    """A registry entry: name pattern, kind, one-line description, constructor from the
    parameter strings of the name."""

    pattern: str
    kind: str  # "data" | "batch" | "adversarial" | "attacker" (run by salm_fast.evaluate, not by a victim)
    description: str
    make: Callable[..., object]


def _int(s: str) -> int:
    return int(s)


DEFENSES: dict[str, DefenseSpec] = {
    "jpeg": DefenseSpec("jpeg-<quality 1..100>", "data", "JPEG re-compression round trip (PIL)",
                        lambda q: JPEG(_int(q))),
    "blur": DefenseSpec("blur[-<sigma px>]", "data", "3x3 Gaussian blur, sigma 1.0 by default",
                        lambda s=None: GaussianBlur(1.0 if s is None else float(s))),
    "bitdepth": DefenseSpec("bitdepth-<bits 1..8>", "data", "bit-depth reduction to 2**bits levels",
                            lambda b: BitDepth(_int(b))),
    "grayscale": DefenseSpec("grayscale", "data", "RGB -> BT.601 gray, replicated to 3 channels (no-op on gray)",
                             lambda: Grayscale()),
    "iss": DefenseSpec("iss[-<quality>-<bits>]", "data", "Image Shortcut Squeezing: grayscale + JPEG-10 + 4-bit",
                       lambda q=None, b=None: ISS(10 if q is None else _int(q), 4 if b is None else _int(b))),
    "crop_flip": DefenseSpec("crop_flip", "batch", "random crop (pad 4, zero) + horizontal flip",
                             lambda: CropFlip()),
    "cutout": DefenseSpec("cutout[-<px>]", "batch", "Cutout: zero a square (default half the side)",
                          lambda n=None: Cutout(None if n is None else _int(n))),
    "mixup": DefenseSpec("mixup[-<alpha>]", "batch", "mixup, Beta(1, 1) by default",
                         lambda a=None: Mixup(1.0 if a is None else float(a))),
    "cutmix": DefenseSpec("cutmix[-<alpha>]", "batch", "CutMix, Beta(1, 1), p 0.5 by default",
                          lambda a=None: CutMix(1.0 if a is None else float(a))),
    "adv": DefenseSpec("adv-<eps /255>", "adversarial", "PGD adversarial training, 5 steps of eps/4",
                       lambda e: AdversarialTraining(float(e))),
    # The attacker's protocol steps: they need the owner's clean val split, the release's other splits or
    # our protection code, so salm_fast.evaluate and the experiment grid run them (api.attacker_data).
    "best-val": DefenseSpec("best-val", "attacker", "keep the epoch of best AUC on the clean val split",
                            lambda: _attacker_step("best-val")),
    "clean-splits": DefenseSpec("clean-splits", "attacker", "also train on every split released clean",
                                lambda: _attacker_step("clean-splits")),
    "purify": DefenseSpec("purify", "attacker", "known-pattern removal: re-protect, learn the pattern, remove it",
                          lambda: _attacker_step("purify")),
}


def _attacker_step(name: str):
    raise ValueError(f"{name} is a step of the attacker's protocol, not a victim defense: "
                     "salm_fast.evaluate and salm-fast experiment run it")

_NUMBER = r"\d+(?:\.\d+)?"
_NAME_RE = re.compile(rf"^([a-z_]+)((?:-{_NUMBER})*)$")


def valid_names() -> str:
    return ", ".join(spec.pattern for spec in DEFENSES.values())


def make_defense(name: str) -> DataDefense | BatchDefense | AdversarialTraining:
    """One defense from its name, e.g. ``"jpeg-50"``, ``"blur-0.5"``, ``"adv-8"``."""
    token = name.strip().lower()
    if token in DEFENSES and DEFENSES[token].kind == "attacker":
        return DEFENSES[token].make()  # type: ignore[return-value]
    m = _NAME_RE.match(token)
    base = m.group(1) if m else None
    if base not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; valid: {valid_names()}")
    params = [p for p in m.group(2).split("-") if p]
    try:
        return DEFENSES[base].make(*params)  # type: ignore[return-value]
    except TypeError:
        raise ValueError(f"defense {name!r}: wrong number of parameters; expected {DEFENSES[base].pattern}") from None


@dataclass
class DefensePlan:
    """Parsed defenses: data-level in the order given, batch ones in pipeline order, at most
    one adversarial training."""

    data: list[DataDefense] = field(default_factory=list)
    batch: list[BatchDefense] = field(default_factory=list)
    adversarial: AdversarialTraining | None = None

    @property
    def name(self) -> str:
        names = [d.name for d in self.data] + [b.name for b in self.batch]
        names += [self.adversarial.name] if self.adversarial else []
        return "+".join(names) or "none"

    def apply_data(self, images: Tensor) -> Tensor:
        for d in self.data:
            images = d(images)
        return images

    def apply_batch(self, x: Tensor, targets: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        for b in self.batch:
            x, targets = b(x, targets, gen)
        return x, targets

    def notes(self, channels: int) -> list[str]:
        return [n for d in self.data if (n := d.note(channels))]


def parse_defenses(spec: str | Sequence[str] | None) -> DefensePlan:
    """Parse ``"a+b+c"`` (or a list of names; None, "" or "none" for no defense). Raises
    ValueError on an unknown name (listing the valid ones), a name given twice, or two
    adversarial trainings."""
    if spec is None:
        tokens: list[str] = []
    elif isinstance(spec, str):
        tokens = [t for t in spec.split("+") if t.strip()] if spec.strip().lower() != "none" else []
    else:
        tokens = [t for s in spec for t in s.split("+") if t.strip()]
    plan, seen = DefensePlan(), set()
    for token in tokens:
        d = make_defense(token)
        key = type(d).__name__
        if key in seen:
            raise ValueError(f"defense {type(d).__name__} given twice in {spec!r}")
        seen.add(key)
        if isinstance(d, DataDefense):
            plan.data.append(d)
        elif isinstance(d, BatchDefense):
            plan.batch.append(d)
        else:
            plan.adversarial = d
    plan.batch.sort(key=lambda b: b.order)
    return plan


__all__ = [
    "DEFENSES", "ISS", "JPEG", "AdversarialTraining", "BatchDefense", "BitDepth", "CropFlip", "CutMix", "Cutout",
    "DataDefense", "DefensePlan", "DefenseSpec", "GaussianBlur", "Grayscale", "Mixup", "make_defense",
    "parse_defenses", "valid_names",
]
