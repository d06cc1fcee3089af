"""Protecting images that arrive later: the protector file and :func:`apply`.

A release protects the images it was made from. Images that arrive later (a new month of scans)
need the same protection, without retraining: ``protect(..., save_protector="P.pt")``
(``salm-fast protect ... --save-protector P.pt``) stores what protects new images, and
``apply("P.pt", new_data, out=DIR)`` (``salm-fast apply``) perturbs them with it and publishes
a release folder laid out as ``protect``'s (the release in the input's format, ``summary.json``,
``protection.png``), which ``evaluate`` and ``audit`` read alike.

The protector file is the owner's key, like the checkpoint: whoever holds it can compute the
perturbation of any image. It is never written inside the release folder, and holds no seed,
no optimizer state, no image. Its content (``torch.load(path, weights_only=True)`` reads it:
dicts, lists, strings, numbers, booleans and tensors only, nothing pickled)::

    format        "salm-fast protector"          version     1 (this module reads only its own)
    salm_fast     the version that wrote it      method      the method's name
    options       its options (no seed)          eps, k      the budget (k: None for unmasked methods)
    k_pixels      K in pixels for these images   norm        {"mean", "std"}: the models' input scaling
    shape         [C, H, W] of the images        n_classes   and class_names (None when unknown)
    fit           {"splits", "images", "fingerprint"}: what the method was fit on; the fingerprint
                  is the sha256 (hex) of each fit split in order, its uint8 images in storage layout
                  (C order) then its labels as little-endian int64
    state         the method's own state (``Method.protector_state()``: tensors and primitives)

A method can save one when it defines ``protector_state()`` and the classmethod
``from_protector_state(state)`` (whose ``perturb(x, y)`` returns the perturbation of new images)
and, where it has the attribute, ``can_save_protector`` is true: the generator methods. Per-image
noise (sample-wise, class-wise PGD, SALM's ``noise=pgd``, random, ...) has nothing that carries over
to new images, and ``protect`` refuses ``save_protector`` with it before any work.
"""
from __future__ import annotations

import glob
import hashlib
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, ops
from .data import Dataset, UnwritableOutputError, atomic_write_json, make_staging_dir, output_lock, publish_dir
from .data import save_medmnist, write_folder_release
from .data.atomic import atomic_path, check_writable, json_safe
from .data.view import ImageView
from .methods import METHODS, Method, Protection
from .release import budget_levels, parse_eps
from .runtime import NORM_MEAN, NORM_STD, describe_device, resolve_device

__all__ = ["FORMAT", "VERSION", "ApplyResult", "Protector", "apply", "check_can_save", "check_protector_path",
           "fingerprint", "load_protector", "protector_payload", "save_protector", "staged_protector"]

FORMAT = "salm-fast protector"
VERSION = 1
#: Every key of a version-1 protector file.
KEYS = ("format", "version", "salm_fast", "method", "options", "eps", "k", "k_pixels", "norm", "shape", "n_classes",
        "class_names", "fit", "state")


# ------------------------------------------------------------------------------ which methods, where
def cannot_save(method: Method) -> str | None:
    """Why ``method`` cannot save a protector, or None when it can."""
    cls = type(method)
    if not (callable(getattr(method, "protector_state", None))
            and callable(getattr(cls, "from_protector_state", None))):
        return (f"method {method.name} cannot save a protector: its perturbation is computed per image (or per "
                "class) of the data it protects, with nothing that carries over to new images; use a generator "
                "method (salm, generator)")
    if getattr(method, "noise_kind", "generator") != "generator":  # SALM's noise=pgd: one perturbation per image
        return (f"method {method.name} with noise={method.noise_kind} cannot save a protector: its noise is optimized "
                "per image; use noise=generator")
    if not getattr(method, "can_save_protector", True):
        return f"method {method.name} with these options cannot save a protector"
    return None


def check_can_save(method: Method) -> None:
    """ValueError (one line) if ``method`` cannot save a protector: called before any work."""
    reason = cannot_save(method)
    if reason is not None:
        raise ValueError(f"--save-protector: {reason}")


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or p.is_relative_to(f)


def check_protector_path(path: str | Path, out: str | Path, workdir: str | Path | None = None, *,
                         overwrite: bool = False) -> Path:
    """Where ``protect`` may save the protector: a file outside the release folder ``out`` (which is
    published: the protector is the key to the protection) and outside the work folder (emptied after
    the run), in a writable folder; an existing file only with ``overwrite``. Returns it as a Path."""
    path = Path(path)
    if _inside(path, Path(out)):
        raise ValueError(f"save_protector {path} lies inside the output folder {out}, which is published; the "
                         "protector is the key to the protection: keep it outside (e.g. beside the folder)")
    if workdir is not None and _inside(path, Path(workdir)):
        raise ValueError(f"save_protector {path} lies inside the work folder {workdir}, which is cleaned after the "
                         "run; keep it elsewhere")
    if path.exists() and not path.is_file():
        raise UnwritableOutputError(f"{path}: exists and is not a file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: a protector (or another file) is there already; pass overwrite=True "
                              "(--overwrite) to replace it, or choose another path")
    return check_writable(path, overwrite=True)


# ------------------------------------------------------------------------------ writing
def fingerprint(ds: Dataset, splits: Sequence[str]) -> str:
    """sha256 (hex) of the ``splits`` of ``ds`` in order: each split's uint8 images in storage layout
    (C order), then its labels as little-endian int64 (read in chunks: a memory-mapped file stays one)."""
    h = hashlib.sha256()
    for s in splits:
        images = ds[s].images
        step = max(1, (16 << 20) // max(1, int(np.prod(images.shape[1:]))))
        for a in range(0, len(images), step):
            h.update(np.ascontiguousarray(images[a:a + step]).tobytes())
        h.update(np.ascontiguousarray(ds[s].labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as plain dicts (str keys), lists, primitives and CPU tensors; RuntimeError (a bug in the
    method) on anything else: the file must load with ``weights_only=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise RuntimeError(f"protector state {where}: key {bad[0]!r} is not a string (a bug)")
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RuntimeError(f"protector state {where}: a {type(obj).__name__} is not a tensor or a primitive (a bug)")


def _without_seed(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_seed(v) for k, v in obj.items() if k != "seed"}
    if isinstance(obj, list):
        return [_without_seed(v) for v in obj]
    return obj


def protector_payload(method: Method, ds: Dataset, splits: Sequence[str]) -> dict[str, Any]:
    """The protector of ``method``, fit on the ``splits`` of ``ds``: the file's content (module doc)."""
    check_can_save(method)
    try:
        state = method.protector_state()
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--save-protector: {method.name}: {exc}") from None
    h, w = ds.image_shape
    return {
        "format": FORMAT, "version": VERSION, "salm_fast": __version__,
        "method": method.name,
        "options": _without_seed(json_safe(method.options())),
        "eps": float(method.eps),
        "k": method.k if method.masked else None,
        "k_pixels": ops.resolve_k(method.k, h * w) if method.masked else None,
        "norm": {"mean": float(NORM_MEAN), "std": float(NORM_STD)},
        "shape": [int(ds.channels), int(h), int(w)],
        "n_classes": int(ds.n_classes),
        "class_names": None if ds.label_names is None else [str(n) for n in ds.label_names],
        "fit": {"splits": list(splits), "images": int(sum(len(ds[s]) for s in splits)),
                "fingerprint": fingerprint(ds, splits)},
        "state": _plain(state, "state"),
    }


def _dump(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` the payload to ``path``, then read it back as ``load_protector`` will (weights only)."""
    torch.save(payload, path)
    _parse(torch.load(path, map_location="cpu", weights_only=True), path)


@contextmanager
def staged_protector(path: str | Path, method: Method, ds: Dataset, splits: Sequence[str], *,
                     overwrite: bool = False) -> Iterator[Path]:
    """Make the protector and write it beside ``path`` (checked to load), then run the block; it is
    renamed onto ``path`` when the block succeeds and removed when it fails."""
    payload = protector_payload(method, ds, splits)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.chmod(0o600)  # the owner's key; atomic_path gives the final file the usual mode: set it below
        _dump(payload, tmp)
        yield tmp
    Path(path).chmod(0o600)


def save_protector(path: str | Path, method: Method, ds: Dataset, splits: Sequence[str] = ("train",), *,
                   overwrite: bool = False) -> Path:
    """Write the protector of ``method`` (fit on the ``splits`` of ``ds``) to ``path`` atomically (mode
    0600); an existing file only with ``overwrite``. ``protect(save_protector=)`` does this for you."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    with staged_protector(path, method, ds, splits, overwrite=overwrite):
        pass
    return path


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Protector:
    """A protector file, read and checked (:func:`load_protector`); :meth:`build` makes its method."""

    method: str
    options: dict[str, Any]
    eps: float
    k: int | float | None
    k_pixels: int | None
    shape: tuple[int, int, int]  # C, H, W
    n_classes: int
    class_names: tuple[str, ...] | None
    fit: dict[str, Any]
    state: dict[str, Any] = field(repr=False)
    salm_fast: str = ""
    source: str = ""  # the file's name (no directories)

    def build(self) -> Method:
        """The method object whose ``perturb(x, y)`` protects new images; ValueError if the state does not load."""
        cls = METHODS[self.method]
        try:
            method = cls.from_protector_state(self.state)
        except (KeyError, TypeError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise ValueError(f"{self.source}: the {self.method} state does not load ({reason})") from None
        if abs(float(method.eps) - self.eps) > 1e-12 or (method.masked and method.k != self.k):
            raise ValueError(f"{self.source}: the method state's budget (eps {method.eps}, k {method.k}) is not the "
                             f"file's (eps {self.eps}, k {self.k})")
        return method


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _parse(obj: Any, path: Path) -> Protector:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise _fail(path, "not a salm-fast protector (no 'format': 'salm-fast protector' entry)")
    version = obj.get("version")
    if version != VERSION:
        raise _fail(path, f"protector format version {version!r}; this salm-fast ({__version__}) reads version "
                          f"{VERSION}: make it again with this version's protect --save-protector")
    missing = [key for key in KEYS if key not in obj]
    if missing:
        raise _fail(path, f"not a complete protector: missing {', '.join(map(repr, missing))}")
    method = obj["method"]
    if method not in METHODS:
        raise _fail(path, f"unknown method {method!r}")
    try:
        eps = parse_eps(obj["eps"])
    except ValueError as exc:
        raise _fail(path, f"bad eps: {exc}") from None
    shape = obj["shape"]
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                        or v < 1 for v in shape)
            or shape[0] not in (1, 3)):
        raise _fail(path, f"bad shape {shape!r}: expected [C, H, W] with C 1 or 3")
    n_classes = obj["n_classes"]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise _fail(path, f"bad n_classes {n_classes!r}")
    names = obj["class_names"]
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != n_classes
                              or not all(isinstance(n, str) for n in names)):
        raise _fail(path, f"bad class_names: expected {n_classes} strings or None")
    norm = obj["norm"]
    if not isinstance(norm, dict) or norm.get("mean") != float(NORM_MEAN) or norm.get("std") != float(NORM_STD):
        raise _fail(path, f"made for the input scaling {norm!r}; this salm-fast scales by mean {NORM_MEAN}, std "
                          f"{NORM_STD}: its models would see other inputs")
    fit, state, options = obj["fit"], obj["state"], obj["options"]
    if not isinstance(fit, dict) or not isinstance(fit.get("fingerprint"), str):
        raise _fail(path, "bad 'fit' entry (no fingerprint)")
    if not isinstance(state, dict) or not isinstance(options, dict):
        raise _fail(path, "bad 'state' or 'options' entry (not a dict)")
    return Protector(method, options, eps, obj["k"], obj["k_pixels"], (shape[0], shape[1], shape[2]), n_classes,
                     None if names is None else tuple(names), fit, state, str(obj["salm_fast"]), path.name)


def load_protector(path: str | Path) -> Protector:
    """Read a protector file (``weights_only``: nothing is unpickled) and check it; ValueError (one line)
    on a file that is not one, a format version this code does not read, or a missing entry."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such protector file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the answer is the same
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise _fail(path, f"not a salm-fast protector (it does not load as one: {type(exc).__name__}"
                          f"{': ' + first if first else ''})") from None
    return _parse(obj, path)


# ------------------------------------------------------------------------------ apply
@dataclass
class ApplyResult:
    """What :func:`apply` published; ``summary`` is also ``summary.json`` beside the release."""

    release: Dataset
    release_path: Path
    summary: dict[str, Any]

    def table(self) -> str:
        from .api import summary_table

        s = self.summary
        return summary_table(s, [("method", f"{s['method']} (protector fit on {s['protector']['fit_images']} images)")],
                             [], self.release_path)


def _check_data(prot: Protector, ds: Dataset, splits: Sequence[str]) -> None:
    """The data must be what the protector was made for: channels, H x W, labels among its classes."""
    c, h, w = prot.shape
    if (ds.channels, *ds.image_shape) != (c, h, w):
        dc, (dh, dw) = ds.channels, ds.image_shape
        raise ValueError(f"the images are {dc} x {dh} x {dw} (C x H x W) but the protector was made for {c} x {h} x "
                         f"{w}" + ("; --resize HxW reads an image folder at another size" if dc == c else ""))
    for s in splits:
        top = int(ds[s].labels.max())
        if top >= prot.n_classes:
            raise ValueError(f"{s} label {top} is not a class of the protector (it knows {prot.n_classes} classes, "
                             f"0..{prot.n_classes - 1})")
    if prot.class_names is not None and ds.label_names is not None and tuple(ds.label_names) != prot.class_names:
        raise ValueError(f"the data's class names {list(ds.label_names)} are not the protector's "
                         f"{list(prot.class_names)}: a label would mean another class")


def apply(protector: str | Path | Protector, data: str | Path | Dataset, *, out: str | Path,
          splits: str | Sequence[str] = "all", overwrite: bool = False, progress: bool = False, figure: bool = True,
          device: str | torch.device | None = "auto", resize: tuple[int, int] | str | None = None) -> ApplyResult:
    """Protect ``data`` with a saved protector and publish the release folder ``out`` (as ``protect`` does).

    ``protector``: a file written by ``protect(save_protector=)`` (or a loaded :class:`Protector`).
    ``data``: anything ``protect`` reads (an ``.npz``, an image folder with ``labels.csv``, a
    ``synthetic:...`` spec, a Dataset) with the protector's channels and H x W and labels among its
    classes; ``splits``: which to perturb (``all`` by default, as ``protect``). Each batch is perturbed
    by the method's ``perturb`` (on ``device``), quantized onto the stored grid as a ``protect`` release
    is, and the budget (L-inf, L0 <= K) is verified on the stored bytes before anything is published.
    ``out``: absent, empty, or (``overwrite``) a previous salm-fast output, replaced whole, in one rename;
    it holds the release (the input's format and name), ``summary.json`` (no seed, no directories) and
    ``protection.png``. Bad input: a one-line ValueError, nothing written.
    """
    from .api import (FIGURE, STAGING, SUMMARY, ProtectPlan, _as_dataset, _draw, _merge_budget, _quality, _release,
                      _resolve_splits, check_output, machine_info, release_path_for, work_folder_for)

    out = Path(out)
    prot = protector if isinstance(protector, Protector) else load_protector(protector)
    if not isinstance(protector, Protector) and _inside(Path(protector), out):
        raise ValueError(f"the protector {protector} lies inside the output folder {out}, which is published (and "
                         "replaced whole): keep the protector outside it")
    method = prot.build()
    dev = resolve_device(device)
    ds = _as_dataset(data, resize)
    chosen = _resolve_splits(ds, splits)
    _check_data(prot, ds, chosen)
    method.check_data(ds.image_shape, prot.n_classes)
    # The same plan as a protect release of these splits (its release name, budget and figure code); no work folder.
    job = ProtectPlan(method, ds, tuple(chosen), out, work_folder_for(out), release_path_for(ds, out).name,
                      figure=bool(figure), progress=bool(progress), overwrite=bool(overwrite), audit=False, device=dev)
    check_output(out, job.overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        check_output(out, job.overwrite)  # again under the lock: another run may have published meanwhile
        for stale in out.parent.glob(f".{glob.escape(out.name)}.{STAGING}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's: only a run holding this lock stages here
        fitted = _perturb(job, prot)
        released, per_split = _release(job, fitted)  # the budget on the stored bytes, verified (RuntimeError)
        summary = {
            "command": "apply",
            "method": method.name, "paper": method.paper, "norm": method.norm,
            "options": prot.options,  # as saved: without the seed
            "protector": {"format_version": VERSION, "made_by": prot.salm_fast, "fit_splits": prot.fit.get("splits"),
                          "fit_images": prot.fit.get("images"), "fit_fingerprint": prot.fit.get("fingerprint")},
            "dataset": {"name": ds.name, "source": Path(ds.source).name if ds.source else "",  # no directories
                        "n_classes": ds.n_classes, "channels": ds.channels, "image_shape": list(ds.image_shape),
                        "splits": {s: len(ds[s]) for s in ds.splits}},
            "splits": list(chosen),
            "images": fitted.n_images,
            "eps": method.eps,
            "budget_levels": budget_levels(method.eps),
            "budget": _merge_budget(per_split),
            "budget_per_split": per_split,
            "quality": _quality(job, fitted),
            "seconds": fitted.seconds,
            "images_per_second": fitted.n_images / fitted.seconds if fitted.seconds > 0 else 0.0,
            "device": describe_device(dev),
            "threads": torch.get_num_threads(),
            "machine": machine_info(),
            "files": {"release": job.release_name, "figure": FIGURE if job.figure else None, "round_log": None},
        }
        staging = make_staging_dir(out, STAGING)
        try:
            if job.release_name.endswith(".npz"):
                save_medmnist(released, staging / job.release_name)
            else:  # an image folder: PNGs, or 16-bit / DICOM files at their own depth
                def deltas() -> dict[str, torch.Tensor]:
                    return dict(zip(job.splits, fitted.protection.delta.split(fitted.counts)))

                summary.update(write_folder_release(ds, released, staging / job.release_name, deltas, method.eps,
                                                    k=prot.k_pixels))
            if job.figure:
                _draw(job, fitted, released, staging / FIGURE)
            atomic_write_json(staging / SUMMARY, summary)
            publish_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ApplyResult(released, job.release_path, summary)


def _perturb(job, prot: Protector):
    """The release bytes of the job's splits, perturbed batch by batch with the protector's method: a
    streamed :class:`Protection` (each batch checked against the float budget) quantized by the same
    code as ``protect``'s (:func:`salm_fast.api.release_arrays`)."""
    from .api import Fitted, release_arrays

    ds, method = job.data, job.method
    counts = [len(ds[s]) for s in job.splits]
    images = ImageView([ds[s].images for s in job.splits], job.device)
    labels = torch.cat([torch.from_numpy(np.array(ds[s].labels[:, 0])) for s in job.splits]).long().to(job.device)
    n, _, h, w = images.shape
    mask = torch.zeros((n, 1, h, w), dtype=torch.uint8)  # the pixels changed (the figure's mask column)
    bar = None
    if job.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"apply {method.name}", unit="img")  # on stderr

    def delta_of(idx: torch.Tensor) -> torch.Tensor:
        x = images[idx]
        d = method.perturb(x, labels[idx.to(labels.device)])
        if not isinstance(d, torch.Tensor) or d.shape != x.shape:
            raise RuntimeError(f"{method.name}: perturb returned a malformed perturbation (a bug)")
        mask[idx] = (d != 0).any(dim=1, keepdim=True).to(torch.uint8).cpu()
        if bar is not None:
            bar.update(len(idx))
        return d

    protection = Protection(None, mask, {}, delta_of=delta_of, images=images, check=method._check_batch)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            release = release_arrays(ds, job.splits, images, protection, method.eps)
    finally:
        if bar is not None:
            bar.close()
            bar = None
    return Fitted(protection, release, counts, time.perf_counter() - t0)
