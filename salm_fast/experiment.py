"""Experiment grids: datasets x methods x victims x counter-measures x seeds, cached, resumable, shardable.

One cell = one victim trained from scratch on one release (or on the clean data,
method ``clean``) and tested on the owner's clean test split. Protections are shared by
all cells that use them. Everything lands under ``root``:

    root/releases/<dataset>-<digest>/<method>-s<seed>-<key>/   protect() output (release, summary.json, ...)
    root/cells/<dataset>-<digest>/<method>-s<seed>/<victim>-<defense>-e<epochs>-<key>.json   one finished cell
    root/results.json, root/results.csv        the tidy table: every finished cell under root

``<digest>`` is the dataset's content (two files of one name are two datasets); ``<key>``
hashes every setting that changes the result (method spec, eps, seed, device type, victim,
counter-measures, epochs, augmentation, precision, the known-pattern attacker's settings). A finished cell or
protection is never recomputed; an interrupted grid continues where it stopped. Every row
carries the command that reproduces it.

Method specs: ``clean``, ``salm``, ``salm:k=0.05``, ``salm:k=0.1,noise=pgd``, ``samplewise``, ...;
the grid's own option ``splits=`` (``all``, the default, ``train``, ``train|val``) says which splits
the release perturbs. Counter-measures: the victim's (``jpeg-10``, ``mixup``, ``adv-8``, ...) and the
attacker's (``best-val``, ``clean-splits``, ``purify``; see :data:`salm_fast.api.ATTACKER_STEPS`).
Binary tasks report the protection AUC, max(AUC, 1 - AUC), beside the AUC.

Sharding: ``shard=(i, n)`` (CLI ``--shard i/n``) runs the cells whose index modulo ``n`` is ``i``;
without it, the rank and world size of an initialized ``torch.distributed`` group (or the
``RANK`` / ``WORLD_SIZE`` variables ``torchrun`` sets) choose the shard. Every shard writes the
table from all finished cells under the root; a protection another shard is computing is
waited for, not computed twice.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .data import Dataset, OutputInUseError, atomic_path, atomic_write_json, load_dataset, storage_to_nchw
from .data.atomic import json_safe
from .methods import make_method

CLEAN = "clean"
#: Grid-level options of a method spec (not the method's own): which splits the release perturbs.
GRID_OPTIONS = ("splits",)
TABLE_FIELDS = [
    "dataset", "method", "method_name", "k", "victim", "defense", "seed", "test_acc", "test_auc",
    "test_auc_protection", "test_balanced_acc", "train_acc", "clean_test_auc_same_victim", "epochs", "best_epoch",
    "augment", "precision", "protect_seconds", "protect_images_per_s", "victim_seconds", "victim_images_per_s",
    "linf_255", "l0", "psnr_db", "ssim", "notes", "command",
]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):  # true, True
        return text.lower() == "true"
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
            check_options(name, (key for key, _ in opts if key not in GRID_OPTIONS))
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


def parse_epochs(value: int | str | Mapping[str, int] | None) -> int | dict[str, int] | None:
    """Victim epochs: None (each victim's default), one number for every dataset, or per dataset as
    ``"breastmnist=30,pneumoniamnist=15"`` (a mapping of the same); a dataset is named by its file's stem,
    its spec, or a spec's kind (``synthetic``)."""
    def count(v: Any, where: str) -> int:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"epochs{where} must be an integer >= 1, got {v!r}")
        return v

    if value is None or isinstance(value, int):
        return None if value is None else count(value, "")
    if isinstance(value, str):
        if "=" not in value:
            return count(value, "")
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not eq or not name.strip() for name, eq, _ in pairs):
            raise ValueError(f"epochs {value!r}: expected one number or name=number pairs (breastmnist=30,...)")
        value = {name.strip(): n.strip() for name, _, n in pairs}
    if isinstance(value, Mapping) and value:
        return {str(name): count(n, f" of {name}") for name, n in value.items()}
    raise ValueError(f"epochs must be a number, name=number pairs or a mapping, got {value!r}")


def _dataset_names(spec: str) -> set[str]:
    """The names a per-dataset setting may use for ``spec``."""
    p = Path(spec)
    names = {spec, dataset_tag(spec)}
    if _is_spec(spec):
        names.add(spec.split(":")[0])
    elif p.suffix or p.is_dir():
        names.add(p.stem if p.suffix else p.name)
    return names


def resolve_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``(index, count)``: ``"i/n"`` or a pair as given; None: the initialized torch.distributed group's rank
    and world size, else ``RANK`` / ``WORLD_SIZE`` from the environment (torchrun), else ``(0, 1)``."""
    where = "shard"
    if shard is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        shard, where = (rank, world), "RANK / WORLD_SIZE"
    if isinstance(shard, str):
        i, slash, n = shard.partition("/")
        shard = (i, n) if slash else ("", "")
    try:
        i, n = (int(str(v).strip()) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be i/n with integers 0 <= i < n, got {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"{where} must be i/n with integers 0 <= i < n, got {i}/{n}")
    return i, n


def dataset_digest(ds: Dataset) -> str:
    """A digest of a dataset's content (every split's images and labels, its class count)."""
    h = hashlib.sha256(f"{ds.n_classes}".encode())
    for name, split in ds.splits.items():
        h.update(f"|{name}|{split.images.shape}|".encode())
        h.update(np.ascontiguousarray(split.images).tobytes())
        h.update(np.ascontiguousarray(split.labels).tobytes())
    return h.hexdigest()


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: MethodSpec
    victim: str
    defense: str
    seed: int


class Grid:
    """A cached, resumable, shardable grid of protections and victim trainings."""

    #: Seconds between looks at a protection another shard is computing.
    poll_s = 10.0

    def __init__(self, root: str | Path, datasets: Sequence[str], methods: Sequence[str], victims: Sequence[str],
                 defenses: Sequence[str] = ("none",), seeds: Sequence[int] = (0,), *,
                 epochs: int | str | Mapping[str, int] | None = None, precision: str = "auto",
                 augment: str = "crop_flip", eps: float | None = None, shard: str | tuple[int, int] | None = None,
                 purify: Any = None, device: Any = "auto"):
        from .api import PurifySettings, counter_measure_name
        from .models import MODELS
        from .runtime import resolve_device

        self.device = resolve_device(device)  # protections and victims run there; ValueError if it is not here
        self.device_requested = str(device)

        self.root = Path(root)
        self.datasets = list(datasets)
        self.methods = [MethodSpec.parse(m) for m in methods]
        bad = [v for v in victims if v not in MODELS]
        if bad:
            raise ValueError(f"unknown victims {bad}; choose from {', '.join(MODELS)}")
        self.victims = list(victims)
        self.defenses = list(dict.fromkeys(counter_measure_name(d) for d in defenses))
        self.seeds = [int(s) for s in seeds]
        self.precision, self.augment, self.eps = precision, augment, eps
        if not self.datasets or not self.methods or not self.victims:
            raise ValueError("a grid needs at least one dataset, method and victim")
        self.epochs = parse_epochs(epochs)
        if isinstance(self.epochs, dict):
            named = {name for ds in self.datasets for name in _dataset_names(ds)}
            unknown = sorted(set(self.epochs) - named)
            missing = [ds for ds in self.datasets if not _dataset_names(ds) & set(self.epochs)]
            if unknown or missing:
                raise ValueError(f"epochs per dataset: {'no dataset named ' + ', '.join(unknown) if unknown else ''}"
                                 f"{'; ' if unknown and missing else ''}"
                                 f"{'no value for ' + ', '.join(map(dataset_tag, missing)) if missing else ''}")
        self.shard = resolve_shard(shard)
        self.purify = purify if purify is not None else PurifySettings()
        if not isinstance(self.purify, PurifySettings):
            raise TypeError(f"purify must be a PurifySettings or None, got {type(purify).__name__}")
        self._data: dict[str, Dataset] = {}
        self._digest: dict[str, str] = {}
        self._precision: dict[tuple[str, str], tuple[str, str]] = {}

    # ------------------------------------------------------------------ layout
    def cells(self) -> list[Cell]:
        """Every cell of the grid, in a fixed order (seeds vary fastest)."""
        return [Cell(*c) for c in itertools.product(self.datasets, self.methods, self.victims, self.defenses,
                                                    self.seeds)]

    def my_cells(self) -> list[Cell]:
        """The cells of this shard: index modulo the shard count equals the shard index."""
        i, n = self.shard
        return [c for idx, c in enumerate(self.cells()) if idx % n == i]

    def epochs_for(self, dataset: str) -> int | None:
        if not isinstance(self.epochs, dict):
            return self.epochs
        return next(n for name, n in self.epochs.items() if name in _dataset_names(dataset))

    def digest(self, dataset: str) -> str:
        if dataset not in self._digest:
            self._digest[dataset] = dataset_digest(self.dataset(dataset))
        return self._digest[dataset]

    def release_key(self, dataset: str, method: MethodSpec, seed: int) -> dict[str, Any]:
        """Every setting that changes a release."""
        key = {"dataset": self.digest(dataset), "method": str(method), "eps": self.eps, "seed": seed,
               "device": self.device.type}  # CUDA and CPU kernels round differently
        if method.name != CLEAN:
            key["resolved"] = self.resolved(method)
        return key

    def resolved(self, method: MethodSpec) -> dict[str, Any]:
        """The method's every option, defaults included: a changed default is a new release."""
        return resolved_options(method, self.eps)

    def cell_key(self, cell: Cell) -> dict[str, Any]:
        """Every setting that changes a cell's result."""
        key = {**self.release_key(cell.dataset, cell.method, cell.seed), "victim": cell.victim,
               "defense": cell.defense, "epochs": self.epochs_for(cell.dataset), "augment": self.augment,
               "precision": self.precision}
        if "purify" in cell.defense.split("+"):
            key["purify"] = self.purify.as_dict()
        return key

    def _dataset_dir(self, dataset: str) -> str:
        return f"{dataset_tag(dataset)}-{self.digest(dataset)[:8]}"

    def release_dir(self, dataset: str, method: MethodSpec, seed: int) -> Path:
        key = _key_hash(self.release_key(dataset, method, seed))
        return self.root / "releases" / self._dataset_dir(dataset) / f"{method.tag}-s{seed}-{key}"

    def cell_path(self, cell: Cell) -> Path:
        defense = re.sub(r"[^A-Za-z0-9_.-]+", "-", cell.defense)
        epochs = self.epochs_for(cell.dataset)
        name = f"{cell.victim}-{defense}-e{'default' if epochs is None else epochs}-{_key_hash(self.cell_key(cell))}"
        folder = self.root / "cells" / self._dataset_dir(cell.dataset) / f"{cell.method.tag}-s{cell.seed}"
        return folder / f"{name}.json"

    def command(self, cell: Cell) -> str:
        parts = ["salm-fast", "experiment", "--root", str(self.root), "--datasets", cell.dataset,
                 "--methods", str(cell.method), "--victims", cell.victim, "--defenses", cell.defense,
                 "--seeds", str(cell.seed)]
        epochs = self.epochs_for(cell.dataset)
        if epochs is not None:
            parts += ["--epochs", str(epochs)]
        if self.augment != "crop_flip":
            parts += ["--augment", self.augment]
        if self.precision != "auto":
            parts += ["--precision", self.precision]
        if self.device_requested != "auto":
            parts += ["--device", self.device_requested]
        if self.eps is not None:
            parts += ["--eps", f"{self.eps * 255:g}/255"]
        return " ".join(shlex.quote(p) for p in parts)

    # ------------------------------------------------------------------ work
    def dataset(self, spec: str) -> Dataset:
        if spec not in self._data:
            self._data[spec] = load_dataset(spec)
        return self._data[spec]

    def protection(self, dataset: str, method: MethodSpec, seed: int, progress: bool) -> tuple[Dataset, dict]:
        """The release for (dataset, method, seed): loaded from the cache or computed once (another shard
        computing it is waited for)."""
        from .api import protect, release_path_for

        ds = self.dataset(dataset)
        if method.name == CLEAN:
            return ds, {}
        out = self.release_dir(dataset, method, seed)
        summary_path = out / "summary.json"
        options = dict(method.options)
        splits, eps = options.pop("splits", "all"), options.pop("eps", self.eps)
        waiting = False
        while not summary_path.exists():
            try:
                result = protect(ds, method.name, out=out, eps=eps, seed=seed, splits=splits, overwrite=True,
                                 resume=True, progress=progress, device=self.device, audit=False,
                                 **options)  # the grid's cells are the full evaluation
            except OutputInUseError:  # another shard is computing this release: wait for it
                if not waiting and progress:
                    print(f"waiting for another shard to finish {out}", flush=True)
                waiting = True
                time.sleep(self.poll_s)
                continue
            assert result.release_path == release_path_for(ds, out)
            return result.release, result.summary
        summary = json.loads(summary_path.read_text())
        return load_dataset(out / summary["files"]["release"]), summary

    def precision_for(self, dataset: str, victim: str) -> tuple[str, str]:
        from .models import build_model
        from .victims import choose_precision

        key = (dataset, victim)
        if key not in self._precision:
            ds = self.dataset(dataset)
            probe = build_model(victim, ds.channels, ds.n_classes, ds.image_shape[0])
            self._precision[key] = choose_precision(self.precision, self.device, model=probe,
                                                    num_classes=ds.n_classes,
                                                    sample_shape=(32, ds.channels, *ds.image_shape))
        return self._precision[key]

    def run_cell(self, cell: Cell, progress: bool = False) -> dict:
        from .api import attacker_data, split_counter_measures
        from .victims import perturbation_metrics, protection_auc, train_victim

        path = self.cell_path(cell)
        if path.exists():
            return json.loads(path.read_text())
        clean = self.dataset(cell.dataset)
        release, summary = self.protection(cell.dataset, cell.method, cell.seed, progress)
        prec, reason = self.precision_for(cell.dataset, cell.victim)
        steps, victim_defense = split_counter_measures(cell.defense)
        data = attacker_data(clean, release, steps, seed=cell.seed, purify=self.purify)
        test = clean["test"]
        result = train_victim(cell.victim, data.train_x, data.train_y, test.images, test.labels,
                              epochs=self.epochs_for(cell.dataset), augment=self.augment, defense=victim_defense,
                              seed=cell.seed, precision=prec, num_classes=clean.n_classes, progress=progress,
                              device=self.device, **data.victim_options())
        pert = perturbation_metrics(storage_to_nchw(clean["train"].images), storage_to_nchw(release["train"].images))
        row = {
            "dataset": cell.dataset, "dataset_digest": self.digest(cell.dataset), "method": str(cell.method),
            "method_name": cell.method.name, "k": cell.method.option("k", (summary.get("options") or {}).get("k")),
            "victim": cell.victim, "defense": cell.defense, "seed": cell.seed,
            "test_acc": result.test["acc"], "test_auc": result.test["auc"],
            "test_auc_protection": protection_auc(result.test["auc"], clean.n_classes),
            "test_balanced_acc": result.test["balanced_acc"],
            "train_acc": (result.train or {}).get("acc"), "epochs": result.settings.get("epochs"),
            "best_epoch": result.best_epoch, "augment": self.augment, "trained_on": data.splits,
            "precision": prec, "precision_requested": self.precision, "precision_reason": reason,
            "protect_seconds": summary.get("seconds"), "protect_images_per_s": summary.get("images_per_second"),
            "released_splits": summary.get("splits"),
            "victim_seconds": result.time_s, "victim_images_per_s": result.images_per_s,
            "linf_255": pert["linf_255"], "l0": pert["l0"], "psnr_db": pert["psnr_db"],
            "ssim": pert["ssim"], "history": result.history, "per_class_test_acc": _per_class(result, test),
            "notes": [*data.notes, *result.notes], "command": self.command(cell), "key": self.cell_key(cell),
            "protect_summary": {k: summary.get(k) for k in ("options", "budget", "protection", "machine")},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, row)
        return row

    def run(self, progress: bool = True, log=print) -> list[dict]:
        """Run this shard's cells (finished ones are read back); the table is rewritten after each."""
        cells = self.my_cells()
        rows = []
        t0 = time.perf_counter()
        shard = "" if self.shard == (0, 1) else f" (shard {self.shard[0]}/{self.shard[1]})"
        for i, cell in enumerate(cells, 1):
            cached = self.cell_path(cell).exists()
            t = time.perf_counter()
            row = self.run_cell(cell, progress=progress and not cached)
            rows.append(row)
            if log:
                state = "cached" if cached else f"{time.perf_counter() - t:.0f} s"
                log(f"[{i}/{len(cells)}]{shard} {dataset_tag(cell.dataset)} {cell.method} {cell.victim} {cell.defense} "
                    f"seed {cell.seed}: ACC {row['test_acc']:.3f} AUC {row['test_auc']:.3f} "
                    f"protection AUC {row['test_auc_protection']:.3f} ({state})")
            self.write_table(rows)
        if log:
            log(f"grid done{shard}: {len(cells)} cells in {time.perf_counter() - t0:.0f} s; "
                f"table {self.root / 'results.csv'}")
        return rows

    def finished_rows(self) -> list[dict]:
        """Every finished cell under this root, this grid's and earlier grids' (other datasets,
        victims, epochs, other shards...): the root's table grows as grids are added to it."""
        return [json.loads(p.read_text()) for p in sorted((self.root / "cells").glob("*/*/*.json"))]

    def write_table(self, rows: Iterable[dict]) -> None:
        """``results.json`` and ``results.csv`` from ``rows`` and every other finished cell under the root."""
        def ident(r: dict) -> str:
            return json.dumps(r["key"], sort_keys=True, default=str) if r.get("key") else r.get("command", "")

        rows = list(rows)
        mine = {ident(r) for r in rows}
        rows += [r for r in self.finished_rows() if ident(r) not in mine]
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
            return (r.get("dataset_digest") or canonical_dataset(r["dataset"]), r["victim"], r["defense"], r["seed"],
                    r.get("epochs"), r.get("augment", "crop_flip"))

        ref = {key(r): r["test_auc"] for r in rows if r["method_name"] == CLEAN}
        for r in rows:
            r["clean_test_auc_same_victim"] = ref.get(key(r))


def resolved_options(method: MethodSpec, eps: float | str | None) -> dict[str, Any]:
    """Every option of ``method`` as this code resolves it (defaults included; grid eps ``eps``
    unless the spec sets one), in the form a release key stores."""
    options = dict(method.options)
    options.pop("splits", None)
    eps = options.pop("eps", eps)
    resolved = make_method(method.name, eps=eps, **options).options()
    resolved.pop("seed", None)
    return json.loads(json.dumps(json_safe(resolved), sort_keys=True, default=str))


#: Options of a release key's ``loop`` that a method spec can set: a former default of these is
#: written back into the spec (``loop.min_rounds`` 1 -> ``salm:min_rounds=1``).
_LOOP_SPEC_OPTIONS = {"min_rounds": "min_rounds", "max_rounds": "rounds"}


def _respec(spec: MethodSpec, stored: dict, eps) -> MethodSpec | None:
    """The spec that this code resolves to ``stored`` (``spec`` with the options whose default changed
    since written out), or None when no spec does."""
    try:
        now = resolved_options(spec, eps)
    except (ValueError, TypeError):
        return None
    opts = dict(spec.options)
    for key in set(now) | set(stored):
        if now.get(key) == stored.get(key):
            continue
        if key == "loop" and isinstance(stored.get(key), dict) and isinstance(now.get(key), dict):
            for sub in set(now[key]) | set(stored[key]):
                if now[key].get(sub) != stored[key].get(sub):
                    if sub not in _LOOP_SPEC_OPTIONS or sub not in stored[key]:
                        return None
                    opts[_LOOP_SPEC_OPTIONS[sub]] = stored[key][sub]
        elif key in stored and not isinstance(stored[key], (dict, list)):
            opts[key] = stored[key]
        else:
            return None
    candidate = MethodSpec(spec.name, tuple(sorted(opts.items())))
    try:
        return candidate if resolved_options(candidate, eps) == stored else None
    except (ValueError, TypeError):
        return None


def split_stale(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(current, stale)``: a row is stale when its release was made under options that this code
    no longer resolves its method spec to (a default changed since; an option removed). A stale row
    keeps its spec's name but measured another release, so tables must not pool it with new ones:
    where a spec reproduces its options today (the changed defaults written out, e.g. ``salm`` made
    under a former ``min_rounds`` of 1 -> ``salm:min_rounds=1``) it is kept under that spec (its
    ``respec_from`` names the spec it ran as), else it is stale."""
    current, stale, cache = [], [], {}
    for r in rows:
        key = r.get("key") or {}
        if r.get("method_name") == CLEAN or "resolved" not in key:
            current.append(r)
            continue
        stored = json.loads(json.dumps(key["resolved"], sort_keys=True, default=str))
        memo = (str(r["method"]), json.dumps(key.get("eps")), json.dumps(stored, sort_keys=True))
        if memo not in cache:
            try:
                spec = MethodSpec.parse(r["method"])
                same = resolved_options(spec, key.get("eps")) == stored
                cache[memo] = spec if same else _respec(spec, stored, key.get("eps"))
            except (ValueError, TypeError):
                cache[memo] = None
        spec = cache[memo]
        if spec is None:
            stale.append(r)
        elif str(spec) == str(r["method"]):
            current.append(r)
        else:
            current.append({**r, "method": str(spec), "respec_from": r["method"]})
    return current, stale


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
    if isinstance(v, list):
        return "; ".join(map(str, v))
    return "" if v is None else v
