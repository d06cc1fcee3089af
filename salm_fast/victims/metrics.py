"""Metrics of the victim evaluator.

Classification (clean test set), as MedMNIST's own evaluator defines them:
- ``acc``: top-1 accuracy of the argmax;
- ``auc``: ROC-AUC of the softmax probabilities; binary: of the positive class (class 1);
  multi-class: macro one-vs-rest (each class's probability against the rest, averaged);
- ``auc_flipped`` (binary tasks, added by the victim trainer to its test metrics):
  :func:`protection_auc`, max(AUC, 1 - AUC): the protection figure (DESIGN.md), since an attacker
  with a few clean labeled images flips an inverted ranking;
- ``balanced_acc``: mean per-class recall over the classes present in the labels
  (sklearn's ``balanced_accuracy_score``).
AUC comes from ``torchmetrics.functional`` (CPU, no torchvision needed). Balanced accuracy is
computed here: torchmetrics' ``multiclass_accuracy(average="macro")`` counts a class absent
from the labels as recall 0 instead of leaving it out.

Perturbation quality of a release against the clean images (same shape, uint8 or float in
[0, 1], N x C x H x W or N x H x W):
- ``linf_255`` / ``linf``: max |released - clean| in /255 units and as a fraction of the range;
- ``l0``: fraction of pixels changed (a pixel counts once if any of its channels changed);
- ``psnr_db``: 10 log10(1 / MSE) over the whole set, in [0, 1] units (inf when identical);
- ``ssim``: mean over images of SSIM (Wang et al. 2004) with an 11-tap Gaussian window,
  sigma 1.5, K1 0.01, K2 0.03, averaged over channels and over the "valid" window positions;
  identical to ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)``. (torchmetrics' SSIM differs from it by ~1e-3,
  hence the small implementation here.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc


def _labels(y: Tensor | np.ndarray) -> Tensor:
    y = torch.as_tensor(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must be N or N x 1, got shape {tuple(y.shape)}")
    return y.long()


def auc_score(probs: Tensor, labels: Tensor | np.ndarray) -> float:
    """ROC-AUC of N x K class probabilities: positive-class AUC for K = 2, macro one-vs-rest
    otherwise. Classes without both positives and negatives in ``labels`` are left out of the
    macro average; NaN when no class qualifies (e.g. a single-class label set)."""
    y = _labels(labels).to(probs.device)
    probs = probs.float()
    k = probs.shape[1]
    counts = torch.bincount(y, minlength=k)
    valid = (counts > 0) & (counts < y.numel())
    if k == 2:
        return float(binary_auroc(probs[:, 1], y)) if bool(valid[1]) else math.nan
    if bool(valid.all()):
        return float(multiclass_auroc(probs, y, num_classes=k, average="macro"))
    per_class = [float(binary_auroc(probs[:, c], (y == c).long())) for c in range(k) if bool(valid[c])]
    return float(np.mean(per_class)) if per_class else math.nan


def protection_auc(auc: float, num_classes: int = 2) -> float:
    """The AUC an attacker gets: for a binary task max(AUC, 1 - AUC), since a victim whose ranking
    came out inverted is flipped by anyone holding a few clean labeled images; a multi-class
    (macro one-vs-rest) AUC is returned unchanged. NaN stays NaN."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    auc = float(auc)
    if math.isnan(auc) or num_classes != 2:
        return auc
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc must be in [0, 1], got {auc}")
    return max(auc, 1.0 - auc)


def balanced_accuracy(preds: Tensor, labels: Tensor | np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    y = _labels(labels).to(preds.device)
    support = torch.bincount(y, minlength=num_classes)
    hits = torch.bincount(y[preds == y], minlength=num_classes)
    present = support > 0
    return float((hits[present].double() / support[present].double()).mean())


def classification_metrics(logits: Tensor, labels: Tensor | np.ndarray) -> dict[str, float]:
    """``{"acc", "auc", "balanced_acc", "n"}`` of N x K logits against N labels."""
    logits = logits.detach().float()
    y = _labels(labels).to(logits.device)
    if logits.ndim != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match {y.shape[0]} labels")
    preds = logits.argmax(1)
    return {
        "acc": float((preds == y).double().mean()),
        "auc": auc_score(logits.softmax(1), y),
        "balanced_acc": balanced_accuracy(preds, y, logits.shape[1]),
        "n": int(y.numel()),
    }


# ---------------------------------------------------------------------------------------------
# Perturbation quality

def _as_unit_float(x: Tensor | np.ndarray) -> Tensor:
    """uint8 -> /255; float must already be in [0, 1]. Returns float64 N x C x H x W."""
    t = torch.as_tensor(x)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(f"images must be N x H x W or N x C x H x W, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.double() / 255.0
    if not t.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {t.dtype}")
    t = t.double()
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError("float images must lie in [0, 1]")
    return t


def ssim(a: Tensor, b: Tensor, *, sigma: float = 1.5, radius: int = 5) -> Tensor:
    """Per-image SSIM of two N x C x H x W float tensors in [0, 1] (see the module doc).
    Images smaller than the 11 px window raise ValueError."""
    if a.shape[-1] < 2 * radius + 1 or a.shape[-2] < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1} px, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    offs = torch.arange(-radius, radius + 1, dtype=a.dtype, device=a.device)
    k = torch.exp(-0.5 * (offs / sigma) ** 2)
    k = k / k.sum()
    kh, kv = k.view(1, 1, 1, -1).expand(c, 1, 1, -1), k.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(z: Tensor) -> Tensor:  # separable Gaussian, "valid" positions only
        return F.conv2d(F.conv2d(z, kh, groups=c), kv, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def perturbation_metrics(clean: Tensor | np.ndarray, released: Tensor | np.ndarray) -> dict[str, float]:
    """``{"linf_255", "linf", "l0", "psnr_db", "ssim"}`` of ``released`` against ``clean``."""
    a, b = _as_unit_float(clean), _as_unit_float(released)
    if a.shape != b.shape:
        raise ValueError(f"clean {tuple(a.shape)} and released {tuple(b.shape)} differ in shape")
    diff = b - a
    linf = float(diff.abs().max()) if diff.numel() else 0.0
    mse = float((diff * diff).mean())
    return {
        "linf_255": round(linf * 255.0, 6),  # exact for uint8 inputs
        "linf": linf,
        "l0": float((diff != 0).any(dim=1).double().mean()),
        "psnr_db": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse),
        "ssim": float(ssim(a, b).mean()),
    }


__all__ = ["auc_score", "balanced_accuracy", "classification_metrics", "perturbation_metrics", "protection_auc",
           "ssim"]
