"""Known-pattern removal: the attacker who runs our code (Kerckhoffs) and filters out what it makes.

The attacker holds the release (perturbed images and their labels) and this package. They
protect the release once more with our default method under a seed of their own, which gives
pairs (re-protected image -> release image) whose difference is a perturbation of exactly the
kind the release carries. A small residual convolutional denoiser trained on those pairs
learns to predict that kind of perturbation; applied to the release it subtracts its estimate,
and the victim trains on the result (rounded back to uint8, as the attacker would store it).

The protector is injected (``protector(images_u8, labels) -> images_u8``, N x C x H x W): this
module never imports the protection methods (:class:`salm_fast.api.PurifySettings` builds one
from the method registry).

Denoiser: ``depth`` 3 x 3 convolutions of ``width`` channels with ReLU between them, the last
one predicting the perturbation (zero-initialized: training starts from the identity); a
weighted squared error on the perturbation in [0, 1] units, Adam, a fixed number of steps on
random batches, everything drawn from ``seed``. Two choices make it work on a sparse release:

* the pairs' target (the release) still carries the release's own perturbation wherever the
  re-protection left a pixel alone; at full weight those pixels teach the denoiser to keep it
  (an unweighted denoiser shrank its estimate to a quarter and left the error unchanged), so
  pixels the re-protection did not change weigh ``unchanged_weight`` (0.1);
* an estimate smaller than half the largest perturbation of the pairs (4/255 at eps 8/255) is
  not subtracted: small estimates on clean pixels would otherwise round to +-1 grey level.

Measured (tests/test_purify.py: synthetic 28 px images, 96 of them; mean absolute error against
the clean images, in grey levels; width 16, 150 steps). The SALM of the first releases (a public
class texture; K = 20%, one bi-level round), the attacker's seed not the owner's: 1.53 -> 1.16
over all pixels, 7.8 -> 3.2 on the perturbed ones. Today's SALM, whose code is keyed by the
owner's secret seed: with the attacker's own seed 1.28 -> 1.31 over all pixels, 7.06 -> 5.89 on
the perturbed ones; with the owner's seed (a leaked key) 1.28 -> 1.01 and 7.06 -> 5.08.
A fixed stripe pattern on three 7 x 7 blocks per image: 1.31 -> 0.68, 7.8 -> 2.7.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defenses import _check_uint8_images

#: ``protector(images, labels)``: uint8 N x C x H x W and N int64 labels -> the re-protected uint8 images.
Protector = Callable[[Tensor, Tensor], Tensor]


class ResidualDenoiser(nn.Module):
    """``depth`` 3 x 3 convolutions (``width`` channels, ReLU between): images in [0, 1] -> their estimated
    perturbation (same shape)."""

    def __init__(self, channels: int, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"denoiser needs depth >= 2 and width >= 1, got {depth}, {width}")
        sizes = [channels] + [width] * (depth - 1) + [channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(sizes, sizes[1:]))
        nn.init.zeros_(self.convs[-1].weight)  # starts as the identity: no perturbation predicted
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.convs[:-1]:
            h = F.relu(conv(h))
        return self.convs[-1](h)


class KnownPatternRemoval:
    """The ``purify`` counter-measure: re-protect the release with ``protector``, learn to remove that
    perturbation, remove it from the release. ``__call__(images, labels)`` takes the released uint8
    N x C x H x W training images and their labels and returns the purified uint8 images.

    ``steps`` optimizer steps of ``batch_size`` images (Adam, ``lr``); ``seed`` draws the denoiser's
    initialization and batches. After a call, ``info`` holds the pair statistics and the final loss.
    """

    name = "purify"

    def __init__(self, protector: Protector, *, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                 width: int = 32, depth: int = 4, unchanged_weight: float = 0.1, seed: int = 0):
        if not callable(protector):
            raise TypeError(f"protector must be callable (images, labels) -> images, got {type(protector).__name__}")
        for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"purify: {name} must be an int >= {low}, got {value!r}")
        if not lr > 0:
            raise ValueError(f"purify: lr must be > 0, got {lr!r}")
        self.protector, self.steps, self.batch_size, self.lr = protector, steps, batch_size, float(lr)
        self.width, self.depth, self.seed = width, depth, seed
        self.unchanged_weight = float(unchanged_weight)
        self.threshold = 0.0  # set by fit: half the largest perturbation of the pairs
        self.info: dict[str, float] = {}

    def fit(self, images: Tensor, labels: Tensor) -> ResidualDenoiser:
        """The denoiser trained on (re-protected ``images`` -> ``images``) pairs."""
        _check_uint8_images(images)
        again = self.protector(images, labels)
        if not isinstance(again, Tensor) or again.shape != images.shape or again.dtype != torch.uint8:
            raise ValueError(f"purify: the protector must return uint8 images of shape {tuple(images.shape)}")
        target = images.float() / 255
        noisy = again.float() / 255
        # The pixels the re-protection changed weigh most: elsewhere the target still carries the release's
        # own perturbation, and at full weight those pixels teach the denoiser to keep it.
        weight = torch.where(again != images, 1.0, self.unchanged_weight)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = ResidualDenoiser(images.shape[1], self.width, self.depth)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        with torch.enable_grad():
            loss = self._train(net, opt, noisy, target, weight, gen)
        self.threshold = float((noisy - target).abs().max()) / 2
        changed = (again != images).any(dim=1).float().mean()
        self.info = {"pairs": len(images), "pair_l0": float(changed), "threshold_255": self.threshold * 255,
                     "final_loss_255": float(loss.detach()) * 255 ** 2}
        return net.eval()

    def _train(self, net: ResidualDenoiser, opt: torch.optim.Optimizer, noisy: Tensor, target: Tensor,
               weight: Tensor, gen: torch.Generator) -> Tensor:
        """``steps`` Adam steps of the weighted squared error of the predicted perturbation; the last loss."""
        loss = torch.zeros(())
        for _ in range(self.steps):
            idx = torch.randint(0, len(noisy), (min(self.batch_size, len(noisy)),), generator=gen)
            err = net(noisy[idx]) - (noisy[idx] - target[idx])
            loss = (weight[idx] * err * err).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    @torch.no_grad()
    def apply(self, net: ResidualDenoiser, images: Tensor, batch: int = 512) -> Tensor:
        """``images`` (uint8) minus the denoiser's estimate of their perturbation, rounded to uint8."""
        _check_uint8_images(images)
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float() / 255
            est = net(x)
            est = torch.where(est.abs() >= self.threshold, est, torch.zeros_like(est))
            out.append((x - est).clamp_(0, 1))
        return (torch.cat(out) * 255).round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.apply(self.fit(images, labels), images)


__all__ = ["KnownPatternRemoval", "Protector", "ResidualDenoiser"]
