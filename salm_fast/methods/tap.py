"""Targeted adversarial poisoning (TAP): error-maximizing noise from a frozen, cleanly trained surrogate.

Fowl et al., "Adversarial Examples Make Strong Poisons", NeurIPS 2021. The baseline that
needs no bi-level loop: train a crafting model on the clean data, freeze it, and give each
image an adversarial perturbation against it.

* surrogate: ``surrogate`` (default the protector's ``cnn-half``) trained on the clean data
  by ``surrogate.train_clean`` (Adam, lr 1e-3, batch 128) for ``surrogate_epochs`` epochs
  (default 10, longer than SALM's phase 1 so that the crafting model is decent), then frozen
  in eval mode, its BatchNorm statistics first reset to the clean data's (one pass, cumulative
  average: a short run leaves the running averages far from them);
* targeted (default): descend the cross-entropy toward the fixed class permutation
  ``t(y) = (y + 1) mod C`` (the paper's class-targeted poisons);
  untargeted (``targeted=False``): ascend the cross-entropy of the true class;
* per image, L-inf PGD from zero: ``steps`` (default 40) sign-gradient steps of
  ``step_size`` (default eps / 8) through the fused ``ops.pgd_step`` (in place, batches of
  256), each step projected onto |delta| <= eps and x + delta in [0, 1]. No random start, no
  differentiable augmentation inside the attack (the paper's is optional, not done here).

Norm: L-inf ``eps`` (default 8/255) on every pixel (not masked). Shapes: ``x`` N x C x H x W
in [0, 1], ``y`` N int64; ``fit`` returns a ``Protection`` whose ``delta`` is N x C x H x W.
Deterministic from ``seed`` (the surrogate's initialization and batch order).

Example::

    tap = TAP(eps=8 / 255, steps=40, seed=0)
    p = tap.fit(x, y, n_classes)          # p.delta: N x C x H x W, |delta| <= 8/255
    salm_fast.protect("synthetic", "tap", out="out/tap", targeted=False)  # error-maximizing
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .. import surrogate as S
from .base import Method, Protection, check_choice, check_int, check_number


class TAP(Method):
    name = "tap"
    paper = "Fowl et al., Adversarial Examples Make Strong Poisons, NeurIPS 2021 (targeted adversarial poisoning)"
    norm = "Linf"
    batch_size: ClassVar[int] = 256
    train_batch_size: ClassVar[int] = 128
    train_lr: ClassVar[float] = 1e-3

    def __init__(self, eps: float | None = None, *, seed: int = 0, k: int | float | None = None,
                 targeted: bool = True, steps: int = 40, step_size: float | None = None, surrogate_epochs: int = 10,
                 surrogate: str = S.DEFAULT_SURROGATE):
        super().__init__(eps, seed=seed, k=k)
        self.targeted = check_choice("tap", "targeted", targeted, (True, False))
        self.steps = check_int("tap", "steps", steps, 1)
        self.step_size = check_number("tap", "step_size", self.eps / 8 if step_size is None else step_size, 1.0)
        self.surrogate_epochs = check_int("tap", "surrogate_epochs", surrogate_epochs, 1)
        self.surrogate_arch = check_choice("tap", "surrogate", surrogate, S.SURROGATES)
        self.surrogate: torch.nn.Module | None = None  # the frozen crafting model, after fit

    def options(self) -> dict[str, Any]:
        return {**super().options(), "targeted": self.targeted, "steps": self.steps, "step_size": self.step_size,
                "surrogate_epochs": self.surrogate_epochs, "surrogate": self.surrogate_arch,
                "batch_size": self.batch_size}

    @staticmethod
    def target_of(y: Tensor, n_classes: int) -> Tensor:
        """The paper's fixed class permutation t(y) = (y + 1) mod C."""
        return (y + 1) % n_classes

    def _fit(self, x, y, n_classes, ctx):
        n, c, h, w = x.shape
        gen = torch.Generator().manual_seed(self.seed)
        model = S.build_surrogate(self.surrogate_arch, c, n_classes, h).to(x.device)
        train_acc = S.train_clean(model, x, y, epochs=self.surrogate_epochs, batch_size=self.train_batch_size,
                                  lr=self.train_lr, gen=gen)
        _recalibrate_batchnorm(model, x, self.batch_size)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.surrogate = model

        goal = self.target_of(y, n_classes) if self.targeted else y
        sign = -1 if self.targeted else +1  # descend CE(t(y)) / ascend CE(y)
        delta = torch.zeros_like(x)
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            xb, gb = x[sl], goal[sl]
            mask = x.new_ones((len(xb), 1, h, w))
            d = torch.zeros_like(xb)
            for _ in range(self.steps):
                dv = d.detach().requires_grad_(True)
                loss = F.cross_entropy(S.logits(model, xb + dv), gb, reduction="sum")  # per-image gradients
                (g,) = torch.autograd.grad(loss, dv)
                ops.pgd_step(xb, d, g, mask, self.eps, self.step_size, sign, out=d)
            delta[sl] = d

        info: dict[str, Any] = {"rounds": 0, "surrogate_train_accuracy": train_acc}
        info.update(self._measure(model, x, y, delta, n_classes))
        mask = x.new_ones((n, 1, h, w))
        return Protection(delta, mask, info)

    @torch.no_grad()
    def _measure(self, model, x: Tensor, y: Tensor, delta: Tensor, n_classes: int) -> dict[str, float]:
        """The frozen surrogate on clean vs perturbed (float) images: accuracy, loss, target hit rate."""
        t = self.target_of(y, n_classes)
        stats = {"clean": [0, 0, 0.0], "perturbed": [0, 0, 0.0]}
        for start in range(0, len(x), 1024):
            sl = slice(start, start + 1024)
            for key, xb in (("clean", x[sl]), ("perturbed", x[sl] + delta[sl])):
                out = S.logits(model, xb)
                pred = out.argmax(1)
                stats[key][0] += int((pred == y[sl]).sum())
                stats[key][1] += int((pred == t[sl]).sum())
                stats[key][2] += float(F.cross_entropy(out, y[sl], reduction="sum"))
        n = len(x)
        res = {}
        for key, (acc, hit, loss) in stats.items():
            res[f"surrogate_accuracy_{key}"] = acc / n
            res[f"surrogate_loss_{key}"] = loss / n
            if self.targeted:
                res[f"target_rate_{key}"] = hit / n
        return res


@torch.no_grad()
def _recalibrate_batchnorm(model: torch.nn.Module, x: Tensor, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to the clean training data's (a cumulative average
    over one pass in train mode): a short run leaves the exponential averages far from them, and
    the frozen model is used in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for start in range(0, len(x), batch_size):
        S.logits(model, x[start:start + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
