"""Random noise: the sanity baseline. Uniform in [-eps, eps], independent per pixel and channel.

A victim trained on it should do as well as on clean data: a protection method is only
credible where random noise of the same budget is not.
"""
from __future__ import annotations

import torch

from .. import ops
from .base import Method, Protection


class RandomNoise(Method):
    name = "random"
    paper = "sanity baseline (uniform noise at the same L-inf budget)"

    def __init__(self, eps: float | str | None = None, *, seed: int = 0, k: int | float | None = None):
        # k is optional here: with k, the noise lands on k random pixels per image (the
        # random-mask control for SALM); without, on every pixel.
        self.masked = k is not None
        super().__init__(eps, seed=seed, k=k)

    def _fit(self, x, y, n_classes, ctx):
        gen = torch.Generator().manual_seed(self.seed)
        noise = ((torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps).to(x.device)  # drawn on the CPU: same on every device
        n, _, h, w = x.shape
        if self.k is None:
            mask = x.new_ones((n, 1, h, w))
        else:
            scores = torch.rand((n, h, w), generator=gen).to(x.device)
            mask = ops.topk_mask(scores, self.k)
        delta = ops.masked_linf_project(x, noise, mask, self.eps)
        return Protection(delta, mask, {"rounds": 0})
