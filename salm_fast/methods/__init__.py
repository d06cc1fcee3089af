"""Protection methods, one class per file behind :class:`~.base.Method`.

``make_method("salm", eps=8/255, k=0.1)`` builds one by name; :data:`METHODS` lists them.
"""
from __future__ import annotations

import re
from typing import Any

from .base import BiLevelMethod, Method, Protection
from .classwise import ClassWiseEM
from .generator_em import GeneratorEM
from .lsp import LinearSeparablePerturbation
from .ops_shortcut import OnePixelShortcut
from .random_noise import RandomNoise
from .salm import SALM
from .samplewise import SampleWiseEM
from .tap import TAP

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SALM, SampleWiseEM, ClassWiseEM, GeneratorEM, RandomNoise, TAP, OnePixelShortcut,
                              LinearSeparablePerturbation)
}


def make_method(name: str, **options: Any) -> Method:
    """A method by name with its options (eps, k, seed, and method-specific ones)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    try:
        return cls(**options)
    except TypeError as exc:  # an option this method does not take
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        raise ValueError(f"{name}: unknown option {unknown.group(1)!r}" if unknown else f"{name}: {exc}") from None


__all__ = ["METHODS", "BiLevelMethod", "Method", "Protection", "make_method", *(c.__name__ for c in METHODS.values())]
