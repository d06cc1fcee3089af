"""What the bi-level loop optimizes: one perturbation per image, per class, or a generator.

Each :class:`Noise` gives the current perturbation of a batch (already restricted to
the mask, clipped to the L-inf budget and kept inside [0, 1] by the fused
``masked_linf_project``) and runs the perturbation half of a round. All updates go
through ``salm_fast.ops`` (``pgd_step`` for PGD noise, ``masked_linf_project`` with
autograd for the generator), so the hot loop runs on the fused kernels.

A noise sees the loop only through a :class:`LoopView` (the data, the current mask, the
loop's random stream, its loss and its batch sampler), which the trainer owns and hands to
:meth:`Noise.optimize`; this module knows nothing else of the trainer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import ops


@dataclass
class LoopView:
    """What the perturbation half of a round may see of the bi-level loop.

    ``x`` N x C x H x W in [0, 1], ``y`` N labels, ``mask`` N x 1 x H x W (the pixels the noise
    may touch; the trainer replaces it on a refresh). ``gen`` is the loop's one seeded stream:
    every draw a noise makes comes from it, so a checkpoint resumes to the same bytes.
    ``loss(xb, yb)`` is the surrogate's loss on a batch (with the loop's augmentation);
    ``sample()`` draws a batch of indices.
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    gen: torch.Generator
    loss: Callable[[Tensor, Tensor], Tensor]
    sample: Callable[[], Tensor]


class Noise(ABC):
    """A parametrized, budget-bounded perturbation."""

    def __init__(self, eps: float, *, sign: int = -1):
        self.eps = float(eps)
        self.sign = sign  # -1: error-minimizing (unlearnable); +1: error-maximizing (adversarial)

    @abstractmethod
    def delta(self, idx: Tensor, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """The projected perturbation of images ``idx`` (their pixels x, labels y, mask)."""

    @abstractmethod
    def optimize(self, loop: LoopView) -> tuple[float, int, dict]:
        """The perturbation half of a round: (last loss, images processed, extra log fields)."""

    def on_mask_change(self, x: Tensor, mask: Tensor) -> None:
        """The mask was refreshed: stored perturbations must move inside the new one."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @torch.no_grad()
    def export(self, x: Tensor, y: Tensor, mask: Tensor, batch_size: int = 1024) -> Tensor:
        """The perturbation of every image, N x C x H x W."""
        out = torch.empty_like(x)
        for start in range(0, len(x), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(x)))
            out[idx] = self.delta(idx, x[idx], y[idx], mask[idx])
        return out


def _input_grad(loop: LoopView, xb: Tensor, yb: Tensor, d: Tensor) -> tuple[Tensor, float]:
    d = d.detach().requires_grad_(True)
    loss = loop.loss(xb + d, yb)
    (g,) = torch.autograd.grad(loss, d)
    return g, float(loss.detach())


class SampleWiseNoise(Noise):
    """One perturbation per image, optimized by PGD (Huang et al., ICLR 2021, for sign=-1).

    Each round is one pass over the data in batches, ``steps`` PGD steps of size
    ``step_size`` per batch, warm-started from the current perturbation.
    """

    def __init__(self, shape: tuple[int, ...], eps: float, *, steps: int = 20, step_size: float = 0.8 / 255,
                 batch_size: int = 256, sign: int = -1, init: Tensor | None = None, done_loss: float = 0.0):
        super().__init__(eps, sign=sign)
        self.steps, self.step_size, self.batch_size = steps, step_size, batch_size
        # Error-minimizing only: a batch whose loss is already below done_loss needs no more
        # steps this round (0 disables the early exit: the reference semantics).
        self.done_loss = done_loss
        self.buffer = torch.zeros(shape) if init is None else init.clone()

    def delta(self, idx, x, y, mask):
        return self.buffer[idx]

    def on_mask_change(self, x, mask):
        self.buffer = ops.masked_linf_project(x, self.buffer, mask, self.eps)

    def optimize(self, loop):
        loss, steps_done = 0.0, 0
        n = len(loop.x)
        order = torch.randperm(n, generator=loop.gen)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb, mb = loop.x[idx], loop.y[idx], loop.mask[idx]
            d = self.buffer[idx]
            for _ in range(self.steps):
                g, loss = _input_grad(loop, xb, yb, d)
                if self.sign < 0 and loss < self.done_loss:
                    break
                ops.pgd_step(xb, d, g, mb, self.eps, self.step_size, self.sign, out=d)
                steps_done += len(idx)
            self.buffer[idx] = d
        return loss, steps_done, {}

    def state_dict(self):
        return {"buffer": self.buffer}

    def load_state_dict(self, state):
        self.buffer = state["buffer"].clone()


class ClassWiseNoise(Noise):
    """One perturbation per class, shared by all its images, optimized by PGD.

    The class pattern is clipped to [-eps, eps]; each image then sees it restricted to
    its own mask and cut to keep its pixels in [0, 1].
    """

    def __init__(self, n_classes: int, image_shape: tuple[int, ...], eps: float, *, steps: int = 20,
                 step_size: float = 0.8 / 255, batch_size: int = 256, sign: int = -1):
        super().__init__(eps, sign=sign)
        self.steps, self.step_size, self.batch_size = steps, step_size, batch_size
        self.patterns = torch.zeros((n_classes, *image_shape))
        # For the pattern itself only the eps clip applies: a mid-grey "image" and a full
        # mask make the fused projection's box and mask inactive.
        self._grey = torch.full_like(self.patterns, 0.5)
        self._full = torch.ones((n_classes, 1, *image_shape[1:]))

    def delta(self, idx, x, y, mask):
        return ops.masked_linf_project(x, self.patterns[y], mask, self.eps)

    def optimize(self, loop):
        loss = 0.0
        n = len(loop.x)
        order = torch.randperm(n, generator=loop.gen)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb, mb = loop.x[idx], loop.y[idx], loop.mask[idx]
            for _ in range(self.steps):
                p = self.patterns.detach().requires_grad_(True)
                lo = loop.loss(xb + ops.masked_linf_project(xb, p[yb], mb, self.eps), yb)
                (g,) = torch.autograd.grad(lo, p)
                ops.pgd_step(self._grey, self.patterns, g, self._full, self.eps, self.step_size, self.sign,
                             out=self.patterns)
                loss = float(lo.detach())
        return loss, n * self.steps, {}

    def state_dict(self):
        return {"patterns": self.patterns}

    def load_state_dict(self, state):
        self.patterns = state["patterns"].clone()


class GeneratorNoise(Noise):
    """A generator network maps (image, label) to a perturbation; trained with Adam.

    The generator's raw output is ``eps * tanh(.)``; the fused projection (with autograd)
    then restricts it to the mask and to [0, 1], so the generator learns inside the mask.
    Being amortized, a trained generator protects new images in one forward pass.
    """

    def __init__(self, net: nn.Module, eps: float, *, steps: int = 20, lr: float = 1e-3,
                 sign: int = -1):
        super().__init__(eps, sign=sign)
        self.net, self.steps = net, steps
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)

    def delta(self, idx, x, y, mask):
        return ops.masked_linf_project(x, self.net(x, y), mask, self.eps)

    def optimize(self, loop):
        self.net.train()
        loss = torch.zeros(())
        n_images = 0
        for _ in range(self.steps):
            idx = loop.sample()
            n_images += len(idx)
            xb, yb = loop.x[idx], loop.y[idx]
            loss = loop.loss(xb + self.delta(idx, xb, yb, loop.mask[idx]), yb)
            self.opt.zero_grad(set_to_none=True)
            (-self.sign * loss).backward()  # sign -1 minimizes the loss
            self.opt.step()
        self.net.eval()
        return float(loss.detach()), n_images, {}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
