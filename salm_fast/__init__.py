"""salm-fast: protect medical image datasets from unauthorized training.

``protect`` adds small, bounded perturbations (unlearnable examples) so that a model
trained on the release learns the perturbation instead of the anatomy; ``evaluate``
trains a victim on clean vs released data to show it. The fused kernels of the
protection loop are in :mod:`salm_fast.ops`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402
from .api import EvaluationResult, ProtectResult, evaluate, protect  # noqa: E402
from .protector import ApplyResult, apply, load_protector  # noqa: E402

__all__ = ["ApplyResult", "EvaluationResult", "ProtectResult", "__version__", "apply", "evaluate", "load_protector",
           "ops", "protect"]
