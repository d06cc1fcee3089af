"""The common base of every protection method.

A method turns clean training images into a budget-bounded perturbation. The base
handles what all share: argument checks (the budget's, and :func:`check_int` /
:func:`check_number` / :func:`check_choice` for a method's own options), seeding, the
surrogate and its clean pre-training, the bi-level loop with its log and checkpoint, and
the final budget check. A subclass writes only what makes it different (its mask and its noise).

Defaults are said once, on the class: ``default_eps`` and ``default_k`` (``eps=None`` /
``k=None`` mean the method's default); the options a method takes are its constructors'
keyword parameters (:meth:`Method.option_names`).

Shapes: ``x`` N x C x H x W float in [0, 1] (exactly the stored uint8 / 255),
``y`` N int64 class indices. Budget: L-inf ``eps`` in [0, 1] units; masked methods
also bound L0 by ``k`` pixels per image.

Device and memory: ``fit(..., device=)`` runs the method there. ``x`` may also be the
stored uint8 images (an N x C x H x W tensor, or a :class:`~salm_fast.data.view.ImageView`
over the storage arrays): a method with ``streams = True`` (the bi-level ones) then never
holds the set as float, only batches, and its :class:`Protection` hands out the
perturbation batch by batch (:meth:`Protection.batches`); the others get the float images
whole, as before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import Tensor

from .. import distributed as D
from .. import ops
from .. import surrogate as S
from ..bilevel import BiLevelConfig, BiLevelTrainer
from ..data.view import ImageView, as_view, pass_batch
from ..noise import Noise, SampleWiseNoise
from ..release import parse_eps
from ..runtime import choose_precision, choose_threads, flush_denormal, intra_op_threads


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; a bool, a float (even 2.0) or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(owner: str, name: str, value: object, high: float = math.inf) -> float:
    """``value`` as a float in (0, ``high``]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 < value <= high and math.isfinite(value)):
        bound = "> 0" if high == math.inf else f"in (0, {high:g}]"
        raise ValueError(f"{owner}: {name} must be a number {bound}, got {value!r}")
    return float(value)


def check_choice(owner: str, name: str, value: object, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` and of their type (1.0 or True is not the choice 1)."""
    kind = type(choices[0])
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


class Protection:
    """A method's output: the float perturbation, the mask it lives in, and what happened.

    ``delta``: N x C x H x W, |delta| <= eps, 0 off the mask, x + delta in [0, 1]; ``mask``:
    N x 1 x H x W {0, 1} (uint8 from the bi-level methods); ``info``: what happened.

    A streamed protection is built from ``delta_of(idx) -> batch`` instead of a tensor: it
    computes the perturbation batch by batch when asked (:meth:`batches`), checking each batch
    against the budget (``check(x, delta)``) as it goes; reading :attr:`delta` makes the whole
    tensor once (N x C x H x W float: fine for small sets, what :meth:`batches` avoids).
    """

    def __init__(self, delta: Tensor | None, mask: Tensor, info: dict[str, Any] | None = None, *,
                 delta_of: Callable[[Tensor], Tensor] | None = None, images: ImageView | None = None,
                 check: Callable[[Tensor, Tensor], None] | None = None):
        if (delta is None) == (delta_of is None) or (delta_of is not None and images is None):
            raise ValueError("Protection takes a delta tensor, or delta_of with the images it perturbs")
        self._delta, self.mask, self.info = delta, mask, dict(info or {})
        self._delta_of, self.images, self._check = delta_of, images, check

    def __len__(self) -> int:
        return len(self._delta) if self._delta is not None else len(self.images)

    @property
    def streamed(self) -> bool:
        return self._delta is None

    def batches(self, limit: int = 1024) -> Iterator[tuple[slice, Tensor]]:
        """``(slice, delta batch)`` over all images in order (batches of at most ``limit`` images,
        fewer for large images: :func:`~salm_fast.data.view.pass_batch`)."""
        if self._delta is not None:
            step = limit
            for start in range(0, len(self), step):
                sl = slice(start, min(start + step, len(self)))
                yield sl, self._delta[sl]
            return
        step = pass_batch(self.images.shape, limit)
        with torch.no_grad():
            for start in range(0, len(self), step):
                sl = slice(start, min(start + step, len(self)))
                d = self._delta_of(torch.arange(sl.start, sl.stop))
                if self._check is not None:
                    self._check(self.images[sl], d)
                yield sl, d

    @property
    def delta(self) -> Tensor:
        """The whole perturbation, N x C x H x W (made once from the batches of a streamed protection)."""
        if self._delta is None:
            out = torch.empty(tuple(self.images.shape), dtype=self.images.dtype, device=self.images.device)
            for sl, d in self.batches():
                out[sl] = d
            self._delta = out
        return self._delta


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

    #: True: ``_fit`` takes an :class:`~salm_fast.data.view.ImageView` and may return a streamed
    #: :class:`Protection`; False: it gets the float images as one tensor.
    streams: ClassVar[bool] = False
    #: True: data-parallel under ``torchrun`` (each rank fits a shard of the images; whatever the ranks share
    #: is kept identical through :mod:`salm_fast.distributed`); False: rank 0 fits all images alone.
    shardable: ClassVar[bool] = False
    name: ClassVar[str]
    paper: ClassVar[str] = ""
    norm: ClassVar[str] = "Linf"
    masked: ClassVar[bool] = False  # True: L0 <= k pixels per image as well
    #: The L-inf budget when none is given (``eps=None``; ``protect``'s default); e.g. 1.0 for
    #: the one-pixel shortcut, whose pixel may take any value.
    default_eps: ClassVar[float] = 8 / 255
    #: Masked methods: ``k`` (pixels per image, or a fraction of H*W) when none is given (``k=None``).
    default_k: ClassVar[int | float | None] = None

    def __init__(self, eps: float | str | None = None, *, seed: int = 0, k: int | float | None = None):
        try:
            self.eps = parse_eps(self.default_eps if eps is None else eps)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        self.seed = check_int(self.name, "seed", seed, 0)
        if self.masked:
            k = self.default_k if k is None else k
            try:
                ops.resolve_k(k, 1 << 30)  # type and range of k, before any work
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{self.name}: {str(exc).removeprefix('resolve_k: ')}") from None
        elif k is not None:
            raise ValueError(f"{self.name}: k applies to masked methods only (this one perturbs every pixel)")
        self.k = k

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every keyword this method's constructor takes: its own, then (through ``**kw``) its bases'."""
        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # past self
            names += [p.name for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return tuple(names)

    # ------------------------------------------------------------ subclass API
    @abstractmethod
    def _fit(self, x: Tensor, y: Tensor, n_classes: int, ctx: FitContext) -> Protection: ...

    def options(self) -> dict[str, Any]:
        """The settings that define this run (for the summary and the checkpoint)."""
        return {"eps": self.eps, "k": self.k, "seed": self.seed}

    # ------------------------------------------------------------ public API
    def fit(self, x: Tensor | ImageView, y: Tensor, n_classes: int | None = None, *,
            workdir: str | Path | None = None, resume: bool = False, progress: bool = False,
            device: str | torch.device | None = None) -> Protection:
        """Compute the protection of ``x`` (labels ``y``) on ``device`` (None: where ``x`` is).

        ``x``: float N x C x H x W in [0, 1], or the stored uint8 images (a tensor or an
        :class:`~salm_fast.data.view.ImageView`). Checks the budget before returning; a streamed
        protection checks each batch as :meth:`Protection.batches` makes it.
        """
        x, y, n_classes = self._check_inputs(x, y, n_classes, device)
        self.check_data((x.shape[2], x.shape[3]), n_classes)
        ctx = FitContext(Path(workdir) if workdir else None, resume, progress)
        if ctx.workdir and D.is_main():  # many processes: rank 0 writes the log and the checkpoint
            ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cuda = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), flush_denormal():
            threads, threads_reason = self.choose_threads(x, n_classes)  # before the seed: it builds a model
            if self.shardable:  # many processes fit together: rank 0's choice
                threads, threads_reason = D.broadcast_object((threads, threads_reason))
            with intra_op_threads(threads):
                torch.manual_seed(self.seed)
                result = self._fit(x if self.streams else x.full(), y, n_classes, ctx)
        seconds = time.perf_counter() - t0
        result.info.setdefault("threads", threads if threads is not None else torch.get_num_threads())
        result.info.setdefault("threads_reason", threads_reason)
        result.info.setdefault("seconds", seconds)
        result.info.setdefault("images_per_second", len(x) / seconds if seconds > 0 else 0.0)
        if result.streamed:
            result._check = self._check_batch
        else:
            self._check_budget(x, result)
        return result

    def choose_threads(self, x: ImageView, n_classes: int) -> tuple[int | None, str]:
        """CPU threads for this fit (None: the caller's count); :func:`~salm_fast.runtime.choose_threads`
        for methods that train a model, unchanged for the others."""
        return None, "unchanged"

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
    def _check_inputs(self, x: Tensor | ImageView, y: Tensor, n_classes: int | None,
                      device: str | torch.device | None = None) -> tuple[ImageView, Tensor, int]:
        """``x`` as an :class:`ImageView` on ``device``, ``y`` as int64 on it, and the class count."""
        if isinstance(x, Tensor) and (x.dim() != 4 or not (x.is_floating_point() or x.dtype == torch.uint8)):
            raise ValueError(f"{self.name}: x must be a float (or uint8) N x C x H x W tensor")
        if not isinstance(x, (Tensor, ImageView)):
            raise ValueError(f"{self.name}: x must be a float N x C x H x W tensor")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(f"{self.name}: y must hold one integer label per image ({x.shape[0]})")
        if len(x) == 0:
            raise ValueError(f"{self.name}: no images to protect")
        if isinstance(x, Tensor) and x.is_floating_point():
            if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
                raise ValueError(f"{self.name}: images must be finite and in [0, 1]")
            x = x.float().contiguous()
        if int(y.min()) < 0:
            raise ValueError(f"{self.name}: labels must be >= 0")
        n_classes = int(y.max()) + 1 if n_classes is None else int(n_classes)
        if int(y.max()) >= n_classes or n_classes < 2:
            raise ValueError(f"{self.name}: labels must be in [0, {n_classes}) with at least 2 classes")
        view = as_view(x, device)
        return view, y.long().to(view.device), n_classes

    def _check_budget(self, x: ImageView, result: Protection) -> None:
        if tuple(result.delta.shape) != tuple(x.shape):
            raise RuntimeError(f"{self.name}: produced a malformed perturbation (a bug)")
        for sl, d in result.batches():
            self._check_batch(x[sl], d.to(x.device))

    def _check_batch(self, x: Tensor, d: Tensor) -> None:
        """The budget on one batch of images ``x`` and their perturbation ``d``; RuntimeError (a bug) if broken."""
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


#: How a sample-wise (PGD) noise keeps its per-image perturbations (:class:`~salm_fast.noise.SampleWiseNoise`).
NOISE_STORAGES = ("auto", "float", "int8")
#: ``noise_storage="auto"``: float32 (bit-exact with earlier releases) while the per-image noise takes at most
#: this many bytes, int8 levels of the release grid above it (a quarter of the memory; 224 px RGB: over 445 images).
AUTO_FLOAT_NOISE_BYTES = 256 << 20


class BiLevelMethod(Method):
    """A method whose noise is found by the bi-level min-min loop against a surrogate.

    Streams: ``x`` is an :class:`~salm_fast.data.view.ImageView` on the run's device (float
    batches from the stored uint8), masks are uint8, and the perturbation is handed out batch
    by batch by the trained noise; memory grows with the batch, not with the data set (save a
    sample-wise noise's per-image state: ``noise_storage``).
    """

    streams = True
    shardable = True
    surrogate_arch: str = S.DEFAULT_SURROGATE

    def __init__(self, eps: float | str | None = None, *, seed: int = 0, k: int | float | None = None,
                 loop: BiLevelConfig | None = None, rounds: int | None = None, min_rounds: int | None = None,
                 surrogate: str = S.DEFAULT_SURROGATE, noise_storage: str = "auto"):
        super().__init__(eps, seed=seed, k=k)
        self.surrogate_arch = check_choice(self.name, "surrogate", surrogate, S.SURROGATES)
        # Used by sample-wise (PGD) noise only; the other noises have no per-image state.
        self.noise_storage = check_choice(self.name, "noise_storage", noise_storage, NOISE_STORAGES)
        if loop is not None and not isinstance(loop, BiLevelConfig):
            raise ValueError(f"{self.name}: loop must be a BiLevelConfig, got {type(loop).__name__}")
        # A copy: the caller's config is theirs (one config may serve several methods).
        self.loop = dataclasses.replace(loop) if loop is not None else self.default_loop()
        self.loop.seed = self.seed
        if rounds is not None:  # a cap on rounds, e.g. for a quick run
            self.loop.max_rounds = check_int(self.name, "rounds", rounds, 1)
            self.loop.min_rounds = min(self.loop.min_rounds, rounds)
        if min_rounds is not None:  # never stop before this many rounds ("rounds=5,min_rounds=5": exactly 5)
            self.loop.min_rounds = check_int(self.name, "min_rounds", min_rounds, 0)
        self.loop.validate()

    @classmethod
    def default_loop(cls) -> BiLevelConfig:
        return BiLevelConfig()

    def options(self) -> dict[str, Any]:
        return {**super().options(), "surrogate": self.surrogate_arch, "noise_storage": self.noise_storage,
                "loop": dict(self.loop.__dict__)}

    def sample_wise_noise(self, x: ImageView, *, steps: int, step_size: float) -> SampleWiseNoise:
        """One PGD perturbation per image of ``x``, on its device, stored as ``noise_storage`` says
        (``auto``: float32 up to :data:`AUTO_FLOAT_NOISE_BYTES`, int8 levels beyond)."""
        storage = self.noise_storage
        if storage == "auto":
            storage = "float" if 4 * math.prod(x.shape) <= AUTO_FLOAT_NOISE_BYTES else "int8"
        return SampleWiseNoise(tuple(x.shape), self.eps, steps=steps, step_size=step_size, storage=storage,
                               device=x.device)

    def choose_threads(self, x: ImageView, n_classes: int) -> tuple[int | None, str]:
        """Timed on the surrogate's training steps at the loop's batch and precision (see runtime)."""
        model = self.surrogate_factory(x, n_classes)()
        shape = (self.loop.batch_size, *x.shape[1:])
        precision, _ = choose_precision(self.loop.precision, x.device, model=model, num_classes=n_classes,
                                        sample_shape=(min(self.loop.batch_size, 64), *x.shape[1:]))
        return choose_threads("auto", x.device, model=model, sample_shape=shape, num_classes=n_classes,
                              precision=precision)

    def surrogate_factory(self, x: Tensor, n_classes: int):
        channels, size = x.shape[1], x.shape[2]
        return lambda: S.build_surrogate(self.surrogate_arch, channels, n_classes, size)

    @abstractmethod
    def make_noise(self, x: Tensor, y: Tensor, n_classes: int, mask: Tensor) -> Noise: ...

    def make_mask(self, x: ImageView, y: Tensor, n_classes: int, ctx: FitContext) -> Tensor:
        """N x 1 x H x W uint8 {0, 1} on the run's device: every pixel by default, one image's ones expanded
        to N (no per-image memory: 49 KiB an image at 224 px; a method that edits its mask makes its own)."""
        ones = torch.ones((1, 1, x.shape[2], x.shape[3]), dtype=torch.uint8, device=x.device)
        return ones.expand(x.shape[0], -1, -1, -1)

    def round_hooks(self) -> list:
        """Callables run after every round of the loop (e.g. a mask refresh)."""
        return []

    def extra_info(self) -> dict[str, Any]:
        return {}

    def run_settings(self, x: ImageView, y: Tensor, n_classes: int) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the method, its options and the data
        (a digest of the images as given, uint8 or float, and of the labels)."""
        digest = hashlib.sha256(x.digest().encode())
        digest.update(y.cpu().numpy().tobytes())
        options = {k: v for k, v in self.options().items() if k != "loop"}  # the loop is compared on its own
        return {"method": self.name, **options,
                "data": f"{tuple(x.shape)} {x.stored_dtype} {n_classes} classes {digest.hexdigest()}"}

    def _fit(self, x, y, n_classes, ctx):
        mask = self.make_mask(x, y, n_classes, ctx)
        noise = self.make_noise(x, y, n_classes, mask)
        trainer = BiLevelTrainer(self.surrogate_factory(x, n_classes), noise, x, y, mask, self.loop,
                                 log_path=ctx.path("rounds.jsonl"), checkpoint_path=ctx.path("checkpoint.pt"),
                                 progress=ctx.progress, description=self.name, round_hooks=self.round_hooks(),
                                 settings=self.run_settings(x, y, n_classes), device=x.device)
        finished = False
        ckpt = ctx.path("checkpoint.pt")
        # Many processes: rank 0's file system decides (the others may not see the work folder).
        if D.broadcast_object(ctx.resume and ckpt is not None and ckpt.exists()):
            finished = trainer.load_checkpoint(ckpt)
        elif ctx.path("rounds.jsonl") is not None and ctx.path("rounds.jsonl").exists() and D.is_main():
            ctx.path("rounds.jsonl").unlink()  # a fresh run starts a fresh log
        if not finished:
            trainer.run()
        mask = trainer.mask
        info = {
            **self.extra_info(),
            "rounds": trainer.round,
            "stopped_because": trainer.stopped_because,
            "surrogate_accuracy": trainer.history[-1].surrogate_accuracy if trainer.history else None,
            "precision": trainer.precision,  # what ran (auto's choice, or the checkpoint's), for the summary
            "precision_reason": trainer.precision_reason,
            "device": str(trainer.device),
            **({"noise_storage": noise.storage} if isinstance(noise, SampleWiseNoise) else {}),
            "history": [h.__dict__ for h in trainer.history],
        }
        return Protection(None, mask, info, images=x, delta_of=lambda idx: noise.delta(idx, x[idx], y[idx], mask[idx]))
