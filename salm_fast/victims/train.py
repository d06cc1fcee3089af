"""The victim's training loop: what an unauthorized user does with a released dataset.

Lean and fast in the airbench / hlb-CIFAR10 manner: the whole training set is one uint8
tensor on the device; each step gathers a batch by ``randperm`` indices, makes it float once
(``/255``), augments the whole batch at once, and runs the model in ``channels_last`` under the
precision chosen at run time (:mod:`.precision`). No DataLoader. Normalization, ``(x - 0.5) /
0.25``, is the first layer of the trained model, so the model returned takes images in [0, 1]
and adversarial training works in pixel space.

Inputs: images as uint8 (the released format), N x C x H x W, N x H x W (gray) or N x H x W x C
(MedMNIST's RGB layout, recognised by C in {1, 3} last); float images in [0, 1] are accepted
and quantized to uint8 first (``round(255 x)``), because what is released, and so what is
judged, is the stored uint8 copy. Labels: N or N x 1 integers.

Reproducibility: same seed, same precision, same thread count and machine -> the same
history bit for bit (model init, data order and augmentation all come from ``seed``; the
caller's global RNG state is restored afterwards). Denormals are flushed during training (they
slow CPU training several-fold) and the caller's setting is restored after.

>>> r = train_victim("cnn", x_train, y_train, x_test, y_test, epochs=5)   # doctest: +SKIP
>>> r.test["acc"], r.test["auc"], r.precision, r.images_per_s             # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..models import MODELS, build_model
from ..runtime import Normalize, autocast, choose_precision, flush_denormal
from .defenses import CropFlip, parse_defenses
from .metrics import classification_metrics



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


@dataclass
class VictimResult:
    """Outcome of one victim training run. ``to_dict()`` is JSON-ready (no model)."""

    model_name: str
    test: dict[str, float]             # acc, auc, balanced_acc, n on the clean test set
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
# Training

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


def train_victim(
    model: str | nn.Module,
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_x: Tensor | np.ndarray,
    test_y: Tensor | np.ndarray,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | None = None,
    label_smoothing: float = LABEL_SMOOTHING,
    augment: str = "none",
    defense: str | None = None,
    seed: int = 0,
    precision: str = "auto",
    channels_last: bool = True,
    eval_every: int = 1,
    val_x: Tensor | np.ndarray | None = None,
    val_y: Tensor | np.ndarray | None = None,
    select: str = "last",
    warmup_frac: float = WARMUP_FRAC,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    eval_train: bool = True,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    threads: int | None = None,
) -> VictimResult:
    """Train a victim from scratch on (released) training images; report clean test metrics.

    ``model``: a zoo name (:data:`salm_fast.models.MODELS`) or an ``nn.Module`` (trained in
    place, wrapped in a :class:`Normalize` layer). ``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``optimizer`` default to :data:`VICTIM_DEFAULTS` for the model (the batch
    shrinks on small training sets, see :data:`MIN_STEPS_PER_EPOCH`).
    ``augment``: ``"none"`` or ``"crop_flip"`` (the victim's own augmentation; same as adding
    the ``crop_flip`` defense). ``defense``: counter-measure names joined by ``+`` (see
    :mod:`.defenses`); data-level ones transform the training images once (never the test
    images), training-time ones every batch. ``precision``: ``"auto"`` | ``"fp32"`` |
    ``"bf16"`` (:func:`.precision.choose_precision`). ``eval_every``: evaluate the test (and
    validation) set every that many epochs and at the last one (0: only at the end).
    ``select``: ``"last"`` (the final model) or ``"best_val"`` (the epoch with the best
    validation AUC among the evaluated epochs; needs ``val_x``/``val_y``). ``progress``: True
    for a tqdm bar, or a callable given each history row. ``threads``: intra-op threads for
    this call (restored after; None keeps torch's setting) -- on a CPU shared with other jobs
    one thread can be several times faster than two.

    History rows: ``epoch``, ``lr`` (at the epoch's last step), ``train_loss`` (mean soft
    cross-entropy over the epoch's batches), ``train_acc`` (running accuracy on the augmented
    batches against the argmax of their (mixed) targets), ``epoch_s`` (training seconds),
    ``test_acc``, ``test_auc``, ``val_acc``, ``val_auc`` (None on epochs not evaluated).
    A final partial batch of one image is skipped (BatchNorm cannot train on one sample).
    """
    args = dict(locals())
    if threads is None:
        with flush_denormal():
            return _train_victim(**args)
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with flush_denormal():
            return _train_victim(**args)
    finally:
        torch.set_num_threads(before)


def _train_victim(*, model, train_x, train_y, test_x, test_y, epochs, batch_size, lr, weight_decay, optimizer,
                  label_smoothing, augment, defense, seed, precision, channels_last, eval_every, val_x, val_y,
                  select, warmup_frac, num_classes, device, eval_train, progress, threads) -> VictimResult:
    t_start = time.perf_counter()
    plan = parse_defenses(defense)
    if augment not in ("none", "crop_flip"):
        raise ValueError(f"augment must be 'none' or 'crop_flip', got {augment!r}")
    if augment == "crop_flip" and not any(isinstance(b, CropFlip) for b in plan.batch):
        plan.batch.insert(0, CropFlip())
    if select not in ("last", "best_val"):
        raise ValueError(f"select must be 'last' or 'best_val', got {select!r}")
    has_val = val_x is not None and val_y is not None
    if select == "best_val" and not has_val:
        raise ValueError("select='best_val' needs val_x and val_y")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    x_tr = as_uint8_images(train_x)
    y_tr = as_labels(train_y, x_tr.shape[0])
    x_te = as_uint8_images(test_x)
    y_te = as_labels(test_y, x_te.shape[0])
    x_va = as_uint8_images(val_x) if has_val else None
    y_va = as_labels(val_y, x_va.shape[0]) if has_val else None
    n, c, h, w = x_tr.shape
    if n < 2:
        raise ValueError("need at least 2 training images")
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise ValueError(f"test images {tuple(x_te.shape[1:])} differ from training images {tuple(x_tr.shape[1:])}")
    k = int(num_classes) if num_classes is not None else int(max(y_tr.max(), y_te.max())) + 1
    k = max(k, 2)
    top = max(int(y_tr.max()), int(y_te.max()), int(y_va.max()) if has_val and y_va.numel() else 0)
    if top >= k:
        raise ValueError(f"label {top} out of range for num_classes={k}")

    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
        model_name, defaults = model, VICTIM_DEFAULTS.get(model, GENERIC_DEFAULTS)
    else:
        model_name, defaults = type(model).__name__, GENERIC_DEFAULTS
    epochs = defaults.epochs if epochs is None else int(epochs)
    if batch_size is None:  # small sets: smaller batches, so that an epoch still has MIN_STEPS_PER_EPOCH steps
        batch_size = max(16, min(defaults.batch_size, int(train_x.shape[0]) // MIN_STEPS_PER_EPOCH))
    batch_size = int(batch_size)
    lr = defaults.lr if lr is None else float(lr)
    weight_decay = defaults.weight_decay if weight_decay is None else float(weight_decay)
    optimizer = defaults.optimizer if optimizer is None else optimizer
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")

    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    notes = plan.notes(c)
    t0 = time.perf_counter()
    x_tr = plan.apply_data(x_tr)
    defense_time = time.perf_counter() - t0
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    targets_table = torch.full((k, k), label_smoothing / k, device=device)
    targets_table += torch.eye(k, device=device) * (1.0 - label_smoothing)

    history: list[dict[str, Any]] = []
    train_time = eval_time = 0.0
    images_seen = 0
    best_auc, best_state = -math.inf, None
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if isinstance(model, str):
            core = build_model(model, c, k, image_size=max(h, w))
        else:
            core = model
        net = nn.Sequential(Normalize(), core).to(device).to(memory_format=fmt)
        precision, precision_reason = choose_precision(precision, device, model=core,
                                                       sample_shape=(batch_size, c, h, w), num_classes=k)
        gen = torch.Generator().manual_seed(seed)
        opt = _make_optimizer(net, optimizer, lr, weight_decay)
        steps_per_epoch = math.ceil(n / batch_size) - (1 if n % batch_size == 1 else 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(epochs * steps_per_epoch, warmup_frac))

        bar = None
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs, desc=f"victim {model_name}", unit="epoch")

        for epoch in range(1, epochs + 1):
            net.train()
            t_epoch = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                xb = x_tr[idx].float().div_(255)
                tb = targets_table[y_tr[idx]]
                xb, tb = plan.apply_batch(xb, tb, gen)
                xb = xb.contiguous(memory_format=fmt)
                if plan.adversarial is not None:
                    xb = plan.adversarial.perturb(net, xb, tb, _soft_cross_entropy, gen, precision)
                with autocast(precision, device):
                    logits = net(xb)
                loss = _soft_cross_entropy(logits, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    loss_sum += loss.detach().double() * idx.numel()
                    correct += (logits.argmax(1) == tb.argmax(1)).sum()
                seen += idx.numel()
            epoch_s = time.perf_counter() - t_epoch
            train_time += epoch_s
            images_seen += seen
            row: dict[str, Any] = {
                "epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / seen,
                "train_acc": int(correct) / seen, "epoch_s": epoch_s,
                "test_acc": None, "test_auc": None, "val_acc": None, "val_auc": None,
            }
            if epoch == epochs or (eval_every > 0 and epoch % eval_every == 0):
                t_eval = time.perf_counter()
                m = evaluate_model(net, x_te, y_te, precision=precision, channels_last=channels_last)
                row["test_acc"], row["test_auc"] = m["acc"], m["auc"]
                if has_val:
                    mv = evaluate_model(net, x_va, y_va, precision=precision, channels_last=channels_last)
                    row["val_acc"], row["val_auc"] = mv["acc"], mv["auc"]
                    score = -math.inf if math.isnan(mv["auc"]) else mv["auc"]
                    if select == "best_val" and (best_state is None or score > best_auc):
                        best_auc, best_state = score, copy.deepcopy(net.state_dict())
                        row["selected"] = True
                eval_time += time.perf_counter() - t_eval
            history.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                test_acc="-" if row["test_acc"] is None else f"{row['test_acc']:.3f}")
                bar.update(1)
            elif callable(progress):
                progress(row)
        if bar is not None:
            bar.close()

    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    t_eval = time.perf_counter()
    test_m = evaluate_model(net, x_te, y_te, precision=precision, channels_last=channels_last)
    val_m = evaluate_model(net, x_va, y_va, precision=precision, channels_last=channels_last) if has_val else None
    train_m = evaluate_model(net, x_tr, y_tr, precision=precision, channels_last=channels_last) if eval_train else None
    eval_time += time.perf_counter() - t_eval

    settings = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer,
        "label_smoothing": label_smoothing, "augment": augment, "seed": seed, "channels_last": channels_last,
        "warmup_frac": warmup_frac, "select": select, "num_classes": k, "image_shape": [c, h, w],
        "n_train": n, "n_test": int(x_te.shape[0]), "device": str(device), "threads": torch.get_num_threads(),
        "eval_s": eval_time, "defense_s": defense_time,
    }
    return VictimResult(
        model_name=model_name, test=test_m, train=train_m, val=val_m, history=history,
        precision=precision, precision_reason=precision_reason, defense=plan.name,
        time_s=time.perf_counter() - t_start, train_time_s=train_time,
        images_per_s=images_seen / train_time if train_time > 0 else math.nan,
        settings=settings, notes=notes, model=net,
    )


__all__ = [
    "GENERIC_DEFAULTS", "VICTIM_DEFAULTS", "Normalize", "VictimDefaults", "VictimResult", "as_labels",
    "as_uint8_images", "evaluate_model", "predict_logits", "train_victim",
]
