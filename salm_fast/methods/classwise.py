"""Class-wise error-minimizing noise (Huang et al., ICLR 2021, class-wise variant; the
class-wise anti-learning perturbation of the bi-level formulation, Ye et al. 2023):
one L-inf perturbation per class, shared by all its images, found by the min-min loop.
"""
from __future__ import annotations

from ..bilevel import BiLevelConfig
from ..noise import ClassWiseNoise
from .base import BiLevelMethod, check_int, check_number


class ClassWiseEM(BiLevelMethod):
    name = "classwise"
    paper = "Huang et al., ICLR 2021 (class-wise error-minimizing noise)"

    def __init__(self, eps: float | str | None = None, *, steps: int = 10, step_size: float = 0.8 / 255,
                 **kw):
        super().__init__(eps, **kw)
        self.steps = check_int(self.name, "steps", steps, 1)
        self.step_size = check_number(self.name, "step_size", step_size, 1.0)

    @classmethod
    def default_loop(cls) -> BiLevelConfig:
        return BiLevelConfig(max_rounds=10, surrogate_steps=10, augment=False)

    def options(self):
        return {**super().options(), "steps": self.steps, "step_size": self.step_size}

    def make_noise(self, x, y, n_classes, mask):
        return ClassWiseNoise(n_classes, tuple(x.shape[1:]), self.eps, steps=self.steps, step_size=self.step_size,
                              device=x.device)
