"""What the bi-level loop optimizes: one perturbation per image, per class, or a generator.

Each :class:`Noise` gives the current perturbation of a batch (already restricted to
the mask, clipped to the L-inf budget and kept inside [0, 1] by the fused
``masked_linf_project``) and runs the perturbation half of a round. All updates go
through ``salm_fast.ops`` (``pgd_step`` for PGD noise, ``masked_linf_project`` with
autograd for the generator), so the hot loop runs on the fused kernels.

A noise sees the loop only through a :class:`LoopView` (the data, the current mask, the
loop's random stream, its loss and its batch sampler), which the trainer owns and hands to
:meth:`Noise.optimize`; this module knows nothing else of the trainer.

Devices and memory: every noise lives on the loop's device (``device=``). The images come
through a :class:`~salm_fast.data.view.ImageView` (float batches made from uint8 on demand)
and masks are uint8, so nothing here holds the data set as float. The one per-image state,
:class:`SampleWiseNoise`'s perturbations, is float32 (exact) or int8 levels of the release
grid (a quarter of the memory; ``storage=``, see the class).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import distributed as D
from . import ops
from .data.view import pass_batch
from .release import LEVELS, budget_levels, stored_steps


@dataclass
class LoopView:
    """What the perturbation half of a round may see of the bi-level loop.

    ``x`` N x C x H x W in [0, 1] (an :class:`~salm_fast.data.view.ImageView` or a tensor: ``x[idx]``
    is a float batch on the loop's device), ``y`` N labels, ``mask`` N x 1 x H x W uint8 (the pixels
    the noise may touch; the trainer replaces it on a refresh). ``gen`` is the loop's one seeded stream:
    every draw a noise makes comes from it, so a checkpoint resumes to the same bytes.
    ``loss(xb, yb)`` is the surrogate's loss on a batch (with the loop's augmentation);
    ``sample()`` draws a batch of indices. ``n_total``: the images of all ranks when many processes
    share the loop (``torchrun``; ``x`` is then this rank's shard); in one process None or ``len(x)``.
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    gen: torch.Generator
    loss: Callable[[Tensor, Tensor], Tensor]
    sample: Callable[[], Tensor]
    n_total: int | None = None


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

    def synchronize(self) -> None:
        """Many processes: make what the ranks share (a generator's weights) rank 0's. Per-image and
        zero-initialized states need nothing (the default)."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @torch.no_grad()
    def export(self, x, y: Tensor, mask: Tensor, batch_size: int = 1024) -> Tensor:
        """The perturbation of every image, N x C x H x W (the whole set at once: prefer
        :meth:`~salm_fast.methods.base.Protection.batches` for large sets)."""
        out = torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
        for start in range(0, len(x), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(x)))
            out[idx] = self.delta(idx, x[idx], y[idx], mask[idx])
        return out


def _input_grad(loop: LoopView, xb: Tensor, yb: Tensor, d: Tensor) -> tuple[Tensor, float]:
    d = d.detach().requires_grad_(True)
    loss = loop.loss(xb + d, yb)
    (g,) = torch.autograd.grad(loss, d)
    return g, float(loss.detach())


#: Per-image noise storage: float32 (exact) or whole levels of the release's 8-bit grid.
STORAGES = ("float", "int8")

#: Input elements per forward/backward of a PGD step: a batch of 256 RGB 64 px images whole (so 28 and
#: 64 px sets step as they always did); larger images step in parts of fewer images (20 at 224 px RGB),
#: since the surrogate's activations kept for the backward grow with the pixels (an RGB 224 px image:
#: 34 MiB of saved tensors for the default cnn-half in fp32, 19 MiB in bf16 autocast).
GRAD_ELEMENTS = 256 * 3 * 64 * 64


def grad_batch(shape: tuple[int, ...], limit: int) -> int:
    """Images per forward/backward over images of ``shape`` (N x C x H x W): at most ``limit``, at most
    :data:`GRAD_ELEMENTS` input elements, at least 1."""
    return max(1, min(limit, GRAD_ELEMENTS // max(1, math.prod(shape[1:]))))


class SampleWiseNoise(Noise):
    """One perturbation per image, optimized by PGD (Huang et al., ICLR 2021, for sign=-1).

    Each round is one pass over the data in batches, ``steps`` PGD steps of size
    ``step_size`` per batch, warm-started from the current perturbation. An image's steps depend
    on its own gradient alone (the surrogate is in eval mode, a step takes the gradient's sign), so a
    batch whose activations would be too large (:func:`grad_batch`: large images) steps in parts of
    fewer images, to the same perturbation up to float rounding.

    ``storage``: ``"float"`` keeps every perturbation as float32 (4 bytes per pixel and channel);
    ``"int8"`` keeps whole 8-bit levels (1 byte; int16 when eps exceeds 127/255), written back
    after each batch's PGD steps with the release's own rounding
    (:func:`salm_fast.release.stored_steps`): the steps of a batch still run in float, and what
    is stored is exactly what the uint8 release of that perturbation holds, so storing levels
    loses nothing the release keeps. What it changes is the warm start of the next round (the
    levels, not the float) and what the surrogate is trained on (x + the stored levels, i.e. the
    release): a run with int8 storage is not bit-identical to one with float storage.
    """

    def __init__(self, shape: tuple[int, ...], eps: float, *, steps: int = 20, step_size: float = 0.8 / 255,
                 batch_size: int = 256, sign: int = -1, init: Tensor | None = None, done_loss: float = 0.0,
                 storage: str = "float", device: str | torch.device = "cpu"):
        super().__init__(eps, sign=sign)
        if storage not in STORAGES:
            raise ValueError(f"noise storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.steps, self.step_size, self.batch_size = steps, step_size, batch_size
        # Error-minimizing only: a batch whose loss is already below done_loss needs no more
        # steps this round (0 disables the early exit: the reference semantics).
        self.done_loss = done_loss
        self.storage = storage
        dtype = torch.float32 if storage == "float" else torch.int8 if budget_levels(eps) <= 127 else torch.int16
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)
        if init is not None:
            self._store(slice(None), init.to(device))

    def _store(self, idx, d: Tensor) -> None:
        self.buffer[idx] = d if self.storage == "float" else stored_steps(d, self.eps, LEVELS).to(self.buffer.dtype)

    def _stored(self, idx, x: Tensor, mask: Tensor) -> Tensor:
        """The float perturbation of images ``idx``; int8 levels are decoded and projected again (the
        projection only moves a value by float rounding, e.g. at 1 - x, never to another level)."""
        if self.storage == "float":
            return self.buffer[idx]
        return ops.masked_linf_project(x, self.buffer[idx].to(x.dtype).div_(LEVELS), mask, self.eps)

    def delta(self, idx, x, y, mask):
        return self._stored(idx, x, mask)

    def on_mask_change(self, x, mask):
        step = pass_batch(tuple(x.shape))
        for start in range(0, len(x), step):
            sl = slice(start, min(start + step, len(x)))
            self._store(sl, ops.masked_linf_project(x[sl], self._stored(sl, x[sl], mask[sl]), mask[sl], self.eps))

    def optimize(self, loop):
        loss, steps_done = 0.0, 0
        n = len(loop.x)
        order = torch.randperm(n, generator=loop.gen)
        batch = grad_batch(tuple(loop.x.shape), self.batch_size)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = loop.x[idx], loop.y[idx]
            mb = loop.mask[idx].to(xb.dtype)
            d = self._stored(idx, xb, mb)
            for _ in range(self.steps):
                g, loss = _input_grad(loop, xb, yb, d)
                if self.sign < 0 and loss < self.done_loss:
                    break
                ops.pgd_step(xb, d, g, mb, self.eps, self.step_size, self.sign, out=d)
                steps_done += len(idx)
            self._store(idx, d)
        return loss, steps_done, {}

    def state_dict(self):
        return {"buffer": self.buffer, "storage": self.storage}

    def load_state_dict(self, state):
        if state.get("storage", "float") != self.storage:
            raise ValueError(f"the checkpoint stores {state.get('storage', 'float')} noise, this run {self.storage}")
        self.buffer = state["buffer"].to(self.buffer.device, copy=True)


class ClassWiseNoise(Noise):
    """One perturbation per class, shared by all its images, optimized by PGD.

    The class pattern is clipped to [-eps, eps]; each image then sees it restricted to
    its own mask and cut to keep its pixels in [0, 1]. One step per batch; a batch of large
    images computes its gradient in parts (:meth:`_pattern_grad`), to the same step.
    """

    def __init__(self, n_classes: int, image_shape: tuple[int, ...], eps: float, *, steps: int = 20,
                 step_size: float = 0.8 / 255, batch_size: int = 256, sign: int = -1,
                 device: str | torch.device = "cpu"):
        super().__init__(eps, sign=sign)
        self.steps, self.step_size, self.batch_size = steps, step_size, batch_size
        self.patterns = torch.zeros((n_classes, *image_shape), device=device)
        # For the pattern itself only the eps clip applies: a mid-grey "image" and a full
        # mask make the fused projection's box and mask inactive.
        self._grey = torch.full_like(self.patterns, 0.5)
        self._full = torch.ones((n_classes, 1, *image_shape[1:]), device=device)

    def delta(self, idx, x, y, mask):
        return ops.masked_linf_project(x, self.patterns[y], mask, self.eps)

    def _pattern_grad(self, loop: LoopView, xb: Tensor, yb: Tensor, mb: Tensor) -> tuple[Tensor, float]:
        """The gradient of the batch's mean loss with respect to the patterns, and that loss. A batch of
        large images is taken in parts (:func:`grad_batch`), each part's gradient weighted by its share
        of the batch: the same gradient (the surrogate is in eval mode; one part: the very same bits),
        holding one part's activations at a time (with the loop's augmentation on, the parts draw their
        crops one after the other)."""
        n = len(yb)
        part = grad_batch(tuple(xb.shape), n)
        grad, loss = None, 0.0
        for start in range(0, n, part):
            sl = slice(start, min(n, start + part))
            p = self.patterns.detach().requires_grad_(True)
            lo = loop.loss(xb[sl] + ops.masked_linf_project(xb[sl], p[yb[sl]], mb[sl], self.eps), yb[sl])
            (g,) = torch.autograd.grad(lo, p)
            share = (sl.stop - sl.start) / n
            grad = g.mul_(share) if grad is None else grad.add_(g, alpha=share)
            loss += float(lo.detach()) * share
        return grad, loss

    def optimize(self, loop):
        loss = 0.0
        n = len(loop.x)
        order = torch.randperm(n, generator=loop.gen)
        if D.initialized():
            # Many processes: the class patterns are shared, so every rank takes the same number of batches
            # (as many as one process over all images: this rank's share of each), and each step's gradient
            # is the ranks' mean weighted by their images (a rank may have none in a step).
            total = loop.n_total if loop.n_total is not None else n
            batches = list(torch.tensor_split(order, math.ceil(total / self.batch_size)))
        else:
            batches = [order[start:start + self.batch_size] for start in range(0, n, self.batch_size)]
        for idx in batches:
            xb, yb = loop.x[idx], loop.y[idx]
            mb = loop.mask[idx].to(xb.dtype)
            for _ in range(self.steps):
                p = self.patterns.detach().requires_grad_(True)
                if len(idx):
                    g, loss = self._pattern_grad(loop, xb, yb, mb)
                else:
                    g = torch.zeros_like(self.patterns)
                if D.initialized():
                    p.grad = g
                    D.average_gradients([p], len(idx))
                    g = p.grad if p.grad is not None else torch.zeros_like(self.patterns)
                ops.pgd_step(self._grey, self.patterns, g, self._full, self.eps, self.step_size, self.sign,
                             out=self.patterns)
        return loss, n * self.steps, {}

    def state_dict(self):
        return {"patterns": self.patterns}

    def load_state_dict(self, state):
        self.patterns = state["patterns"].to(self.patterns.device, copy=True)


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
            D.average_gradients(self.net.parameters(), len(idx))  # many processes: the ranks' mean (else nothing)
            self.opt.step()
        self.net.eval()
        return float(loss.detach()), n_images, {}

    def synchronize(self):
        D.broadcast_module(self.net)

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
