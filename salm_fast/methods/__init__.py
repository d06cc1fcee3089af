"""Protection methods, one class per file behind :class:`~.base.Method`.

``make_method("salm", eps=8/255, k=0.1)`` builds one by name (``k=None``: the method's ``default_k``,
SALM's :attr:`SALM.default_k`); :data:`METHODS` lists them.
"""
from __future__ import annotations

from typing import Any, Iterable

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


def check_options(name: str, options: Iterable[str]) -> type[Method]:
    """The class of method ``name``; ValueError on an unknown method or an option it does not take."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    valid = cls.option_names()
    for key in options:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for method {name}; valid: {', '.join(sorted(valid))}")
    return cls


def make_method(name: str, **options: Any) -> Method:
    """A method by name with its options (eps, k, seed, and method-specific ones)."""
    return check_options(name, options)(**options)


__all__ = ["METHODS", "BiLevelMethod", "Method", "Protection", "check_options", "make_method", *(c.__name__ for c in METHODS.values())]
