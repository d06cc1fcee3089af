"""The Python API: ``protect`` a dataset, ``evaluate`` what a victim learns from the release.

>>> import salm_fast
>>> result = salm_fast.protect("synthetic", method="salm", k=0.1, out="out/demo")  # doctest: +SKIP
>>> report = salm_fast.evaluate("synthetic", result.release_path, victim="cnn")   # doctest: +SKIP
>>> print(report.table())                                                          # doctest: +SKIP

``protect`` writes, atomically, into ``out``: the release in the input's format (a
MedMNIST ``.npz`` that ``medmnist``'s own classes load, or an image folder), a JSON
summary, a PNG figure (clean | protected | amplified |delta| | mask) and, while it
runs, the round log and a checkpoint under ``out/work`` (``resume=True`` continues
an interrupted run to the same bytes). Only the release file is meant to be shared:
it holds the perturbed images and the untouched splits, no clean copy of the
perturbed images, no noise and no seed.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, ops
from .data import (
    SPLITS,
    DataError,
    Dataset,
    atomic_write_json,
    check_writable,
    load_dataset,
    medmnist_filename,
    nchw_to_storage,
    save_image_folder,
    save_medmnist,
    storage_to_nchw,
)
from .data.atomic import check_writable_dir
from .methods import METHODS, make_method
from .release import budget_levels, measure_budget, parse_eps, quantize_release

SUMMARY = "summary.json"
FIGURE = "protection.png"
WORKDIR = "work"


# ------------------------------------------------------------------------------ helpers
def _as_dataset(data: str | Path | Dataset) -> Dataset:
    return data if isinstance(data, Dataset) else load_dataset(data)


def _resolve_splits(ds: Dataset, splits: str | Sequence[str]) -> list[str]:
    if splits == "all":
        return [s for s in SPLITS if s in ds.splits]
    names = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in names if s not in ds.splits]
    if bad or not names:
        raise ValueError(f"splits {bad or names} not in the dataset (it has {', '.join(ds.splits)}); "
                         "use 'train', a list, or 'all'")
    return names


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "salm_fast": __version__, "python": platform.python_version()}


def check_out_dir(out: Path) -> None:
    """``out`` is a writable folder, or one that can be created (its nearest existing ancestor is a
    writable folder); raise UnwritableOutputError before any work otherwise. Creates nothing."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    check_writable_dir(existing, out)


def release_path_for(ds: Dataset, out: Path) -> Path:
    """Where the release of ``ds`` goes inside ``out``: the input's own format and name."""
    if ds.source and Path(ds.source).is_dir():
        return out / "images"
    size = ds.size if ds.size is not None else ds.image_shape[0]
    return out / medmnist_filename(ds.name or "dataset", size)


# ------------------------------------------------------------------------------ protect
@dataclass
class ProtectResult:
    """What ``protect`` produced; ``summary`` is also written as JSON beside the release."""

    release: Dataset
    release_path: Path
    summary: dict[str, Any]
    delta: torch.Tensor | None = field(default=None, repr=False)  # float perturbation (not saved)
    mask: torch.Tensor | None = field(default=None, repr=False)

    def table(self) -> str:
        s = self.summary
        b = s["budget"]
        rows = [("method", s["method"]), ("perturbed splits", ", ".join(s["splits"])),
                ("images", str(s["images"])),
                ("L-inf (stored bytes)", f"{b['linf_levels']}/255 (budget {s['budget_levels']}/255)"),
                ("L0 (pixels changed)", f"{b['l0_fraction']:.3f} of pixels, <= {b['l0_max_per_image']} per image"),
                *([("L2 (stored bytes)", f"{b['l2_max']:.3f} per image (max)" + (
                    f", budget {b['l2_budget']:.3f}" if b.get("l2_budget") is not None else ""))]
                  if "l2_max" in b else []),
                ("PSNR / SSIM", f"{s['quality']['psnr_db']:.1f} dB / {s['quality']['ssim']:.4f}"),
                ("time", f"{s['seconds']:.1f} s ({s['images_per_second']:.0f} images/s)"),
                ("release", str(self.release_path))]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def protect(data: str | Path | Dataset, method: str = "salm", *, out: str | Path, eps: float | None = None,
            k: int | float | None = None, splits: str | Sequence[str] = "train", seed: int = 0,
            resume: bool = False, overwrite: bool = False, progress: bool = False, backend: str | None = None,
            figure: bool = True, keep_checkpoint: bool = False, **options: Any) -> ProtectResult:
    """Protect ``data`` with ``method``; write the release, a summary and a figure into ``out``.

    ``eps``: the L-inf budget in [0, 1] units; None: the method's default (8/255; 1.0 for
    ``ops``, and for ``lsp`` in its L2 mode). ``k`` (masked methods): pixels per image (int)
    or fraction of H*W (float); None: the method's default (SALM 0.1, ``ops`` 1).
    ``splits``: which splits to perturb ("train", a list, or "all").
    Everything is checked before any work starts; nothing is written on bad input.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if eps is not None:
        eps = parse_eps(eps)
    if k is None and METHODS[method].masked:
        k = METHODS[method].default_k
    if k is not None:
        options["k"] = k
    algo = make_method(method, eps=eps, seed=seed, **options)  # validates the options
    eps = algo.eps  # eps=None: the method's default
    with ops.use_backend(backend):
        pass  # validates the backend before the long part
    ds = _as_dataset(data)
    chosen = _resolve_splits(ds, splits)
    algo.check_data(ds.image_shape, ds.n_classes)  # e.g. k within H*W, classes within n_classes
    out = Path(out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    target = release_path_for(ds, out)
    check_writable(out / SUMMARY, overwrite=True)
    if target.exists() and not (overwrite or (resume and (out / WORKDIR / "checkpoint.pt").exists())):
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")

    counts = [len(ds[s]) for s in chosen]
    clean_u8 = torch.cat([storage_to_nchw(ds[s].images) for s in chosen])
    labels = torch.cat([torch.from_numpy(np.array(ds[s].labels[:, 0])) for s in chosen]).long()
    x = clean_u8.float() / 255

    t0 = time.perf_counter()
    with ops.use_backend(backend):
        protection = algo.fit(x, labels, ds.n_classes, workdir=out / WORKDIR, resume=resume, progress=progress)
        release_u8 = quantize_release(clean_u8, protection.delta, eps)
    seconds = time.perf_counter() - t0

    released = ds
    budget, quality = {}, {}
    for name, part, clean_part in zip(chosen, release_u8.split(counts), clean_u8.split(counts)):
        stored = nchw_to_storage(part)
        released = released.replace_split(name, stored)
        budget[name] = measure_budget(ds[name].images, released[name].images).as_dict()
    _verify_budget(algo, budget, eps, x.shape[2] * x.shape[3])
    extra_budget = algo.check_release(clean_u8, release_u8)  # e.g. LSP's L2 bound on the stored bytes
    quality = _quality(clean_u8, release_u8)

    summary = {
        "method": method,
        "paper": algo.paper,
        "norm": algo.norm,
        "options": algo.options(),
        "dataset": {"name": ds.name, "source": ds.source, "n_classes": ds.n_classes, "channels": ds.channels,
                    "image_shape": list(ds.image_shape), "splits": {s: len(ds[s]) for s in ds.splits}},
        "splits": chosen,
        "images": int(len(x)),
        "eps": eps,
        "budget_levels": budget_levels(eps),
        "budget": {**_merge_budget(budget), **extra_budget},
        "budget_per_split": budget,
        "quality": quality,
        "seconds": seconds,
        "images_per_second": len(x) / seconds if seconds > 0 else 0.0,
        "backend": backend or "default",
        "protection": {k_: v for k_, v in protection.info.items() if k_ != "history"},
        "machine": machine_info(),
        "files": {"release": target.name, "figure": FIGURE if figure else None},
    }
    if target.suffix == ".npz":
        save_medmnist(released, target, overwrite=True)
    else:
        save_image_folder(released, target, overwrite=True)
    if figure:
        from .figures import protection_figure

        first = chosen[0]
        protection_figure(ds[first].images, released[first].images, protection.mask[: counts[0]],
                          ds[first].labels[:, 0], out / FIGURE, class_names=ds.label_names,
                          title=f"{method}: eps {budget_levels(eps)}/255"
                                + (f", k {k}" if k is not None else ""))
    atomic_write_json(out / SUMMARY, summary)
    if not keep_checkpoint:  # it holds the noise: never leave it beside a release by accident
        (out / WORKDIR / "checkpoint.pt").unlink(missing_ok=True)
    return ProtectResult(released, target, summary, protection.delta, protection.mask)


def _verify_budget(algo, budget: dict, eps: float, hw: int) -> None:
    """The budget must hold on the stored bytes; a violation is a bug, never a warning."""
    levels = budget_levels(eps)
    for name, b in budget.items():
        if b["linf_levels"] > levels:
            raise RuntimeError(f"{name}: stored L-inf {b['linf_levels']}/255 exceeds the budget {levels}/255 (a bug)")
        if algo.masked and b["l0_max_per_image"] > ops.resolve_k(algo.k, hw):
            raise RuntimeError(f"{name}: stored L0 {b['l0_max_per_image']} exceeds k (a bug)")


def _merge_budget(budget: dict) -> dict:
    parts = list(budget.values())
    n = sum(p["n_images"] for p in parts)
    return {
        "linf_levels": max(p["linf_levels"] for p in parts),
        "linf": max(p["linf"] for p in parts),
        "l0_fraction": sum(p["l0_fraction"] * p["n_images"] for p in parts) / n,
        "l0_max_per_image": max(p["l0_max_per_image"] for p in parts),
        "changed_images": sum(p["changed_images"] for p in parts),
        "n_images": n,
    }


def _quality(clean_u8: torch.Tensor, release_u8: torch.Tensor) -> dict[str, float]:
    from .victims.metrics import perturbation_metrics

    return perturbation_metrics(clean_u8, release_u8)


# ------------------------------------------------------------------------------ evaluate
@dataclass
class EvaluationResult:
    """A victim trained on the clean data and on the release, tested on clean test images."""

    victim: str
    defense: str
    clean: dict[str, Any]  # VictimResult.to_dict() of the clean run
    release: dict[str, Any]
    perturbation: dict[str, float]
    precision: str
    settings: dict[str, Any]

    def table(self) -> str:
        head = f"victim {self.victim} | defense {self.defense} | precision {self.precision}"
        lines = [head, f"{'trained on':<12} {'test ACC':>9} {'test AUC':>9} {'bal. ACC':>9} {'train ACC':>10}"]
        for name, r in (("clean", self.clean), ("release", self.release)):
            t, tr = r["test"], r.get("train") or {}
            lines.append(f"{name:<12} {t['acc']:>9.3f} {t['auc']:>9.3f} {t['balanced_acc']:>9.3f} "
                         f"{tr.get('acc', float('nan')):>10.3f}")
        p = self.perturbation
        lines.append(f"release vs clean: L-inf {p['linf_255']:.0f}/255, L0 {p['l0']:.3f}, "
                     f"PSNR {p['psnr_db']:.1f} dB, SSIM {p['ssim']:.4f}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"victim": self.victim, "defense": self.defense, "precision": self.precision,
                "clean": self.clean, "release": self.release, "perturbation": self.perturbation,
                "settings": self.settings}


def _check_pair(clean: Dataset, release: Dataset) -> None:
    if "train" not in release.splits or "test" not in clean.splits:
        raise DataError("evaluate needs a train split in the release and a test split in the clean data")
    a, b = clean["train"], release["train"]
    if a.images.shape != b.images.shape:
        raise DataError(f"release train images {b.images.shape} do not match the clean ones {a.images.shape}")
    if not np.array_equal(a.labels, b.labels):
        raise DataError("release train labels differ from the clean labels: not a release of this dataset")


def evaluate(clean: str | Path | Dataset, release: str | Path | Dataset, *, victim: str = "resnet18",
             defense: str | None = None, augment: str = "crop_flip", epochs: int | None = None, seed: int = 0,
             precision: str = "auto", out: str | Path | None = None, progress: bool = False,
             **train_options: Any) -> EvaluationResult:
    """Train ``victim`` from scratch on the clean and on the released training split.

    Both runs share every setting (seed, precision, epochs, augmentation, defense)
    and are tested on the clean test split. ``defense``: counter-measures by name,
    joined with '+' (see ``salm_fast.victims.defenses``). Writes ``evaluation.json``
    and ``learning_curves.png`` into ``out`` when given.
    """
    from .models import MODELS, build_model
    from .victims import choose_precision, parse_defenses, perturbation_metrics, train_victim

    if victim not in MODELS:
        raise ValueError(f"unknown victim {victim!r}; choose one of {', '.join(MODELS)}")
    plan = parse_defenses(defense)  # validates the names before any training
    if out is not None:  # created only once everything is checked
        check_out_dir(Path(out))
        if Path(out).is_dir():
            check_writable(Path(out) / "evaluation.json", overwrite=True)
    clean_ds, release_ds = _as_dataset(clean), _as_dataset(release)
    _check_pair(clean_ds, release_ds)
    test = clean_ds["test"]
    probe = build_model(victim, clean_ds.channels, clean_ds.n_classes, clean_ds.image_shape[0])
    prec, reason = choose_precision(precision, model=probe, num_classes=clean_ds.n_classes,
                                    sample_shape=(32, clean_ds.channels, *clean_ds.image_shape))
    common = dict(epochs=epochs, augment=augment, defense=defense, seed=seed, precision=prec,
                  num_classes=clean_ds.n_classes, **train_options)
    runs = {}
    for name, ds in (("clean", clean_ds), ("release", release_ds)):
        if progress:
            print(f"training {victim} on the {name} data ...", flush=True)
        result = train_victim(victim, ds["train"].images, ds["train"].labels, test.images, test.labels,
                              progress=progress, **common)
        runs[name] = result.to_dict()
    pert = perturbation_metrics(storage_to_nchw(clean_ds["train"].images),
                                storage_to_nchw(release_ds["train"].images))
    res = EvaluationResult(victim, plan.name, runs["clean"], runs["release"], pert, prec,
                           {"seed": seed, "augment": augment, "precision_reason": reason,
                            "machine": machine_info()})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "evaluation.json", res.as_dict())
        from .figures import learning_curves

        learning_curves({"clean": runs["clean"]["history"], "release": runs["release"]["history"]},
                        out / "learning_curves.png", title=f"{victim} ({plan.name})")
    return res

