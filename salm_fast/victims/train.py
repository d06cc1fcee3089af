"""The victim's training loop: what an unauthorized user does with a released dataset.

Lean and fast in the airbench / hlb-CIFAR10 manner: the whole training set is one uint8
tensor on the device; each step gathers a batch by ``randperm`` indices, makes it float once
(``/255``), augments the whole batch at once, and runs the model in ``channels_last`` under the
precision chosen at run time (:mod:`salm_fast.runtime`). No DataLoader. Normalization, ``(x -
0.5) / 0.25``, is the first layer of the trained model, so the model returned takes images in
[0, 1] and adversarial training works in pixel space.

Every setting lives in one :class:`VictimConfig` (validated on creation); :func:`train_victim`
takes one, or keyword overrides of its fields, or both. A run is a few small steps: prepare the
data (uint8 on the device, data-level defenses applied once), build (model, optimizer, LR
schedule, precision), train epoch by epoch (evaluating every ``eval_every``), select the
weights (last, or best validation AUC), and report.

Inputs: images as uint8 (the released format), N x C x H x W, N x H x W (gray) or N x H x W x C
(MedMNIST's RGB layout, recognised by C in {1, 3} last); float images in [0, 1] are accepted
and quantized to uint8 first (``round(255 x)``), because what is released, and so what is
judged, is the stored uint8 copy. Labels: N or N x 1 integers.

What an attacker also does (DESIGN.md): early stopping on the few clean labeled images they hold
(``val_x``/``val_y`` with ``select="best_val"``; the result records ``best_epoch``), and, for a
binary task, flipping an inverted ranking: the test metrics then carry ``auc_flipped`` =
max(AUC, 1 - AUC) (:func:`.metrics.protection_auc`) beside ``auc``.

Reproducibility: same seed, same precision, same thread count and machine -> the same
history bit for bit (model init, data order and augmentation all come from ``seed``; the
caller's global RNG state is restored afterwards). Denormals are flushed during training (they
slow CPU training several-fold) and the caller's setting is restored after.

>>> r = train_victim("cnn", x_train, y_train, x_test, y_test, epochs=5)   # doctest: +SKIP
>>> r.test["acc"], r.test["auc"], r.precision, r.images_per_s             # doctest: +SKIP
>>> cfg = VictimConfig(epochs=30, augment="crop_flip", precision="fp32")  # doctest: +SKIP
>>> train_victim("resnet18", x_train, y_train, x_test, y_test, config=cfg, seed=1)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models import MODELS, build_model
from ..runtime import Normalize, autocast, choose_precision, flush_denormal, intra_op_threads, resolve_device
from .defenses import CropFlip, DefensePlan, parse_defenses
from .metrics import classification_metrics, protection_auc


@dataclass(frozen=True)
class VictimDefaults:
    """Per-model training defaults (MedMNIST 28 px scale: a few hundred to a few thousand images)."""

    optimizer: str      # "sgd" (Nesterov, momentum 0.9) | "adam" | "adamw"
    lr: float           # peak learning rate (after warm-up)
    epochs: int
    batch_size: int     # images per step
    weight_decay: float  # on conv / linear weights only (not on BN, biases); L2 for sgd/adam, decoupled for adamw


#: Every default in one place. Adam at 1e-3, batch 128, no weight decay is MedMNIST v2's own
#: recipe (weight decay 5e-4 did not change BreastMNIST ResNet-18 test metrics: 0.833 / 0.860
#: with and without, bf16, 30 epochs, seed 0); on
#: BreastMNIST (546 training images, 30 epochs = 150 steps) it beat Nesterov SGD at 0.05, which
#: had not fitted the training set yet (ResNet-18, bf16, seed 0: test ACC 0.814 / AUC 0.850 vs
#: 0.769 / 0.814). AdamW for the ViT (transformers want decoupled weight decay).
VICTIM_DEFAULTS: dict[str, VictimDefaults] = {
    "cnn": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "resnet18": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "resnet50": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "vgg11": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "vgg16": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "densenet121": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "mobilenetv2": VictimDefaults("adam", 1e-3, 30, 128, 0.0),
    "vit": VictimDefaults("adamw", 1e-3, 30, 128, 0.05),
}
#: Used for a caller-built nn.Module.
GENERIC_DEFAULTS = VICTIM_DEFAULTS["resnet18"]

LABEL_SMOOTHING = 0.1   # fraction of target mass spread uniformly over the classes
WARMUP_FRAC = 0.05      # fraction of all steps with a linear LR warm-up; cosine decay to 0 after
EVAL_BATCH = 512        # images per forward pass at evaluation
#: The default batch shrinks (not below 16) so that an epoch has at least this many steps: with
#: batch 128, BreastMNIST's 546 images make 5 steps an epoch, and a ResNet-18 trained 15 epochs
#: (75 steps) had not fitted its training set (train ACC 0.80, test AUC 0.786 vs 0.860 at 30
#: epochs; bench/paper_grid.sh, first run).
MIN_STEPS_PER_EPOCH = 16

OPTIMIZERS = ("sgd", "adam", "adamw")
AUGMENTS = ("none", "crop_flip")
SELECTS = ("last", "best_val")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# Settings

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_setting(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def _real_setting(name: str, value: Any, low: float, high: float, *, high_open: bool = False,
                  low_open: bool = False, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {span}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def _choice_setting(name: str, value: Any, choices: Sequence[str], *, optional: bool = False) -> None:
    if not (value is None and optional) and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class VictimConfig:
    """Every setting of one victim training run (units in the comments), validated on creation:
    a bad value raises a one-line ValueError naming the field. ``None`` for ``epochs``,
    ``batch_size``, ``lr``, ``weight_decay``, ``optimizer``: the model's :data:`VICTIM_DEFAULTS`
    (the default batch shrinks on small training sets, see :data:`MIN_STEPS_PER_EPOCH`).
    ``dataclasses.replace`` and :func:`train_victim`'s keyword overrides re-validate."""

    epochs: int | None = None                 # passes over the training set, >= 1
    batch_size: int | None = None             # images per optimizer step, >= 2 (BatchNorm needs 2)
    lr: float | None = None                   # peak learning rate (after the warm-up), > 0
    weight_decay: float | None = None         # factor on conv/linear weights (L2; decoupled for adamw), >= 0
    optimizer: str | None = None              # "sgd" (Nesterov, momentum 0.9) | "adam" | "adamw"
    label_smoothing: float = LABEL_SMOOTHING  # fraction of target mass spread over the classes, in [0, 1)
    augment: str = "none"                     # "none" | "crop_flip" (same as adding the crop_flip defense)
    defense: str | Sequence[str] | None = None  # counter-measure names joined by "+" (see .defenses)
    seed: int = 0                             # >= 0; model init, data order and augmentation
    precision: str = "auto"                   # "auto" | "fp32" | "bf16" (runtime.choose_precision)
    channels_last: bool = True                # memory format of the model and its batches
    eval_every: int = 1                       # epochs between test/val evaluations, >= 0 (0: after the last only)
    select: str = "last"                      # "last" | "best_val" (the evaluated epoch of best val AUC)
    warmup_frac: float = WARMUP_FRAC          # fraction of all steps with a linear LR warm-up, in [0, 1]
    num_classes: int | None = None            # >= 2; None: 1 + the largest label given (at least 2)
    device: str | torch.device | None = "auto"  # "auto"/None: CUDA when present, else CPU; "cpu", "cuda:1", ...
    eval_train: bool = True                   # also report metrics on the training set as trained on
    threads: int | None = None                # intra-op CPU threads during the call (restored after), >= 1

    def __post_init__(self) -> None:
        ints = {"epochs": (1, True), "batch_size": (2, True), "seed": (0, False), "eval_every": (0, False),
                "num_classes": (2, True), "threads": (1, True)}
        for name, (minimum, optional) in ints.items():
            object.__setattr__(self, name, _int_setting(name, getattr(self, name), minimum, optional=optional))
        reals = {"lr": (0.0, math.inf, dict(low_open=True, high_open=True, optional=True)),
                 "weight_decay": (0.0, math.inf, dict(high_open=True, optional=True)),
                 "label_smoothing": (0.0, 1.0, dict(high_open=True)), "warmup_frac": (0.0, 1.0, {})}
        for name, (low, high, kw) in reals.items():
            object.__setattr__(self, name, _real_setting(name, getattr(self, name), low, high, **kw))
        _choice_setting("optimizer", self.optimizer, OPTIMIZERS, optional=True)
        _choice_setting("augment", self.augment, AUGMENTS)
        _choice_setting("select", self.select, SELECTS)
        _choice_setting("precision", self.precision, PRECISION_CHOICES)
        for name in ("channels_last", "eval_train"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        is_names = isinstance(self.defense, (list, tuple)) and all(isinstance(d, str) for d in self.defense)
        if not (self.defense is None or isinstance(self.defense, str) or is_names):
            raise ValueError(f"defense must be names joined by '+', a list of names or None, got {self.defense!r}")
        self.defense_plan()  # unknown or repeated names raise here, before any training
        resolve_device(self.device)

    def defense_plan(self) -> DefensePlan:
        """A fresh plan of the counter-measures (``augment="crop_flip"`` included)."""
        plan = parse_defenses(self.defense)
        if self.augment == "crop_flip" and not any(isinstance(b, CropFlip) for b in plan.batch):
            plan.batch.insert(0, CropFlip())
        return plan

    def with_overrides(self, overrides: dict[str, Any]) -> VictimConfig:
        """A copy with ``overrides`` (field name -> value) applied and validated; an unknown
        name raises TypeError naming it."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in fields(self))
            raise TypeError(f"unknown victim setting(s) {', '.join(unknown)}; valid: {valid}")
        return replace(self, **overrides) if overrides else self


@dataclass
class VictimResult:
    """Outcome of one victim training run. ``to_dict()`` is JSON-ready (no model)."""

    model_name: str
    test: dict[str, float]             # acc, auc (+ auc_flipped if binary), balanced_acc, n on the clean test set
    train: dict[str, float] | None     # same on the training set as trained on (eval mode, no augmentation)
    val: dict[str, float] | None       # same on the validation set, if given
    history: list[dict[str, Any]]      # one row per epoch (see train_victim)
    precision: str                     # "fp32" | "bf16"
    precision_reason: str
    defense: str                       # canonical defense names, "none" when none
    time_s: float                      # whole call: data defenses + training + evaluation
    train_time_s: float                # optimizer steps only (incl. adversarial PGD), no evaluation
    images_per_s: float                # training images processed per second of train_time_s
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    best_epoch: int | None = None      # select="best_val": the epoch whose weights were kept (1-based)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # takes [0, 1] images

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}


# ---------------------------------------------------------------------------------------------
# Inputs

def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    # A read-only array (e.g. a Split's) is copied: torch warns on non-writable numpy memory.
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x)


def as_uint8_images(x: Tensor | np.ndarray) -> Tensor:
    """Images -> uint8 N x C x H x W tensor (see the module doc for accepted layouts)."""
    t = _as_tensor(x)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(f"images must be N x H x W or N x C x H x W, got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {t.dtype}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError("float images must be finite and lie in [0, 1]")
    return (t.float() * 255).round_().to(torch.uint8).contiguous()


def as_labels(y: Tensor | np.ndarray, n: int) -> Tensor:
    t = _as_tensor(y)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"labels must be N or N x 1 with N = {n} images, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError("labels must be integers")
    t = t.long()
    if n and int(t.min()) < 0:
        raise ValueError("labels must be >= 0")
    return t


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, *, batch_size: int = EVAL_BATCH, precision: str = "fp32",
                   channels_last: bool = True) -> Tensor:
    """Logits (float32, CPU) of a trained victim (with its Normalize layer) on uint8 images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for i in range(0, images.shape[0], batch_size):
        xb = images[i:i + batch_size].to(device).float().div_(255).contiguous(memory_format=fmt)
        with autocast(precision, device):
            out.append(model(xb).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def evaluate_model(model: nn.Module, images: Tensor | np.ndarray, labels: Tensor | np.ndarray, *,
                   batch_size: int = EVAL_BATCH, precision: str = "fp32",
                   channels_last: bool = True) -> dict[str, float]:
    """``classification_metrics`` (acc, auc, balanced_acc, n) of a trained victim."""
    x = as_uint8_images(images)
    y = as_labels(labels, x.shape[0])
    logits = predict_logits(model, x, batch_size=batch_size, precision=precision, channels_last=channels_last)
    return classification_metrics(logits, y)


# ---------------------------------------------------------------------------------------------
# Training: prepare the data, build, one epoch, evaluate, select, result

def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets * logits.float().log_softmax(1)).sum(1).mean()


def _make_optimizer(net: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be sgd, adam or adamw, got {name!r}")


def _lr_factor(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = max(1, round(warmup_frac * total_steps))

    def factor(step: int) -> float:  # linear warm-up to 1, then cosine to 0 at total_steps
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return factor


@dataclass
class _VictimData:
    """A run's images (uint8 N x C x H x W) and labels, all on the training device; the training
    images are the ones after the data-level defenses."""

    x_tr: Tensor
    y_tr: Tensor
    x_te: Tensor
    y_te: Tensor
    x_va: Tensor | None
    y_va: Tensor | None
    num_classes: int
    plan: DefensePlan
    notes: list[str]
    defense_s: float  # seconds spent applying the data-level defenses

    @property
    def n(self) -> int:
        return int(self.x_tr.shape[0])


def _held_out(name: str, x: Tensor | np.ndarray, y: Tensor | np.ndarray, like: Tensor) -> tuple[Tensor, Tensor]:
    """A test or validation split as uint8 images and labels, checked against the training images."""
    images = as_uint8_images(x)
    labels = as_labels(y, images.shape[0])
    if images.shape[0] < 1:
        raise ValueError(f"need at least 1 {name} image")
    if images.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} images {tuple(images.shape[1:])} differ from training images {tuple(like.shape[1:])}")
    return images, labels


def _prepare_data(cfg: VictimConfig, train: tuple, test: tuple, val: tuple, device: torch.device) -> _VictimData:
    """Inputs -> uint8 tensors on ``device``; data-level defenses applied once (on the CPU, as an
    attacker storing the transformed copy would), never to the test or validation images."""
    if (val[0] is None) != (val[1] is None):
        raise ValueError("val_x and val_y go together: give both or neither")
    if cfg.select == "best_val" and val[0] is None:
        raise ValueError("select='best_val' needs val_x and val_y (clean labeled images held out)")
    x_tr = as_uint8_images(train[0])
    y_tr = as_labels(train[1], x_tr.shape[0])
    if x_tr.shape[0] < 2:
        raise ValueError("need at least 2 training images")
    x_te, y_te = _held_out("test", *test, like=x_tr)
    x_va, y_va = _held_out("validation", *val, like=x_tr) if val[0] is not None else (None, None)
    given = [y for y in (y_tr, y_te, y_va) if y is not None]
    top = max(int(y.max()) for y in given)
    k = cfg.num_classes if cfg.num_classes is not None else max(top + 1, 2)
    if top >= k:
        raise ValueError(f"label {top} out of range for num_classes={k}")
    if cfg.select == "best_val" and int(y_va.unique().numel()) < 2:
        raise ValueError("select='best_val' ranks epochs by validation AUC: the validation labels need two classes")
    plan = cfg.defense_plan()
    t0 = time.perf_counter()
    x_tr = plan.apply_data(x_tr)
    defense_s = time.perf_counter() - t0
    on = [None if t is None else t.to(device) for t in (x_tr, y_tr, x_te, y_te, x_va, y_va)]
    return _VictimData(*on, num_classes=k, plan=plan, notes=plan.notes(int(x_tr.shape[1])), defense_s=defense_s)


def _model_defaults(model: str | nn.Module) -> tuple[str, VictimDefaults]:
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
        return model, VICTIM_DEFAULTS.get(model, GENERIC_DEFAULTS)
    if isinstance(model, nn.Module):
        return type(model).__name__, GENERIC_DEFAULTS
    raise ValueError(f"model must be a zoo name ({', '.join(MODELS)}) or an nn.Module, got {type(model).__name__}")


def _fill_defaults(cfg: VictimConfig, defaults: VictimDefaults, n_train: int) -> VictimConfig:
    """``cfg`` with every None training setting replaced by the model's default."""
    batch = cfg.batch_size
    if batch is None:  # small sets: smaller batches, so that an epoch still has MIN_STEPS_PER_EPOCH steps
        batch = max(16, min(defaults.batch_size, n_train // MIN_STEPS_PER_EPOCH))
    return replace(
        cfg, epochs=defaults.epochs if cfg.epochs is None else cfg.epochs, batch_size=batch,
        lr=defaults.lr if cfg.lr is None else cfg.lr, optimizer=cfg.optimizer or defaults.optimizer,
        weight_decay=defaults.weight_decay if cfg.weight_decay is None else cfg.weight_decay)


@dataclass
class _Training:
    """One run's moving parts and running totals, including the weights kept by ``select``."""

    net: nn.Sequential                 # Normalize + the victim, on the device
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator               # data order and augmentation (CPU)
    precision: str
    precision_reason: str
    memory_format: torch.memory_format
    steps_per_epoch: int
    targets: Tensor                    # K x K: row c is class c's label-smoothed target
    train_s: float = 0.0               # seconds of optimizer steps
    eval_s: float = 0.0                # seconds of evaluation
    images_seen: int = 0
    best_auc: float = -math.inf
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = None


def _build(model: str | nn.Module, cfg: VictimConfig, data: _VictimData, device: torch.device) -> _Training:
    """Model (seeded from the global RNG: call under ``manual_seed``), precision, optimizer, LR schedule."""
    n, c, h, w = data.x_tr.shape
    k = data.num_classes
    core = build_model(model, c, k, image_size=max(h, w)) if isinstance(model, str) else model
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = nn.Sequential(Normalize(), core).to(device).to(memory_format=fmt)
    precision, reason = choose_precision(cfg.precision, device, model=core, sample_shape=(cfg.batch_size, c, h, w),
                                         num_classes=k)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _make_optimizer(net, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps = math.ceil(n / cfg.batch_size) - (1 if n % cfg.batch_size == 1 else 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.epochs * steps, cfg.warmup_frac))
    targets = torch.full((k, k), cfg.label_smoothing / k, device=device)
    targets += torch.eye(k, device=device) * (1.0 - cfg.label_smoothing)
    return _Training(net, opt, sched, gen, precision, reason, fmt, steps, targets)


def _train_step(run: _Training, data: _VictimData, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer step on the images ``idx``; returns (logits, targets, loss) of the batch."""
    xb = data.x_tr[idx].float().div_(255)
    tb = run.targets[data.y_tr[idx]]
    xb, tb = data.plan.apply_batch(xb, tb, run.gen)
    xb = xb.contiguous(memory_format=run.memory_format)
    if data.plan.adversarial is not None:
        xb = data.plan.adversarial.perturb(run.net, xb, tb, _soft_cross_entropy, run.gen, run.precision)
    with autocast(run.precision, xb.device):
        logits = run.net(xb)
    loss = _soft_cross_entropy(logits, tb)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return logits, tb, loss


def _train_epoch(run: _Training, data: _VictimData, batch_size: int, epoch: int) -> dict[str, Any]:
    """One pass over the training set in a fresh random order; returns the epoch's history row
    (evaluation columns None). A final batch of one image is skipped (BatchNorm cannot train on it)."""
    run.net.train()
    t0 = time.perf_counter()
    device = data.x_tr.device
    perm = torch.randperm(data.n, generator=run.gen).to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for s in range(run.steps_per_epoch):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        logits, targets, loss = _train_step(run, data, idx)
        with torch.no_grad():  # accumulated on the device: no sync per step
            loss_sum += loss.detach().double() * idx.numel()
            correct += (logits.argmax(1) == targets.argmax(1)).sum()
        seen += idx.numel()
    epoch_s = time.perf_counter() - t0
    run.train_s += epoch_s
    run.images_seen += seen
    return {"epoch": epoch, "lr": run.opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / seen,
            "train_acc": int(correct) / seen, "epoch_s": epoch_s,
            "test_acc": None, "test_auc": None, "val_acc": None, "val_auc": None}


def _metrics(run: _Training, images: Tensor, labels: Tensor, channels_last: bool) -> dict[str, float]:
    logits = predict_logits(run.net, images, precision=run.precision, channels_last=channels_last)
    return classification_metrics(logits, labels)


def _evaluate_epoch(run: _Training, data: _VictimData, cfg: VictimConfig, row: dict[str, Any]) -> None:
    """Test (and validation) metrics into ``row``; under ``select="best_val"`` keep these weights if
    their validation AUC beats every earlier evaluated epoch's (ties keep the earlier epoch)."""
    t0 = time.perf_counter()
    m = _metrics(run, data.x_te, data.y_te, cfg.channels_last)
    row["test_acc"], row["test_auc"] = m["acc"], m["auc"]
    if data.x_va is not None:
        mv = _metrics(run, data.x_va, data.y_va, cfg.channels_last)
        row["val_acc"], row["val_auc"] = mv["acc"], mv["auc"]
        score = -math.inf if math.isnan(mv["auc"]) else mv["auc"]
        if cfg.select == "best_val" and (run.best_state is None or score > run.best_auc):
            run.best_auc, run.best_epoch = score, row["epoch"]
            run.best_state = copy.deepcopy(run.net.state_dict())
            row["selected"] = True
    run.eval_s += time.perf_counter() - t0


def _progress_reporter(progress: bool | Callable, epochs: int, name: str) -> tuple[Callable, Callable]:
    """(report(row), close()) for ``progress``: a tqdm bar (True), the caller's callable, or nothing."""
    if callable(progress):
        return progress, lambda: None
    if progress is not True:
        return (lambda row: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs, desc=f"victim {name}", unit="epoch")

    def report(row: dict[str, Any]) -> None:
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                        test_acc="-" if row["test_acc"] is None else f"{row['test_acc']:.3f}")
        bar.update(1)

    return report, bar.close


def _fit(run: _Training, data: _VictimData, cfg: VictimConfig, progress: bool | Callable,
         name: str) -> list[dict[str, Any]]:
    """All epochs; evaluation every ``eval_every`` epochs and after the last. Returns the history."""
    report, close = _progress_reporter(progress, cfg.epochs, name)
    history: list[dict[str, Any]] = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            row = _train_epoch(run, data, cfg.batch_size, epoch)
            if epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0):
                _evaluate_epoch(run, data, cfg, row)
            history.append(row)
            report(row)
    finally:
        close()
    return history


def _select_weights(run: _Training) -> None:
    """Load the weights ``select`` kept (best_val); under ``select="last"`` the final ones stay."""
    if run.best_state is not None:
        run.net.load_state_dict(run.best_state)
    run.net.eval()


def _with_flipped_auc(metrics: dict[str, float], num_classes: int) -> dict[str, float]:
    """Binary tasks: add ``auc_flipped`` (max(AUC, 1 - AUC), what an attacker who flips an inverted
    ranking gets) right after ``auc``."""
    if num_classes != 2:
        return metrics
    out: dict[str, float] = {}
    for key, value in metrics.items():
        out[key] = value
        if key == "auc":
            out["auc_flipped"] = protection_auc(value, num_classes)
    return out


def _result(run: _Training, data: _VictimData, cfg: VictimConfig, name: str, history: list[dict[str, Any]],
            device: torch.device, t_start: float) -> VictimResult:
    """Final metrics of the selected weights on test (and validation, training) images, and the settings."""
    t0 = time.perf_counter()
    test_m = _with_flipped_auc(_metrics(run, data.x_te, data.y_te, cfg.channels_last), data.num_classes)
    val_m = _metrics(run, data.x_va, data.y_va, cfg.channels_last) if data.x_va is not None else None
    train_m = _metrics(run, data.x_tr, data.y_tr, cfg.channels_last) if cfg.eval_train else None
    run.eval_s += time.perf_counter() - t0
    _, c, h, w = data.x_tr.shape
    settings = {
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "optimizer": cfg.optimizer, "label_smoothing": cfg.label_smoothing, "augment": cfg.augment,
        "seed": cfg.seed, "channels_last": cfg.channels_last, "warmup_frac": cfg.warmup_frac, "select": cfg.select,
        "num_classes": data.num_classes, "image_shape": [c, h, w], "n_train": data.n,
        "n_test": int(data.x_te.shape[0]), "device": str(device), "threads": torch.get_num_threads(),
        "eval_s": run.eval_s, "defense_s": data.defense_s,
    }
    return VictimResult(
        model_name=name, test=test_m, train=train_m, val=val_m, history=history,
        precision=run.precision, precision_reason=run.precision_reason, defense=data.plan.name,
        time_s=time.perf_counter() - t_start, train_time_s=run.train_s,
        images_per_s=run.images_seen / run.train_s if run.train_s > 0 else math.nan,
        settings=settings, notes=data.notes, best_epoch=run.best_epoch, model=run.net,
    )


def train_victim(
    model: str | nn.Module,
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_x: Tensor | np.ndarray,
    test_y: Tensor | np.ndarray,
    *,
    config: VictimConfig | None = None,
    val_x: Tensor | np.ndarray | None = None,
    val_y: Tensor | np.ndarray | None = None,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    **overrides: Any,
) -> VictimResult:
    """Train a victim from scratch on (released) training images; report clean test metrics.

    ``model``: a zoo name (:data:`salm_fast.models.MODELS`) or an ``nn.Module`` (trained in
    place, wrapped in a :class:`Normalize` layer). ``config``: a :class:`VictimConfig` (default:
    all defaults); ``overrides``: any of its fields by keyword (``epochs=5, seed=1``), applied on
    top and validated the same way; an unknown keyword raises TypeError naming it. Data-level
    defenses transform the training images once (never the test or validation images),
    training-time ones every batch. ``val_x``/``val_y``: clean labeled images held out (the
    attacker's own), evaluated with the test set; ``select="best_val"`` keeps the evaluated
    epoch of best validation AUC (``result.best_epoch``). ``progress``: True for a tqdm bar, or
    a callable given each history row.

    History rows: ``epoch``, ``lr`` (at the epoch's last step), ``train_loss`` (mean soft
    cross-entropy over the epoch's batches), ``train_acc`` (running accuracy on the augmented
    batches against the argmax of their (mixed) targets), ``epoch_s`` (training seconds),
    ``test_acc``, ``test_auc``, ``val_acc``, ``val_auc`` (None on epochs not evaluated), and
    ``selected`` (True) on each epoch that became the best_val choice when it was evaluated.
    """
    if config is not None and not isinstance(config, VictimConfig):
        raise TypeError(f"config must be a VictimConfig or None, got {type(config).__name__}")
    cfg = (config if config is not None else VictimConfig()).with_overrides(overrides)
    if not (isinstance(progress, bool) or callable(progress)):
        raise ValueError(f"progress must be True, False or a callable, got {progress!r}")
    with intra_op_threads(cfg.threads), flush_denormal():
        return _train(model, cfg, (train_x, train_y), (test_x, test_y), (val_x, val_y), progress)


def _train(model: str | nn.Module, cfg: VictimConfig, train: tuple, test: tuple, val: tuple,
           progress: bool | Callable) -> VictimResult:
    t_start = time.perf_counter()
    name, defaults = _model_defaults(model)
    device = resolve_device(cfg.device)
    data = _prepare_data(cfg, train, test, val, device)
    cfg = _fill_defaults(cfg, defaults, data.n)
    # Model init, dropout and the data order draw from seeded RNGs; the caller's RNG state is restored after.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        run = _build(model, cfg, data, device)
        history = _fit(run, data, cfg, progress, name)
    _select_weights(run)
    return _result(run, data, cfg, name, history, device, t_start)


__all__ = [
    "GENERIC_DEFAULTS", "VICTIM_DEFAULTS", "Normalize", "VictimConfig", "VictimDefaults", "VictimResult", "as_labels",
    "as_uint8_images", "evaluate_model", "predict_logits", "train_victim",
]
