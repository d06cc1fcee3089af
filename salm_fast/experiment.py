"""Experiment grids: datasets x methods x victims x defenses x seeds, cached and resumable.

One cell = one victim trained from scratch on one release (or on the clean data,
method ``clean``) and tested on the clean test split. Protections are shared by all
cells that use them. Everything lands under ``root``:

    root/releases/<dataset>/<method>-s<seed>/   protect() output (release, summary.json, figure)
    root/cells/<dataset>/<method>-s<seed>/<victim>-<defense>[-e<epochs>].json    one finished cell
    root/results.json, root/results.csv        the tidy table: every finished cell under root

A finished cell or protection is never recomputed; an interrupted grid continues
where it stopped. Every row carries the command that reproduces it.

Method specs: ``clean``, ``salm``, ``salm:k=0.05``, ``salm:k=0.1,noise=pgd``, ``samplewise``, ...
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data import Dataset, atomic_path, atomic_write_json, load_dataset, storage_to_nchw

CLEAN = "clean"
TABLE_FIELDS = [
    "dataset", "method", "method_name", "k", "victim", "defense", "seed", "test_acc", "test_auc",
    "test_balanced_acc", "train_acc", "clean_test_auc_same_victim", "epochs", "precision", "protect_seconds",
    "protect_images_per_s", "victim_seconds", "victim_images_per_s", "linf_255", "l0", "psnr_db", "ssim",
    "command",
]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    if "|" in text:  # a list, e.g. classes=0|2
        return [_value(t) for t in text.split("|")]
    return text


@dataclass(frozen=True)
class MethodSpec:
    """``name[:key=value,...]``; ``clean`` means no protection."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """Option names are checked against the method's here, before any work; values when it is built."""
        from .methods import METHODS, check_options

        name, _, rest = text.strip().partition(":")
        if name != CLEAN and name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {text!r}; choose clean or one of {', '.join(METHODS)}")
        opts = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
                raise ValueError(f"bad option {item!r} in method spec {text!r} (expected key=value)")
            opts.append((key, _value(val)))
        if name == CLEAN:
            if opts:
                raise ValueError("the clean baseline takes no options")
        else:
            check_options(name, (key for key, _ in opts))
            if "seed" in dict(opts):  # the grid's seeds axis sets it
                raise ValueError(f"seed is not a method option in {text!r}; give the grid's seeds instead")
        return cls(name, tuple(sorted(opts)))

    def __str__(self) -> str:
        if not self.options:
            return self.name
        def fmt(v):
            return "|".join(map(str, v)) if isinstance(v, list) else str(v)
        return self.name + ":" + ",".join(f"{k}={fmt(v)}" for k, v in self.options)

    @property
    def tag(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(self).replace(":", "-").replace("=", "")).strip("-")

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def _is_spec(spec: str) -> bool:
    """``synthetic:...``, ``combine:a+b``: a dataset spec, not a path (even if it ends in .npz)."""
    return re.match(r"^[a-z]+:", spec) is not None and not Path(spec).exists()


def canonical_dataset(spec: str) -> str:
    """One name per dataset file: an existing path, made absolute (other specs as they are)."""
    p = Path(spec)
    return str(p.resolve()) if not _is_spec(spec) and ((p.suffix == ".npz" and p.exists()) or p.is_dir()) else spec


def dataset_tag(spec: str) -> str:
    p = Path(spec)
    if not _is_spec(spec) and (p.suffix == ".npz" or p.is_dir()):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", p.stem if p.suffix else p.name)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":")[0]) + "-" + digest


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: MethodSpec
    victim: str
    defense: str
    seed: int


class Grid:
    """A cached, resumable grid of protections and victim trainings."""

    def __init__(self, root: str | Path, datasets: Sequence[str], methods: Sequence[str], victims: Sequence[str],
                 defenses: Sequence[str] = ("none",), seeds: Sequence[int] = (0,), *, epochs: int | None = None,
                 precision: str = "auto", augment: str = "crop_flip", eps: float | None = None):
        from .models import MODELS
        from .victims import parse_defenses

        self.root = Path(root)
        self.datasets = list(datasets)
        self.methods = [MethodSpec.parse(m) for m in methods]
        bad = [v for v in victims if v not in MODELS]
        if bad:
            raise ValueError(f"unknown victims {bad}; choose from {', '.join(MODELS)}")
        self.victims = list(victims)
        self.defenses = [parse_defenses(None if d == "none" else d).name for d in defenses]
        self.seeds = [int(s) for s in seeds]
        self.epochs, self.precision, self.augment, self.eps = epochs, precision, augment, eps
        if not self.datasets or not self.methods or not self.victims:
            raise ValueError("a grid needs at least one dataset, method and victim")
        self._data: dict[str, Dataset] = {}
        self._precision: dict[tuple[str, str], tuple[str, str]] = {}

    # ------------------------------------------------------------------ layout
    def cells(self) -> list[Cell]:
        return [Cell(*c) for c in itertools.product(self.datasets, self.methods, self.victims, self.defenses,
                                                    self.seeds)]

    def release_dir(self, dataset: str, method: MethodSpec, seed: int) -> Path:
        return self.root / "releases" / dataset_tag(dataset) / f"{method.tag}-s{seed}"

    def cell_path(self, cell: Cell) -> Path:
        defense = re.sub(r"[^A-Za-z0-9_.-]+", "-", cell.defense)
        epochs = "" if self.epochs is None else f"-e{self.epochs}"  # a cell at other epochs is another cell
        return (self.root / "cells" / dataset_tag(cell.dataset) / f"{cell.method.tag}-s{cell.seed}"
                / f"{cell.victim}-{defense}{epochs}.json")

    def command(self, cell: Cell) -> str:
        parts = ["salm-fast", "experiment", "--root", str(self.root), "--datasets", cell.dataset,
                 "--methods", str(cell.method), "--victims", cell.victim, "--defenses", cell.defense,
                 "--seeds", str(cell.seed)]
        if self.epochs is not None:
            parts += ["--epochs", str(self.epochs)]
        if self.augment != "crop_flip":
            parts += ["--augment", self.augment]
        return " ".join(shlex.quote(p) for p in parts)

    # ------------------------------------------------------------------ work
    def dataset(self, spec: str) -> Dataset:
        if spec not in self._data:
            self._data[spec] = load_dataset(spec)
        return self._data[spec]

    def protection(self, dataset: str, method: MethodSpec, seed: int, progress: bool) -> tuple[Dataset, dict]:
        """The release for (dataset, method, seed): loaded from the cache or computed once."""
        from .api import protect, release_path_for

        ds = self.dataset(dataset)
        if method.name == CLEAN:
            return ds, {}
        out = self.release_dir(dataset, method, seed)
        summary_path = out / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            return load_dataset(out / summary["files"]["release"]), summary
        options = dict(method.options)
        result = protect(ds, method.name, out=out, eps=options.pop("eps", self.eps), seed=seed, overwrite=True,
                         resume=True, progress=progress, **options)
        assert result.release_path == release_path_for(ds, out)
        return result.release, result.summary

    def precision_for(self, dataset: str, victim: str) -> tuple[str, str]:
        from .models import build_model
        from .victims import choose_precision

        key = (dataset, victim)
        if key not in self._precision:
            ds = self.dataset(dataset)
            probe = build_model(victim, ds.channels, ds.n_classes, ds.image_shape[0])
            self._precision[key] = choose_precision(self.precision, model=probe, num_classes=ds.n_classes,
                                                    sample_shape=(32, ds.channels, *ds.image_shape))
        return self._precision[key]

    def run_cell(self, cell: Cell, progress: bool = False) -> dict:
        from .victims import perturbation_metrics, train_victim

        path = self.cell_path(cell)
        if path.exists():
            return json.loads(path.read_text())
        clean = self.dataset(cell.dataset)
        release, summary = self.protection(cell.dataset, cell.method, cell.seed, progress)
        prec, reason = self.precision_for(cell.dataset, cell.victim)
        test = clean["test"]
        result = train_victim(cell.victim, release["train"].images, release["train"].labels, test.images,
                              test.labels, epochs=self.epochs, augment=self.augment,
                              defense=None if cell.defense == "none" else cell.defense, seed=cell.seed,
                              precision=prec, num_classes=clean.n_classes, progress=progress)
        pert = perturbation_metrics(storage_to_nchw(clean["train"].images), storage_to_nchw(release["train"].images))
        row = {
            "dataset": cell.dataset, "method": str(cell.method), "method_name": cell.method.name,
            "k": cell.method.option("k", (summary.get("options") or {}).get("k")),
            "victim": cell.victim, "defense": cell.defense, "seed": cell.seed,
            "test_acc": result.test["acc"], "test_auc": result.test["auc"],
            "test_balanced_acc": result.test["balanced_acc"],
            "train_acc": (result.train or {}).get("acc"), "epochs": result.settings.get("epochs"),
            "precision": prec, "precision_reason": reason,
            "protect_seconds": summary.get("seconds"), "protect_images_per_s": summary.get("images_per_second"),
            "victim_seconds": result.time_s, "victim_images_per_s": result.images_per_s,
            "linf_255": pert["linf_255"], "l0": pert["l0"], "psnr_db": pert["psnr_db"],
            "ssim": pert["ssim"], "history": result.history, "per_class_test_acc": _per_class(result, test),
            "notes": result.notes, "command": self.command(cell),
            "protect_summary": {k: summary.get(k) for k in ("options", "budget", "protection", "machine")},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, row)
        return row

    def run(self, progress: bool = True, log=print) -> list[dict]:
        cells = self.cells()
        rows = []
        t0 = time.perf_counter()
        for i, cell in enumerate(cells, 1):
            cached = self.cell_path(cell).exists()
            t = time.perf_counter()
            row = self.run_cell(cell, progress=progress and not cached)
            rows.append(row)
            if log:
                state = "cached" if cached else f"{time.perf_counter() - t:.0f} s"
                log(f"[{i}/{len(cells)}] {dataset_tag(cell.dataset)} {cell.method} {cell.victim} {cell.defense} seed {cell.seed}: "
                    f"ACC {row['test_acc']:.3f} AUC {row['test_auc']:.3f} ({state})")
            self.write_table(rows)
        if log:
            log(f"grid done: {len(cells)} cells in {time.perf_counter() - t0:.0f} s; table {self.root / 'results.csv'}")
        return rows

    def finished_rows(self) -> list[dict]:
        """Every finished cell under this root, this grid's and earlier grids' (other datasets,
        victims, epochs...): the root's table grows as grids are added to it."""
        return [json.loads(p.read_text()) for p in sorted((self.root / "cells").glob("*/*/*.json"))]

    def write_table(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        mine = {r["command"] for r in rows}
        rows += [r for r in self.finished_rows() if r.get("command") not in mine]
        self._add_clean_reference(rows)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "results.json", rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TABLE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k)) for k in TABLE_FIELDS})
        with atomic_path(self.root / "results.csv") as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")

    @staticmethod
    def _add_clean_reference(rows: list[dict]) -> None:
        def key(r):
            return canonical_dataset(r["dataset"]), r["victim"], r["defense"], r["seed"], r.get("epochs")

        ref = {key(r): r["test_auc"] for r in rows if r["method_name"] == CLEAN}
        for r in rows:
            r["clean_test_auc_same_victim"] = ref.get(key(r))


def load_results(root: str | Path) -> list[dict]:
    path = Path(root) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results; run `salm-fast experiment --root {root} ...` first")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ helpers
def _per_class(result, test) -> dict[str, float] | None:
    """Clean test accuracy per class (for 'protect selected classes' figures)."""
    from .victims import as_uint8_images, predict_logits

    if result.model is None:
        return None
    logits = predict_logits(result.model, as_uint8_images(test.images))
    pred = logits.argmax(1).numpy()
    y = test.labels[:, 0]
    return {str(c): float((pred[y == c] == c).mean()) for c in np.unique(y)} if len(y) else None


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else v
