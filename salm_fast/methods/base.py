"""The common base of every protection method.

A method turns clean training images into a budget-bounded perturbation. The base
handles what all share: argument checks, seeding, the surrogate and its clean
pre-training, the bi-level loop with its log and checkpoint, and the final budget
check. A subclass writes only what makes it different (its mask and its noise).

Shapes: ``x`` N x C x H x W float in [0, 1] (exactly the stored uint8 / 255),
``y`` N int64 class indices. Budget: L-inf ``eps`` in [0, 1] units; masked methods
also bound L0 by ``k`` pixels per image.
"""
from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import ops
from .. import surrogate as S
from ..bilevel import BiLevelConfig, BiLevelTrainer
from ..noise import Noise
from ..runtime import flush_denormal


@dataclass
class Protection:
    """A method's output: the float perturbation, the mask it lives in, and what happened."""

    delta: Tensor  # N x C x H x W, |delta| <= eps, 0 off the mask, x + delta in [0, 1]
    mask: Tensor  # N x 1 x H x W {0, 1}
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitContext:
    """Where a fit may write its log and checkpoint, and whether to show progress."""

    workdir: Path | None = None
    resume: bool = False
    progress: bool = False

    def path(self, name: str) -> Path | None:
        return self.workdir / name if self.workdir else None


class Method(ABC):
    """Base class: ``Method(eps=..., seed=..., **options).fit(x, y, n_classes)``."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    norm: ClassVar[str] = "Linf"
    masked: ClassVar[bool] = False  # True: L0 <= k pixels per image as well
    #: The L-inf budget when none is given (``eps=None``; ``protect``'s default); e.g. 1.0 for
    #: the one-pixel shortcut, whose pixel may take any value.
    default_eps: ClassVar[float] = 8 / 255
    #: Masked methods: ``k`` when none is given (``protect``'s default; SALM's 0.1 of H*W).
    default_k: ClassVar[int | float] = 0.1

    def __init__(self, eps: float | None = None, *, seed: int = 0, k: int | float | None = None):
        if eps is None:
            eps = self.default_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps <= 1:
            raise ValueError(f"{self.name}: eps must be in (0, 1] (e.g. 8/255), got {eps!r}")
        if self.masked:
            if k is None:
                raise ValueError(f"{self.name}: k (pixels per image, int, or fraction in (0, 1]) is required")
            ops.resolve_k(k, 1 << 30)  # type and range of k, before any work
        elif k is not None:
            raise ValueError(f"{self.name}: k applies to masked methods only (this one perturbs every pixel)")
        self.eps, self.seed, self.k = float(eps), int(seed), k

    # ------------------------------------------------------------ subclass API
    @abstractmethod
    def _fit(self, x: Tensor, y: Tensor, n_classes: int, ctx: FitContext) -> Protection: ...

    def options(self) -> dict[str, Any]:
        """The settings that define this run (for the summary and the checkpoint)."""
        return {"eps": self.eps, "k": self.k, "seed": self.seed}

    # ------------------------------------------------------------ public API
    def fit(self, x: Tensor, y: Tensor, n_classes: int | None = None, *, workdir: str | Path | None = None,
            resume: bool = False, progress: bool = False) -> Protection:
        """Compute the protection of ``x`` (labels ``y``); checks the budget before returning."""
        x, y, n_classes = self._check_inputs(x, y, n_classes)
        self.check_data((x.shape[2], x.shape[3]), n_classes)
        ctx = FitContext(Path(workdir) if workdir else None, resume, progress)
        if ctx.workdir:
            ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]), flush_denormal():
            torch.manual_seed(self.seed)
            result = self._fit(x, y, n_classes, ctx)
        seconds = time.perf_counter() - t0
        result.info.setdefault("seconds", seconds)
        result.info.setdefault("images_per_second", len(x) / seconds if seconds > 0 else 0.0)
        self._check_budget(x, result)
        return result

    def check_data(self, image_shape: tuple[int, int], n_classes: int) -> None:
        """Raise ValueError if the options do not fit images of ``image_shape`` (H, W) in ``n_classes``
        classes; ``protect`` calls it before it writes anything, ``fit`` before any work."""
        if self.masked:
            ops.resolve_k(self.k, image_shape[0] * image_shape[1])  # k within H*W for these images

    def check_release(self, clean_u8: Tensor, release_u8: Tensor) -> dict[str, Any]:
        """Budget checks of this method beyond L-inf and L0, on the stored bytes (uint8, N x C x H x W,
        after :meth:`fit`); raise RuntimeError on a violation (a bug). Returns measurements for the
        summary's ``budget`` (e.g. an L2 norm); none by default."""
        return {}

    # ------------------------------------------------------------ shared pieces
    def _check_inputs(self, x: Tensor, y: Tensor, n_classes: int | None) -> tuple[Tensor, Tensor, int]:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{self.name}: x must be a float N x C x H x W tensor")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(f"{self.name}: y must hold one integer label per image ({x.shape[0]})")
        if len(x) == 0:
            raise ValueError(f"{self.name}: no images to protect")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise ValueError(f"{self.name}: images must be finite and in [0, 1]")
        if int(y.min()) < 0:
            raise ValueError(f"{self.name}: labels must be >= 0")
        n_classes = int(y.max()) + 1 if n_classes is None else int(n_classes)
        if int(y.max()) >= n_classes or n_classes < 2:
            raise ValueError(f"{self.name}: labels must be in [0, {n_classes}) with at least 2 classes")
        return x.float().contiguous(), y.long(), n_classes

    def _check_budget(self, x: Tensor, result: Protection) -> None:
        d = result.delta
        eps32 = torch.tensor(self.eps, dtype=d.dtype).item()
        if d.shape != x.shape or not bool(torch.isfinite(d).all()):
            raise RuntimeError(f"{self.name}: produced a malformed perturbation (a bug)")
        if float(d.abs().max()) > eps32 or float((x + d).min()) < 0 or float((x + d).max()) > 1:
            raise RuntimeError(f"{self.name}: perturbation violates its budget (a bug)")
        if self.masked:
            k = ops.resolve_k(self.k, x.shape[2] * x.shape[3])
            l0 = (d != 0).any(dim=1).flatten(1).sum(1)
            if int(l0.max()) > k:
                raise RuntimeError(f"{self.name}: perturbation touches {int(l0.max())} > k={k} pixels (a bug)")


class BiLevelMethod(Method):
    """A method whose noise is found by the bi-level min-min loop against a surrogate."""

    surrogate_arch: str = S.DEFAULT_SURROGATE

    def __init__(self, eps: float = 8 / 255, *, seed: int = 0, k: int | float | None = None,
                 loop: BiLevelConfig | None = None, rounds: int | None = None,
                 surrogate: str = S.DEFAULT_SURROGATE):
        super().__init__(eps, seed=seed, k=k)
        if surrogate not in S.SURROGATES:
            raise ValueError(f"{self.name}: unknown surrogate {surrogate!r}; choose one of {', '.join(S.SURROGATES)}")
        self.loop = loop or self.default_loop()
        self.loop.seed = self.seed
        self.loop.validate()
        if rounds is not None:  # a cap on rounds, e.g. for a quick run
            if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                raise ValueError(f"{self.name}: rounds must be an integer >= 1, got {rounds!r}")
            self.loop.max_rounds = rounds
            self.loop.min_rounds = min(self.loop.min_rounds, rounds)
        self.surrogate_arch = surrogate

    @classmethod
    def default_loop(cls) -> BiLevelConfig:
        return BiLevelConfig()

    def options(self) -> dict[str, Any]:
        return {**super().options(), "surrogate": self.surrogate_arch, "loop": dict(self.loop.__dict__)}

    def surrogate_factory(self, x: Tensor, n_classes: int):
        channels, size = x.shape[1], x.shape[2]
        return lambda: S.build_surrogate(self.surrogate_arch, channels, n_classes, size)

    @abstractmethod
    def make_noise(self, x: Tensor, y: Tensor, n_classes: int, mask: Tensor) -> Noise: ...

    def make_mask(self, x: Tensor, y: Tensor, n_classes: int, ctx: FitContext) -> Tensor:
        return x.new_ones((x.shape[0], 1, x.shape[2], x.shape[3]))

    def round_hooks(self) -> list:
        """Callables run after every round of the loop (e.g. a mask refresh)."""
        return []

    def extra_info(self) -> dict[str, Any]:
        return {}

    def run_settings(self, x: Tensor, y: Tensor, n_classes: int) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the method, its options and the data."""
        digest = hashlib.sha256(x.numpy().tobytes())
        digest.update(y.numpy().tobytes())
        options = {k: v for k, v in self.options().items() if k != "loop"}  # the loop is compared on its own
        return {"method": self.name, **options, "data": f"{tuple(x.shape)} {n_classes} classes {digest.hexdigest()}"}

    def _fit(self, x, y, n_classes, ctx):
        mask = self.make_mask(x, y, n_classes, ctx)
        noise = self.make_noise(x, y, n_classes, mask)
        trainer = BiLevelTrainer(self.surrogate_factory(x, n_classes), noise, x, y, mask, self.loop,
                                 log_path=ctx.path("rounds.jsonl"), checkpoint_path=ctx.path("checkpoint.pt"),
                                 progress=ctx.progress, description=self.name, round_hooks=self.round_hooks(),
                                 settings=self.run_settings(x, y, n_classes))
        finished = False
        ckpt = ctx.path("checkpoint.pt")
        if ctx.resume and ckpt is not None and ckpt.exists():
            finished = trainer.load_checkpoint(ckpt)
        elif ctx.path("rounds.jsonl") is not None and ctx.path("rounds.jsonl").exists():
            ctx.path("rounds.jsonl").unlink()  # a fresh run starts a fresh log
        if not finished:
            trainer.run()
        mask = trainer.mask
        delta = noise.export(x, y, mask)
        info = {
            **self.extra_info(),
            "rounds": trainer.round,
            "stopped_because": trainer.stopped_because,
            "surrogate_accuracy": trainer.history[-1].surrogate_accuracy if trainer.history else None,
            "history": [h.__dict__ for h in trainer.history],
        }
        return Protection(delta, mask, info)
