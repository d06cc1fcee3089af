"""Sample-wise error-minimizing noise (Huang et al., "Unlearnable Examples: Making Personal
Data Unexploitable", ICLR 2021): one L-inf perturbation per image.

Bi-level min-min: 10 surrogate steps, then a full pass of 20-step PGD (step 0.8/255)
over the training set warm-started from the current noise, until the surrogate fits
the perturbed data (> 99%). PGD runs on the fused ``pgd_step`` op, in place.
Unlike the public code, the noise is never clipped to [0, 255] before it is added
(that silently dropped every negative value): the fused projection keeps x + delta
in [0, 1] on the perturbation itself.
"""
from __future__ import annotations

from ..bilevel import BiLevelConfig
from .base import BiLevelMethod, check_int, check_number


class SampleWiseEM(BiLevelMethod):
    name = "samplewise"
    paper = "Huang et al., Unlearnable Examples, ICLR 2021 (sample-wise error-minimizing noise)"

    def __init__(self, eps: float | str | None = None, *, steps: int = 20, step_size: float = 0.8 / 255,
                 **kw):
        super().__init__(eps, **kw)
        self.steps = check_int(self.name, "steps", steps, 1)
        self.step_size = check_number(self.name, "step_size", step_size, 1.0)

    @classmethod
    def default_loop(cls) -> BiLevelConfig:
        return BiLevelConfig(max_rounds=20, surrogate_steps=10, augment=False)

    def options(self):
        return {**super().options(), "steps": self.steps, "step_size": self.step_size}

    def make_noise(self, x, y, n_classes, mask):
        return self.sample_wise_noise(x, steps=self.steps, step_size=self.step_size)
