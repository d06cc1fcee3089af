"""The victim side: what an unauthorized user would do with a released dataset.

- :func:`train_victim` trains a zoo model (or any module) from scratch on the release, with
  optional counter-measures, and reports clean test ACC / AUC / balanced accuracy (binary tasks
  also ``auc_flipped`` = max(AUC, 1 - AUC)); every setting is a field of :class:`VictimConfig`;
- :mod:`.defenses`: the counter-measures (JPEG, blur, bit depth, grayscale, ISS, crop+flip,
  cutout, mixup, cutmix, PGD adversarial training), by name;
- :mod:`.metrics`: classification metrics and perturbation quality (L-inf, L0, PSNR, SSIM);
- precision (fp32 vs bf16 from what the CPU supports) and normalization live in :mod:`salm_fast.runtime`.

Comparing clean and protected training is a few lines::

    clean = train_victim("resnet18", x_clean, y, x_test, y_test, seed=0)
    prot = train_victim("resnet18", x_released, y, x_test, y_test, seed=0, defense="jpeg-10")
    clean.test["auc"], prot.test["auc"], perturbation_metrics(x_clean, x_released)
"""
from __future__ import annotations

from .defenses import DEFENSES, DefensePlan, make_defense, parse_defenses
from .metrics import (
    auc_score,
    balanced_accuracy,
    classification_metrics,
    perturbation_metrics,
    protection_auc,
    ssim,
)
from ..runtime import Normalize, autocast, choose_precision, cpu_features
from .train import (
    VICTIM_DEFAULTS,
    VictimConfig,
    VictimDefaults,
    VictimResult,
    as_labels,
    as_uint8_images,
    evaluate_model,
    predict_logits,
    train_victim,
)

__all__ = [
    "DEFENSES", "VICTIM_DEFAULTS", "DefensePlan", "Normalize", "VictimConfig", "VictimDefaults", "VictimResult",
    "as_labels", "as_uint8_images", "auc_score", "autocast", "balanced_accuracy", "choose_precision",
    "classification_metrics", "cpu_features", "evaluate_model", "make_defense", "parse_defenses",
    "perturbation_metrics", "predict_logits", "protection_auc", "ssim", "train_victim",
]
