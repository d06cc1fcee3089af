"""The quick audit: is a release protected? One verdict line in under a minute on a CPU.

``salm-fast audit RELEASE --clean CLEAN`` (and the end of every ``protect``, unless
``--no-audit`` / ``audit=False``) measures two things on the stored release:

* the budget, L0, PSNR and SSIM of the release against the clean images, per split
  (:func:`salm_fast.release.measure_budget` on the 8-bit images,
  :func:`salm_fast.victims.metrics.perturbation_metrics`; for 16-bit and DICOM folders also on the
  stored values, :func:`salm_fast.data.stored.stored_budget`), checked against eps (and K) when
  known: given, or read from the output folder's ``summary.json``;
* what a victim learns: the zoo's small ``cnn`` trained briefly (a few epochs in a fixed time
  budget, the same settings and seed) on the release's train split and on the clean one, both
  tested on the clean test split (or, without one, on a held-out fifth of the clean train split,
  left out of both trainings).

The verdict compares the victims' protection AUC (:func:`~salm_fast.victims.metrics.protection_auc`:
max(AUC, 1 - AUC) for a binary task, macro one-vs-rest AUC otherwise), as what they learn above
chance (AUC - 0.5):

* ``protected``: the release-trained victim keeps at most :data:`RETAINED_MAX` (a quarter) of
  what the clean-trained one learns above chance (clean 0.95 -> protected at release <= 0.61);
* ``NOT protected``: it keeps more;
* ``inconclusive``: the clean-trained victim reaches less than :data:`CLEAN_MIN_AUC` (0.70) in the
  brief training, too little to judge by; or no victim is trained (the audit is then the budget
  and quality alone): the train split has fewer than :data:`MIN_VICTIM_IMAGES` (200) images, from
  which a brief victim learns nothing, or the images are outside the zoo's 28..224 px;
* ``over budget``: the release moves a pixel further than eps (or more than K pixels an image).

It is a quick check, not the full evaluation (``salm-fast evaluate``: a ResNet-18 trained to
convergence, counter-measures): a brief victim learns the shortcut an unlearnable example offers
early, but a release that fools it may still be learned by a longer or larger training.
Epochs: ``epochs=`` fixes them (reproducible); by default they are chosen from a short timing
probe so that the probe and both trainings fit :data:`TIME_BUDGET_S` (at most :data:`MAX_EPOCHS`;
on a set too large for one epoch in the budget, the same random subset of the train split for
both; a machine busy with other work gets fewer images, and a weaker verdict), and
``audit.json`` records the epochs and images used. Nothing in it names a directory or comes
from a file's header (DICOM): dataset names, numbers and settings only.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import DataError, Dataset, FolderDataset, atomic_write_json, load_dataset, stored_budget, storage_to_nchw
from .release import budget_levels, measure_budget

__all__ = ["AUDIT", "AuditResult", "CLEAN_MIN_AUC", "MAX_EPOCHS", "MIN_VICTIM_IMAGES", "RETAINED_MAX", "TIME_BUDGET_S",
           "audit"]

AUDIT = "audit.json"
VICTIM = "cnn"
#: Seconds of victim training: the timing probe and both victims together (loading, metrics and the
#: victims' evaluation come on top: a few seconds on a MedMNIST-size set).
TIME_BUDGET_S = 40.0
MAX_EPOCHS = 5
#: Fewer train images than this: no victim is trained (a brief training on so few learns nothing).
MIN_VICTIM_IMAGES = 200
#: An epoch of the timing probe (two epochs: the second, warmed up, is timed): this many batches, and at
#: least PROBE_IMAGES images, so that a few steps' noise on a busy machine does not decide the epochs.
PROBE_BATCHES = 2
PROBE_IMAGES = 256
#: Intra-op threads of the victims: one. On this project's shared 2-core machine two contending OpenMP
#: threads made the brief training up to 20x slower (BreastMNIST cnn, bf16, load 9: 20 vs 413 images/s).
THREADS = 1
HOLDOUT_FRACTION = 0.2  # of the clean train split, when the clean data has no test split
#: Protected: the release-trained victim keeps at most this fraction of the clean-trained one's AUC above chance.
RETAINED_MAX = 0.25
#: Below this clean protection AUC the brief victim learned too little to judge: inconclusive.
CLEAN_MIN_AUC = 0.70
SUMMARY = "summary.json"


@dataclass
class AuditResult:
    """What :func:`audit` measured; ``as_dict()`` is what ``audit.json`` holds."""

    verdict: str                      # the one line
    status: str                       # "protected" | "NOT protected" | "inconclusive" | "over budget"
    clean_auc: float                  # protection AUC of the clean-trained victim on the clean test images
    release_auc: float                # the same, trained on the release
    retained: float                   # (release_auc - 0.5) / (clean_auc - 0.5)
    budget: dict[str, Any]            # per split: L-inf (8-bit levels), L0 of the release vs clean; eps and K if known
    quality: dict[str, Any] | None    # PSNR/SSIM/L-inf/L0 of the train split (None: images under SSIM's 11 px)
    stored_budget: dict[str, Any] | None  # 16-bit / DICOM folders: the budget on the stored values, per split
    victims: dict[str, Any]           # "clean" / "release": test metrics, train seconds
    settings: dict[str, Any]          # victim, epochs (and how chosen), images, test split, thresholds, precision
    seconds: float

    @property
    def protected(self) -> bool:
        return self.status == "protected"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output_folder(path: Path) -> tuple[Path, dict[str, Any]]:
    """A published output folder -> (its release, its summary); anything else -> (itself, {})."""
    summary_path = path / SUMMARY
    if not (path.is_dir() and summary_path.is_file()):
        return path, {}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        name = summary["files"]["release"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{summary_path}: not a salm-fast summary (no files.release)") from None
    if not isinstance(name, str) or Path(name).name != name:
        raise DataError(f"{summary_path}: files.release {name!r} is not a file name inside {path}")
    return path / name, summary


def _check_pair(clean: Dataset, release: Dataset) -> list[str]:
    """The splits both hold (train among them), with equal image shapes and labels."""
    if "train" not in release.splits or "train" not in clean.splits:
        raise DataError("audit needs a train split in the release and in the clean data")
    common = [s for s in release.splits if s in clean.splits]
    for s in common:
        a, b = clean[s], release[s]
        if a.images.shape != b.images.shape:
            raise DataError(f"release {s} images {b.images.shape} do not match the clean ones {a.images.shape} "
                            "(a resized release: pass the same resize for the clean data)")
        if not np.array_equal(a.labels, b.labels):
            raise DataError(f"release {s} labels differ from the clean labels: not a release of this dataset")
    return common


def _budgets(clean: Dataset, release: Dataset, splits: list[str], eps: float | None,
             k: int | None) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """Per split: the budget on the 8-bit images (and on the stored values of 16-bit / DICOM folders),
    and what exceeds eps or K (checked on the stored values where the files have them)."""
    stored_values = all(isinstance(d, FolderDataset) and d.full_depth for d in (clean, release))
    budget: dict[str, Any] = {}
    stored: dict[str, Any] | None = {} if stored_values else None
    over: list[str] = []
    for s in splits:
        b = measure_budget(clean[s].images, release[s].images).as_dict()
        budget[s] = b
        if stored is not None:
            a, r = clean.stored[s], release.stored[s]
            if not np.array_equal(a.bits, r.bits):
                raise DataError(f"release {s} files have other bit depths than the clean ones")
            stored[s] = stored_budget(a, r.pixels, eps, k, strict=False)
            over += [f"{s}: {text}" for text in stored[s].get("over", [])]
            continue
        if eps is not None and b["linf_levels"] > budget_levels(eps):
            over.append(f"{s}: L-inf {b['linf_levels']}/255 exceeds eps {budget_levels(eps)}/255")
        if k is not None and b["l0_max_per_image"] > k:
            over.append(f"{s}: {b['l0_max_per_image']} pixels changed in an image, more than K = {k}")
    return budget, stored, over


def _quality(clean: Dataset, release: Dataset) -> dict[str, Any] | None:
    from .victims.metrics import perturbation_metrics

    if min(clean.image_shape) < 11:  # SSIM's window
        return None
    return perturbation_metrics(storage_to_nchw(clean["train"].images), storage_to_nchw(release["train"].images))


def _victim_data(clean: Dataset, release: Dataset, seed: int) -> dict[str, Any]:
    """Train images of both, labels, and the clean test images (or a held-out part of clean train)."""
    x_clean, x_release, y = clean["train"].images, release["train"].images, clean["train"].labels[:, 0]
    if "test" in clean.splits:
        return {"clean": x_clean, "release": x_release, "y": y, "test_x": clean["test"].images,
                "test_y": clean["test"].labels[:, 0], "test": "clean test split"}
    n = len(y)
    held = max(1, round(HOLDOUT_FRACTION * n))
    if n - held < 2:
        raise DataError(f"audit: {n} train images and no test split; need at least 3 to hold some out")
    order = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(order[:held]), np.sort(order[held:])
    return {"clean": x_clean[train], "release": x_release[train], "y": y[train], "test_x": x_clean[test],
            "test_y": y[test], "test": f"{held} images held out of the clean train split (no test split)"}


def _batch_size(victim: str, n: int) -> int:
    """The victim's batch on ``n`` train images, as its training picks it (fixed here: the probe times it)."""
    from .victims.train import GENERIC_DEFAULTS, MIN_STEPS_PER_EPOCH, VICTIM_DEFAULTS

    return max(16, min(VICTIM_DEFAULTS.get(victim, GENERIC_DEFAULTS).batch_size, n // MIN_STEPS_PER_EPOCH))


def _plan_epochs(data: dict[str, Any], victim: str, epochs: int | None, time_budget_s: float, seed: int,
                 precision: str, n_classes: int, batch: int) -> tuple[int, np.ndarray | None, str]:
    """(epochs, a subset of the train images or None, how they were chosen)."""
    n = len(data["y"])
    if epochs is not None:
        return epochs, None, "given"
    from .victims import train_victim

    t0 = time.perf_counter()
    probe = np.random.default_rng(seed).permutation(n)[:min(n, max(PROBE_BATCHES * batch, PROBE_IMAGES))]
    r = train_victim(victim, data["clean"][probe], data["y"][probe], data["test_x"][:2], data["test_y"][:2],
                     epochs=2, batch_size=batch, seed=seed, precision=precision, eval_every=0, eval_train=False,
                     num_classes=n_classes, threads=THREADS)
    speed = len(probe) / max(r.history[-1]["epoch_s"], 1e-9)  # the warmed-up epoch: no first-call setup in it
    left = max(time_budget_s - (time.perf_counter() - t0), time_budget_s / 4)  # the probe's time is spent
    per_run = left / 2 * speed  # images one victim may see in its half of what is left
    chosen = int(max(1, min(MAX_EPOCHS, math.floor(per_run / n))))
    how = f"timing probe: {speed:.0f} images/s, {time_budget_s:g} s for both victims"
    if per_run >= n:
        return chosen, None, how
    keep = max(2, int(per_run))
    subset = np.sort(np.random.default_rng(seed + 1).permutation(n)[:keep])
    return 1, subset, how + f": one epoch on {keep} of {n} train images"


def _no_victim(n_train: int, image_shape: tuple[int, int]) -> str | None:
    """Why no victim is trained, or None."""
    from .models import MAX_IMAGE_PX, MIN_IMAGE_PX

    if n_train < MIN_VICTIM_IMAGES:
        return f"{n_train} train images, fewer than the {MIN_VICTIM_IMAGES} a brief victim needs to learn anything"
    if not MIN_IMAGE_PX <= max(image_shape) <= MAX_IMAGE_PX:
        return f"{image_shape[0]}x{image_shape[1]} images; the victims take {MIN_IMAGE_PX}..{MAX_IMAGE_PX} px"
    return None


def _verdict(clean_auc: float, release_auc: float, over: list[str], no_victim: str | None) -> tuple[str, str, float]:
    gain = clean_auc - 0.5
    retained = (release_auc - 0.5) / gain if gain > 0 else math.nan
    said = f"a victim trained on the release reaches protection AUC {release_auc:.2f} vs {clean_auc:.2f} on clean data"
    if over:
        return "over budget", f"over budget: {over[0]}" + (f" (and {len(over) - 1} more)" if len(over) > 1 else ""), \
            retained
    if no_victim is not None:
        return "inconclusive", f"inconclusive: no victim trained ({no_victim}); run salm-fast evaluate", retained
    if not clean_auc >= CLEAN_MIN_AUC:
        return "inconclusive", (f"inconclusive: the briefly trained clean victim reaches only AUC {clean_auc:.2f} "
                                f"(< {CLEAN_MIN_AUC}), too little to judge by; run salm-fast evaluate"), retained
    if retained <= RETAINED_MAX:
        return "protected", f"protected: {said}", retained
    return "NOT protected", f"NOT protected: {said} (it keeps {retained:.0%} of what clean training learns " \
                            f"above chance; protected means <= {RETAINED_MAX:.0%})", retained


def _as_dataset(data: str | Path | Dataset, resize: Any, what: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, (str, Path)):
        raise DataError(f"{what} must be a path, a dataset spec or a Dataset, got {type(data).__name__}")
    return load_dataset(data, resize=resize)


def audit(release: str | Path | Dataset, clean: str | Path | Dataset, *, eps: float | str | None = None,
          k: int | float | None = None, victim: str = VICTIM, epochs: int | None = None,
          time_budget_s: float = TIME_BUDGET_S, seed: int = 0, precision: str = "auto",
          resize: tuple[int, int] | str | None = None, out: str | Path | None = None,
          progress: bool = False) -> AuditResult:
    """Audit ``release`` against ``clean`` (module doc); write ``out/audit.json`` when ``out`` is given.

    ``release``: a published output folder (its ``summary.json`` gives the release file and, unless
    given, eps and K), a release file or folder, or a Dataset; ``clean``: a path, a spec or a Dataset.
    ``eps`` (a fraction, ``"8/255"``) and ``k`` (pixels, or a fraction of H x W) are checked when known.
    ``resize``: read image folders at this size (as ``protect --resize`` did). ``epochs``: fixed
    (reproducible); None: chosen to fit ``time_budget_s`` of training.
    """
    from . import ops
    from .models import MODELS
    from .release import parse_eps
    from .victims import protection_auc, train_victim

    t0 = time.perf_counter()
    if victim not in MODELS:
        raise ValueError(f"unknown victim {victim!r}; choose one of {', '.join(MODELS)}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be a number of seconds > 0, got {time_budget_s!r}")
    summary: dict[str, Any] = {}
    if not isinstance(release, Dataset):
        release, summary = _output_folder(Path(release))
    eps = parse_eps(eps) if eps is not None else summary.get("eps")
    k = k if k is not None else (summary.get("options") or {}).get("k")
    if out is not None:
        out = Path(out)
        if not out.is_dir():
            raise DataError(f"{out}: no such folder for {AUDIT}")
    release_ds = _as_dataset(release, resize, "release")
    clean_ds = _as_dataset(clean, resize, "clean")
    splits = _check_pair(clean_ds, release_ds)
    k_pixels = ops.resolve_k(k, clean_ds.image_shape[0] * clean_ds.image_shape[1]) if k is not None else None

    budget, stored, over = _budgets(clean_ds, release_ds, splits, eps, k_pixels)
    quality = _quality(clean_ds, release_ds)
    data = _victim_data(clean_ds, release_ds, seed)
    n_classes, n_train = clean_ds.n_classes, len(data["y"])
    no_victim = _no_victim(n_train, clean_ds.image_shape)
    batch = _batch_size(victim, n_train)
    if no_victim is None:
        chosen, subset, how = _plan_epochs(data, victim, epochs, time_budget_s, seed, precision, n_classes, batch)
    else:
        chosen, subset, how = 0, None, f"no victim: {no_victim}"
    pick = slice(None) if subset is None else subset
    runs: dict[str, Any] = {}
    for name in ("clean", "release") if chosen else ():
        if progress:
            print(f"audit: training {victim} on the {name} data ({chosen} epoch(s)) ...", flush=True)
        r = train_victim(victim, data[name][pick], data["y"][pick], data["test_x"], data["test_y"], epochs=chosen,
                         batch_size=batch, seed=seed, precision=precision, eval_every=0, eval_train=False,
                         num_classes=n_classes, threads=THREADS)
        runs[name] = {"test": r.test, "protection_auc": protection_auc(r.test["auc"], n_classes),
                      "train_s": r.train_time_s, "precision": r.precision}
    clean_auc, release_auc = (runs[n]["protection_auc"] if runs else math.nan for n in ("clean", "release"))
    status, line, retained = _verdict(clean_auc, release_auc, over, no_victim)
    settings = {
        "victim": victim, "epochs": chosen, "batch_size": batch, "threads": THREADS, "epochs_chosen_by": how,
        "seed": seed,
        "precision": runs["clean"]["precision"] if runs else None,
        "n_train": n_train if subset is None else len(subset), "n_test": len(data["test_y"]),
        "test": data["test"], "time_budget_s": time_budget_s, "eps": eps, "k": k, "k_pixels": k_pixels,
        "thresholds": {"retained_max": RETAINED_MAX, "clean_min_auc": CLEAN_MIN_AUC},
        "release": release_ds.name, "clean": clean_ds.name, "splits": splits,
    }
    result = AuditResult(line, status, clean_auc, release_auc, retained, {"per_split": budget, "over": over},
                         quality, stored, runs, settings, time.perf_counter() - t0)
    if out is not None:
        atomic_write_json(out / AUDIT, result.as_dict())
    return result
