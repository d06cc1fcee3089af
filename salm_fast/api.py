"""The Python API: ``protect`` a dataset, ``evaluate`` what a victim learns from the release.

>>> import salm_fast
>>> result = salm_fast.protect("synthetic", method="salm", out="out/demo")  # doctest: +SKIP
>>> report = salm_fast.evaluate("synthetic", result.release_path, victim="cnn")   # doctest: +SKIP
>>> print(report.table())                                                          # doctest: +SKIP

``k=None`` (as here) is the method's default, :attr:`Method.default_k` (SALM:
:attr:`salm_fast.methods.SALM.default_k` of the pixels); the table and the summary give the K used.

``protect`` is three steps: :func:`plan` checks everything up front (method and its options,
eps, k, splits, backend, precision, the data, the output and work folders) and writes nothing;
:func:`fit` computes the perturbation; :func:`write` puts it on the stored bytes, verifies the
budget there and publishes the output folder ``out`` whole, in one rename::

    out/breastmnist.npz   the release in the input's format (an image folder input: out/images/)
    out/summary.json      method, options, budget on the stored bytes, quality, precision, time
    out/protection.png    clean | protected | amplified |delta| | mask
    out/rounds.jsonl      the bi-level round log (losses, accuracy, time; no noise)

Only the release is meant to be shared: it holds the perturbed images (every split by default;
a split left unperturbed would be a clean copy), no noise and no seed (nor does the summary).
The seed is secret by default (drawn from the OS, ``seed=None``); it lives only in the checkpoint.
The checkpoint (it holds the noise) and the live round log are written to a private work
folder that is never inside ``out`` (default ``<parent>/.<name>.salm-work``, mode 0700;
``workdir=`` chooses another); ``resume=True`` continues from it to the same bytes, and it
is deleted once the output is published unless ``keep_checkpoint=True``. An exclusive lock
beside ``out`` makes a second run into the same output refuse at once.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import platform
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, ops
from . import distributed as D
from .data import (
    SPLITS,
    DataError,
    Dataset,
    UnwritableOutputError,
    atomic_write_json,
    check_writable,
    load_dataset,
    make_staging_dir,
    medmnist_filename,
    nchw_to_storage,
    output_lock,
    publish_dir,
    save_medmnist,
    storage_to_nchw,
    write_folder_release,
)
from .data.atomic import check_writable_dir
from .data.view import ImageView
from .bilevel import BiLevelConfig
from .methods import BiLevelMethod, Method, Protection, check_options, make_method
from .release import budget_levels, measure_budget, quantize_release
from .runtime import choose_threads, describe_device, resolve_device

SUMMARY = "summary.json"
FIGURE = "protection.png"
ROUND_LOG = "rounds.jsonl"
CHECKPOINT = "checkpoint.pt"
STAGING = "salm-staging"  # <parent>/.<name>.salm-staging-XXXX: the output being built
PRECISIONS = ("auto", "fp32", "bf16")


# ------------------------------------------------------------------------------ helpers
def _as_dataset(data: str | Path | Dataset, resize: tuple[int, int] | str | None = None) -> Dataset:
    if isinstance(data, Dataset):
        if resize is not None:
            raise ValueError("resize applies when reading an image folder, not to a Dataset object")
        return data
    return load_dataset(data, resize=resize)


def _resolve_splits(ds: Dataset, splits: str | Sequence[str]) -> list[str]:
    if splits == "all":
        return [s for s in SPLITS if s in ds.splits]
    names = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in names if s not in ds.splits]
    if bad or not names:
        raise ValueError(f"splits {bad or names} not in the dataset (it has {', '.join(ds.splits)}); "
                         "use 'train', a list, or 'all'")
    return names


def _check_count(name: str, value: object, minimum: int) -> int:
    """An integer option (seed, epochs): 1.5, True or '3' is refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def describe_k(k: int | float, hw: int) -> str:
    """K in words for images of ``hw`` pixels: '20% of the pixels (157 of 784)' for a fraction, '80 of 784
    pixels' for a count (the pixel count as :func:`salm_fast.ops.resolve_k` gives it)."""
    pixels = ops.resolve_k(k, hw)
    if isinstance(k, float):
        return f"{100 * k:g}% of the pixels ({pixels} of {hw})"
    return f"{pixels} of {hw} pixels"


def summary_table(s: dict[str, Any], head: list[tuple[str, str]], extra: list[tuple[str, str]],
                  release_path: Path) -> str:
    """The table protect and apply print: ``head`` rows, the splits, the budget on the stored bytes,
    quality, ``extra`` rows, time and the release file."""
    b = s["budget"]
    k = s["options"].get("k")
    rows = [*head, ("perturbed splits", ", ".join(s["splits"])), ("images", str(s["images"])),
            ("L-inf (stored bytes)", f"{b['linf_levels']}/255 (budget {s['budget_levels']}/255)"),
            *([("K (L0 budget)", describe_k(k, math.prod(s["dataset"]["image_shape"][:2])))] if k is not None else []),
            ("L0 (pixels changed)", f"{b['l0_fraction']:.3f} of pixels, <= {b['l0_max_per_image']} per image"),
            *([("L2 (stored bytes)", f"{b['l2_max']:.3f} per image (max)" + (
                f", budget {b['l2_budget']:.3f}" if b.get("l2_budget") is not None else ""))]
              if "l2_max" in b else []),
            ("PSNR / SSIM", f"{s['quality']['psnr_db']:.1f} dB / {s['quality']['ssim']:.4f}"),
            *extra,
            ("time", f"{s['seconds']:.1f} s ({s['images_per_second']:.0f} images/s)"),
            ("release", str(release_path))]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def describe_eps(eps: float) -> str:
    """'8/255' for a whole number of 8-bit levels, else the fraction ('0.0314')."""
    levels = budget_levels(eps)
    return f"{levels}/255" if abs(levels / 255 - eps) < 1e-9 else f"{eps:.4g}"


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


def check_output(out: Path, replace: bool) -> None:
    """``out`` may be absent, empty, or (``replace``: overwrite, or a resumed run) a previous salm-fast
    output (it has a summary.json); it is published by a rename in its parent. Anything else is
    refused up front: the publishing rename would delete files that are not ours."""
    if out.is_symlink():
        raise UnwritableOutputError(f"{out}: is a symbolic link; give the folder it points to")
    if not out.exists():
        check_out_dir(out)
        return
    if not out.is_dir():
        raise UnwritableOutputError(f"{out}: exists and is not a directory")
    check_writable_dir(out.parent, out)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not (out / SUMMARY).is_file():
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UnwritableOutputError(f"{out}: holds files that are not a salm-fast output ({shown}); the output "
                                    "is published by replacing the whole folder: choose a new or empty one")
    if not replace:
        raise FileExistsError(f"{out}: holds a previous release; pass overwrite=True (--overwrite) to replace it")


def release_path_for(ds: Dataset, out: Path) -> Path:
    """Where the release of ``ds`` goes inside ``out``: the input's own format and name."""
    if ds.source and Path(ds.source).is_dir():
        return out / "images"
    size = ds.size if ds.size is not None else ds.image_shape[0]
    return out / medmnist_filename(ds.name or "dataset", size)


def work_folder_for(out: Path) -> Path:
    """The default private work folder of ``out``: beside it, never inside it."""
    return out.parent / f".{out.name}.salm-work"


def _check_workdir(workdir: Path, out: Path) -> None:
    w, o = workdir.resolve(), out.resolve()
    if w.is_relative_to(o) or o.is_relative_to(w):
        raise ValueError(f"workdir {workdir} must lie outside the output folder {out} (and not hold it): "
                         "the checkpoint in it holds the noise")
    if workdir.exists() and not workdir.is_dir():
        raise UnwritableOutputError(f"{workdir}: exists and is not a directory")
    check_out_dir(workdir)


def _build_method(method: str, eps: float | str | None, k: int | float | None, seed: int,
                  precision: str | None, options: dict[str, Any]) -> Method:
    """The method with its options; ``precision`` goes into a bi-level method's loop config."""
    cls = check_options(method, options)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if issubclass(cls, BiLevelMethod) and precision is not None:
        loop = options.get("loop") or cls.default_loop()
        if isinstance(loop, BiLevelConfig):  # anything else: the method's own one-line error
            if "loop" in options and loop.precision not in ("auto", precision):
                raise ValueError(f"precision={precision!r} contradicts loop.precision={loop.precision!r}; give one")
            options["loop"] = dataclasses.replace(loop, precision=precision)  # a copy: the caller's is theirs
    elif precision == "bf16":
        raise ValueError(f"{method} has no bi-level loop: it computes in fp32, precision bf16 does not apply")
    return make_method(method, eps=eps, k=k, seed=seed, **options)


# ------------------------------------------------------------------------------ protect: plan
@dataclass(frozen=True)
class ProtectPlan:
    """What ``protect`` will do, all of it checked: made by :func:`plan`, run by :func:`fit` and :func:`write`."""

    method: Method
    data: Dataset
    splits: tuple[str, ...]
    out: Path
    workdir: Path
    release_name: str  # the release's name inside ``out``
    backend: str | None = None
    precision: str = "auto"  # requested; the summary records the one used and why
    resume: bool = False
    overwrite: bool = False
    keep_checkpoint: bool = False
    figure: bool = True
    progress: bool = False
    audit: bool = True  # the quick audit (salm_fast.audit) of the staged release, before publishing
    device: torch.device = torch.device("cpu")  # where the method runs (resolved from "auto", checked)
    seed_source: str = "user"  # where the seed came from: "user", "os" (secret) or "checkpoint"; never its value
    save_protector: Path | None = None  # where the protector of new images goes (salm_fast.protector); private

    @property
    def release_path(self) -> Path:
        return self.out / self.release_name

    @property
    def may_replace(self) -> bool:
        """A previous output in ``out`` may be replaced: asked for, or a resumed run continues what made it."""
        return self.overwrite or (self.resume and (self.workdir / CHECKPOINT).is_file())


def plan(data: str | Path | Dataset, method: str = "salm", *, out: str | Path, eps: float | str | None = None,
         k: int | float | None = None, splits: str | Sequence[str] = "all", seed: int | None = None,
         resume: bool = False,
         overwrite: bool = False, progress: bool = False, backend: str | None = None, figure: bool = True,
         keep_checkpoint: bool = False, workdir: str | Path | None = None, precision: str | None = None,
         audit: bool = True, resize: tuple[int, int] | str | None = None, device: str | torch.device | None = "auto",
         save_protector: str | Path | None = None, **options: Any) -> ProtectPlan:
    """Check every argument of :func:`protect` (same signature), the data and the folders; write nothing."""
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else work_folder_for(out)
    seed, seed_source = release_seed(seed, workdir / CHECKPOINT if resume else None)
    algo = _build_method(method, eps, k, seed, precision, dict(options))
    if save_protector is not None:
        from .protector import check_can_save

        check_can_save(algo)  # e.g. sample-wise noise: nothing to protect new images with
    dev = resolve_device(device)  # ValueError: e.g. "cuda" where there is none
    ops.check_backend(backend)  # a plain check: unknown (ValueError) or unavailable here (RuntimeError)
    _check_backend_device(backend, dev)
    ds = _as_dataset(data, resize)
    chosen = _resolve_splits(ds, splits)
    algo.check_data(ds.image_shape, ds.n_classes)  # e.g. k within H*W, classes within n_classes
    _check_workdir(workdir, out)
    if save_protector is not None:
        from .protector import check_protector_path

        save_protector = check_protector_path(save_protector, out, workdir, overwrite=bool(overwrite))
    requested = algo.loop.precision if isinstance(algo, BiLevelMethod) else precision or "auto"
    job = ProtectPlan(algo, ds, tuple(chosen), out, workdir, release_path_for(ds, out).name, backend, requested,
                      bool(resume), bool(overwrite), bool(keep_checkpoint), bool(figure), bool(progress), bool(audit),
                      device=dev, seed_source=seed_source, save_protector=save_protector)
    check_output(out, job.may_replace)
    return job


def release_seed(seed: int | None, checkpoint: Path | None = None) -> tuple[Any, str]:
    """The seed of a release and where it came from: the caller's (``"user"``, checked by the method); a
    resumed run's, read back from its ``checkpoint`` (``"checkpoint"``: a fresh seed would not continue
    it); else a secret one from the OS (``"os"``), kept only in the private work folder's checkpoint.
    Many processes (``torchrun``): every rank gets rank 0's (its checkpoint, or the secret it drew)."""
    if seed is not None:
        return seed, "user"
    if not D.is_main():
        return D.broadcast_object(None)
    if checkpoint is not None and checkpoint.is_file():
        return D.broadcast_object((checkpoint_seed(checkpoint), "checkpoint"))
    return D.broadcast_object((secrets.randbits(62), "os"))


def checkpoint_seed(path: str | Path) -> int:
    """The seed recorded in a bi-level checkpoint (the run's settings, or its loop config)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for part in ("settings", "config"):
        seed = (state.get(part) or {}).get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
    raise ValueError(f"{path}: the checkpoint records no seed; resume with the run's --seed or start afresh")


def _check_backend_device(backend: str | None, device: torch.device) -> None:
    """A forced backend must run on the chosen device (the default follows the device: triton on CUDA, cpp on CPU)."""
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend cpp runs on CPU tensors, but the device is {device}; use --device cpu or another "
                         "backend")
    if backend == "triton" and device.type != "cuda" and not ops.backend_status("triton").reason.startswith(
            "TRITON_INTERPRET"):
        raise ValueError(f"backend triton runs on CUDA tensors, but the device is {device}; use --device cuda")


# ------------------------------------------------------------------------------ protect: fit
@dataclass
class Fitted:
    """What :func:`fit` computed: the perturbation and the release bytes, not yet written.

    ``release``: per perturbed split, its images as released (uint8, in storage layout like the
    input's). The float perturbation is not kept whole: ``protection.batches()`` remakes it."""

    protection: Protection | None  # None on a rank of many that fitted nothing (rank 0 fitted alone)
    release: dict[str, np.ndarray]  # empty on the ranks of many other than 0
    counts: list[int]  # images per perturbed split, in the plan's order
    seconds: float

    @property
    def n_images(self) -> int:
        return sum(self.counts)


def _prepare_workdir(job: ProtectPlan) -> None:
    """The private work folder (0700: the checkpoint holds the noise); a fresh run starts it empty.
    Many processes: rank 0's alone."""
    if not D.is_main():
        return
    if not job.workdir.exists():
        job.workdir.mkdir(parents=True)
        job.workdir.chmod(0o700)
    if not job.resume:  # an earlier run's files must not pass for this run's (its log would be published)
        for name in (CHECKPOINT, ROUND_LOG):
            (job.workdir / name).unlink(missing_ok=True)


def _fit_shard(job: ProtectPlan) -> Fitted:
    """:func:`fit` on one rank of many (``torchrun``; :mod:`salm_fast.distributed`).

    The perturbed splits' images, in order, are cut into one contiguous shard per rank; each rank fits
    the method on its shard (the models are shared and kept identical, see :mod:`salm_fast.bilevel`),
    quantizes its shard's release and sends it to rank 0 with its masks (and, for image-folder
    releases, which go back onto each file's own grid, its float perturbation). Rank 0 returns the
    whole release; the others a Fitted without one (they write nothing)."""
    ds = job.data
    rank, size = D.world()
    counts = [len(ds[s]) for s in job.splits]
    total = sum(counts)
    if total < size:
        raise ValueError(f"{total} images to perturb cannot be shared by {size} processes")
    own = D.shard_indices(total, rank, size)
    starts = np.cumsum([0, *counts])
    parts, labels = [], []
    for name, a, b in zip(job.splits, starts[:-1], starts[1:]):
        lo, hi = max(own.start, a), min(own.stop, b)
        if lo < hi:  # slices: a memory-mapped split stays memory-mapped
            parts.append(ds[name].images[lo - a:hi - a])
            labels.append(np.array(ds[name].labels[lo - a:hi - a, 0]))
    images = ImageView(parts, job.device)
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    want_delta = not job.release_name.endswith(".npz")  # written onto each file's own grid: the float values
    _prepare_workdir(job)
    t0 = time.perf_counter()
    rows, deltas = [], []
    with ops.use_backend(job.backend):
        protection = job.method.fit(images, y, ds.n_classes, workdir=job.workdir, resume=job.resume,
                                    progress=job.progress and rank == 0, device=job.device)
        for sl, delta in protection.batches():
            rows.append(nchw_to_storage(quantize_release(images.u8(sl).cpu(), delta.cpu(), job.method.eps)))
            if want_delta:
                deltas.append(delta.cpu())
    release = D.gather_rows(torch.from_numpy(np.concatenate(rows)))
    mask = D.gather_rows(protection.mask.cpu())
    delta = D.gather_rows(torch.cat(deltas)) if want_delta else None
    seconds = time.perf_counter() - t0
    if rank != 0:
        return Fitted(protection, {}, counts, seconds)
    info = {**protection.info, "processes": size, "images_per_second": total / seconds if seconds > 0 else 0.0,
            "distributed_backend": D.backend_name()}
    whole = ImageView([ds[s].images for s in job.splits], job.device)
    if delta is None:
        def not_here(idx: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("under torchrun the float perturbation stays on the process that computed it; "
                               "the release holds it quantized")
        gathered = Protection(None, mask, info, delta_of=not_here, images=whole)
    else:
        gathered = Protection(delta, mask, info)
    arrays = release.numpy()
    out = {name: arrays[a:b] for name, a, b in zip(job.splits, starts[:-1], starts[1:])}
    for name in job.splits:
        if out[name].shape != ds[name].images.shape:
            raise RuntimeError(f"{name}: gathered release {out[name].shape} is not {ds[name].images.shape} (a bug)")
    return Fitted(gathered, out, counts, seconds)


def fit(job: ProtectPlan) -> Fitted:
    """Run the method on the plan's splits on the plan's device; the checkpoint and round log go to the
    work folder. The images stay uint8 as stored (float batches are made on the device), and the release
    is quantized batch by batch into storage-layout arrays. Many processes (``torchrun``): each rank fits
    its shard and rank 0 gathers the release (:func:`_fit_shard`), or, for a method that is not
    data-parallel (``Method.shardable`` False: random, ops, lsp, tap), rank 0 fits all images alone."""
    if D.initialized():
        if job.method.shardable:
            return _fit_shard(job)
        if not D.is_main():  # rank 0 fits every image alone (e.g. a per-class statistic over all of them)
            return Fitted(None, {}, [len(job.data[s]) for s in job.splits], 0.0)
        with D.alone():
            fitted = fit(job)
        fitted.protection.info["processes"] = 1
        return fitted
    ds = job.data
    counts = [len(ds[s]) for s in job.splits]
    images = ImageView([ds[s].images for s in job.splits], job.device)
    labels = torch.cat([torch.from_numpy(np.array(ds[s].labels[:, 0])) for s in job.splits]).long()
    _prepare_workdir(job)
    t0 = time.perf_counter()
    with ops.use_backend(job.backend):
        protection = job.method.fit(images, labels, ds.n_classes, workdir=job.workdir, resume=job.resume,
                                    progress=job.progress, device=job.device)
        release = release_arrays(ds, job.splits, images, protection, job.method.eps)
    return Fitted(protection, release, counts, time.perf_counter() - t0)


def release_arrays(ds: Dataset, splits: Sequence[str], images: ImageView, protection: Protection,
                   eps: float) -> dict[str, np.ndarray]:
    """The release bytes of ``splits`` (their images, in order, are ``images``): each batch of the
    perturbation quantized onto the uint8 grid (:func:`~salm_fast.release.quantize_release`) and put in
    storage-layout arrays like the input's. ``protect`` and ``apply`` both release through here."""
    release = {s: np.empty_like(ds[s].images) for s in splits}
    starts = np.cumsum([0, *(len(ds[s]) for s in splits)])
    for sl, delta in protection.batches():
        # On the CPU, where the release arrays are: a batch's copy is small, the double math exact anywhere.
        rows = nchw_to_storage(quantize_release(images.u8(sl).cpu(), delta.cpu(), eps))
        for name, a, b in zip(splits, starts[:-1], starts[1:]):  # a batch may straddle two splits
            lo, hi = max(sl.start, a), min(sl.stop, b)
            if lo < hi:
                release[name][lo - a:hi - a] = rows[lo - sl.start:hi - sl.start]
    return release


# ------------------------------------------------------------------------------ protect: write
@dataclass
class ProtectResult:
    """What ``protect`` produced; ``summary`` is also written as JSON beside the release."""

    release: Dataset | None  # None on the ranks of a torchrun job other than 0 (rank 0 publishes)
    release_path: Path
    summary: dict[str, Any]  # empty on those ranks
    protection: Protection | None = field(default=None, repr=False)  # the float perturbation (not saved)

    @property
    def delta(self) -> torch.Tensor | None:
        """The float perturbation of the perturbed splits, N x C x H x W (made whole when first read)."""
        return None if self.protection is None else self.protection.delta

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self.protection is None else self.protection.mask

    def table(self) -> str:
        s = self.summary
        return summary_table(s, [("method", s["method"])], [
            ("precision", f"{s['precision']['used']} (requested {s['precision']['requested']})")],
            self.release_path)


def _release(job: ProtectPlan, fitted: Fitted) -> tuple[Dataset, dict[str, dict]]:
    """The released dataset, and the budget measured on its stored bytes per perturbed split (verified)."""
    released, per_split = job.data, {}
    for name in job.splits:
        released = released.replace_split(name, fitted.release[name])
        clean, release = job.data[name].images, released[name].images
        parts = [measure_budget(clean[sl], release[sl]).as_dict() for sl in _chunks(clean)]
        per_split[name] = parts[0] if len(parts) == 1 else _merge_budget(dict(enumerate(parts)))
    _verify_budget(job.method, per_split, job.data.image_shape[0] * job.data.image_shape[1])
    return released, per_split


#: Elements per chunk when the stored bytes are measured (a few double-precision temporaries of this size):
#: a 28 px split of up to 5,349 images is one chunk, as it was before chunking.
MEASURE_ELEMENTS = 1 << 22


def _chunks(images: np.ndarray) -> list[slice]:
    """Slices of ``images`` (storage layout) of at most :data:`MEASURE_ELEMENTS` elements (at least one image)."""
    step = max(1, MEASURE_ELEMENTS // max(1, int(np.prod(images.shape[1:]))))
    return [slice(a, min(a + step, len(images))) for a in range(0, len(images), step)]


def _verify_budget(algo: Method, budget: dict, hw: int) -> None:
    """The budget must hold on the stored bytes; a violation is a bug, never a warning."""
    levels = budget_levels(algo.eps)
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


def _without_seed(obj: Any) -> Any:
    """``obj`` with every ``seed`` key removed: the seed regenerates the noise, it never goes beside a release."""
    if isinstance(obj, dict):
        return {k: _without_seed(v) for k, v in obj.items() if k != "seed"}
    return obj


def _precision(job: ProtectPlan, info: dict[str, Any]) -> dict[str, str | None]:
    if not isinstance(job.method, BiLevelMethod):
        return {"requested": job.precision, "used": "fp32",
                "reason": f"{job.method.name} has no bi-level loop; it computes in fp32"}
    # The loop's choice, or the one restored from the checkpoint on resume ("auto" may time bf16 vs fp32).
    return {"requested": job.precision, "used": info.get("precision"),
            "reason": info.get("precision_reason", "not reported by the method")}


def _summary(job: ProtectPlan, fitted: Fitted, per_split: dict[str, dict], round_log: bool) -> dict[str, Any]:
    algo, ds, n = job.method, job.data, fitted.n_images
    info = fitted.protection.info
    return {
        "method": algo.name, "paper": algo.paper, "norm": algo.norm,
        "options": _without_seed(algo.options()),
        "dataset": {"name": ds.name, "source": Path(ds.source).name if ds.source else "",  # no directories
                    "n_classes": ds.n_classes, "channels": ds.channels, "image_shape": list(ds.image_shape),
                    "splits": {s: len(ds[s]) for s in ds.splits}},
        "splits": list(job.splits),
        "seed_source": job.seed_source,  # "os": a secret seed, in no file beside the release
        "images": n,
        "eps": algo.eps,
        "budget_levels": budget_levels(algo.eps),
        "budget": {**_merge_budget(per_split), **_method_release_check(job, fitted)},
        "budget_per_split": per_split,
        "quality": _quality(job, fitted),
        "seconds": fitted.seconds,
        "images_per_second": n / fitted.seconds if fitted.seconds > 0 else 0.0,
        "backend": job.backend or "default",
        "device": describe_device(job.device),
        "precision": _precision(job, info),
        "protection": _without_seed({k: v for k, v in info.items()
                                     if k not in ("history", "precision", "precision_reason")}),
        "machine": machine_info(),
        "files": {"release": job.release_name, "figure": FIGURE if job.figure else None,
                  "round_log": ROUND_LOG if round_log else None},
    }


def _split_chunks(job: ProtectPlan, fitted: Fitted):
    """``(clean, release)`` uint8 N x C x H x W tensors, chunk by chunk over the perturbed splits."""
    for name in job.splits:
        clean = job.data[name].images
        for sl in _chunks(clean):
            yield storage_to_nchw(clean[sl]), storage_to_nchw(fitted.release[name][sl])


def _method_release_check(job: ProtectPlan, fitted: Fitted) -> dict[str, Any]:
    """The method's own checks on the stored bytes (``Method.check_release``: per-image maxima), chunk by chunk."""
    merged: dict[str, Any] = {}
    for clean, release in _split_chunks(job, fitted):
        for key, value in job.method.check_release(clean, release).items():
            merged[key] = max(merged[key], value) if isinstance(value, (int, float)) and key in merged else value
    return merged


def _quality(job: ProtectPlan, fitted: Fitted) -> dict[str, float]:
    """PSNR / SSIM / L-inf / L0 of the release over the perturbed splits, measured chunk by chunk."""
    from .victims.metrics import perturbation_metrics

    parts = [(len(c), perturbation_metrics(c, r)) for c, r in _split_chunks(job, fitted)]
    if len(parts) == 1:
        return parts[0][1]
    n = sum(m for m, _ in parts)
    mse = sum(m * (0.0 if q["psnr_db"] == math.inf else 10 ** (-q["psnr_db"] / 10)) for m, q in parts) / n
    return {"linf_255": max(q["linf_255"] for _, q in parts), "linf": max(q["linf"] for _, q in parts),
            "l0": sum(m * q["l0"] for m, q in parts) / n,
            "psnr_db": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse),
            "ssim": sum(m * q["ssim"] for m, q in parts) / n}


def _draw(job: ProtectPlan, fitted: Fitted, released: Dataset, path: Path) -> None:
    from .figures import protection_figure

    ds, first, algo = job.data, job.splits[0], job.method
    title = f"{algo.name}: eps {budget_levels(algo.eps)}/255" + (f", k {algo.k}" if algo.k is not None else "")
    labels = ds[first].labels[:, 0]
    # The figure shows the first few images of each class: hand it those (a few per class), not the whole split.
    rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:FIGURE_PER_CLASS] for c in np.unique(labels)]))
    mask = fitted.protection.mask[torch.from_numpy(rows).to(fitted.protection.mask.device)].cpu()
    protection_figure(ds[first].images[rows], released[first].images[rows], mask, labels[rows], path,
                      class_names=ds.label_names, title=title)


#: Images per class handed to the protection figure (it shows the first two of each class).
FIGURE_PER_CLASS = 8


def _finish_workdir(job: ProtectPlan) -> None:
    """After a published run the checkpoint goes (it holds the noise), unless it is to be kept."""
    if job.keep_checkpoint:
        return
    if job.workdir == work_folder_for(job.out):  # ours alone
        shutil.rmtree(job.workdir, ignore_errors=True)
        return
    for name in (CHECKPOINT, ROUND_LOG):  # a folder the caller chose: only our files
        (job.workdir / name).unlink(missing_ok=True)


def _k_pixels(job: ProtectPlan) -> int | None:
    return ops.resolve_k(job.method.k, job.data.image_shape[0] * job.data.image_shape[1]) if job.method.masked else None


def _audit(job: ProtectPlan, staging: Path) -> dict[str, Any]:
    """The quick audit of the staged release against the input; its audit.json goes beside the summary."""
    from .audit import AUDIT, audit

    res = audit(staging / job.release_name, job.data, eps=job.method.eps, k=_k_pixels(job), out=staging,
                progress=job.progress)
    return {"verdict": res.verdict, "status": res.status, "file": AUDIT}


def write(job: ProtectPlan, fitted: Fitted) -> ProtectResult:
    """Build the whole output in a private staging folder beside ``out`` and publish it in one rename;
    on any failure nothing is published (an existing ``out`` is untouched) and the checkpoint stays
    in the work folder for ``resume``."""
    released, per_split = _release(job, fitted)
    log = job.workdir / ROUND_LOG
    round_log = isinstance(job.method, BiLevelMethod) and log.is_file()
    summary = _summary(job, fitted, per_split, round_log)
    staging = make_staging_dir(job.out, STAGING)
    try:
        if job.release_name.endswith(".npz"):
            save_medmnist(released, staging / job.release_name)
        else:  # 16-bit / DICOM files: written back at their own depth, the budget verified on the stored values
            def deltas() -> dict[str, torch.Tensor]:
                return dict(zip(job.splits, fitted.protection.delta.split(fitted.counts)))

            summary.update(write_folder_release(job.data, released, staging / job.release_name, deltas,
                                                job.method.eps, k=_k_pixels(job)))
        if job.figure:
            _draw(job, fitted, released, staging / FIGURE)
        if round_log:
            shutil.copyfile(log, staging / ROUND_LOG)
        if job.audit:  # on the staged release: a failing audit publishes nothing
            summary["audit"] = _audit(job, staging)
        atomic_write_json(staging / SUMMARY, summary)
        publish_dir(staging, job.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _finish_workdir(job)
    return ProtectResult(released, job.release_path, summary, fitted.protection)


def protect(data: str | Path | Dataset, method: str = "salm", *, out: str | Path, eps: float | str | None = None,
            k: int | float | None = None, splits: str | Sequence[str] = "all", seed: int | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = False, backend: str | None = None,
            figure: bool = True, keep_checkpoint: bool = False, workdir: str | Path | None = None,
            precision: str | None = None, audit: bool = True, resize: tuple[int, int] | str | None = None,
            device: str | torch.device | None = "auto", save_protector: str | Path | None = None,
            **options: Any) -> ProtectResult:
    """Protect ``data`` with ``method``; publish the release, summary, figure, round log and audit as ``out``.

    ``eps``: the L-inf budget, a fraction ``"8/255"`` or a number below 1 (``release.parse_eps``);
    None: the method's default (8/255; 1.0 for ``ops``, and for ``lsp`` in its L2 mode). ``k``
    (masked methods): pixels per image (int) or fraction of H*W (float); None: the method's
    default. ``splits``: which splits to perturb ("all", the default: a split shipped clean is an
    unprotected copy; "train" for benchmarking; or a list). ``seed``: None (default) draws a secret
    seed from the OS, kept only in the work folder's checkpoint (a resumed run reads it back from
    there); give one for a reproducible experiment. ``out``: absent,
    empty, or (``overwrite=True``) a previous output, replaced whole. ``workdir``: the private
    folder for the checkpoint and round log (default ``<parent>/.<name>.salm-work``).
    ``precision``: the surrogate's, ``auto`` | ``fp32`` | ``bf16`` (bi-level methods; None: the
    loop config's, ``auto`` by default, chosen for the device); the summary records the one used and why.
    ``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:<i>``: data
    batches, surrogate, generator and noise run there (kernels: Triton on CUDA, C++ on the CPU); a
    device that is not here is refused before anything is written.
    ``audit``: run the quick audit (:func:`salm_fast.audit.audit`) on the staged release before
    publishing; ``audit.json`` goes beside the summary, the verdict into ``summary["audit"]``.
    ``resize``: ``(h, w)`` or ``"HxW"``, read an image folder at this size (the release is then of
    the resized images). 16-bit PNG/TIFF and DICOM folders are released at their own depth
    (:mod:`salm_fast.data.stored`). ``save_protector``: a file path for what protects images that arrive
    later (:mod:`salm_fast.protector`; ``apply``): methods with a trained generator only, never inside
    ``out`` (the release is shared, the protector is the owner's key), an existing file only with
    ``overwrite``; written with the release, or not at all. Everything is checked before any work
    starts; nothing is written on bad input.
    """
    job = plan(data, method, out=out, eps=eps, k=k, splits=splits, seed=seed, resume=resume, overwrite=overwrite,
               progress=progress, backend=backend, figure=figure, keep_checkpoint=keep_checkpoint, workdir=workdir,
               precision=precision, audit=audit, resize=resize, device=device, save_protector=save_protector,
               **options)
    for folder in (job.out, job.workdir):  # the locks live beside them
        folder.parent.mkdir(parents=True, exist_ok=True)
    if not D.is_main():  # torchrun: this rank computes its shard; rank 0 alone locks, checkpoints and publishes
        return ProtectResult(None, job.release_path, {}, fit(job).protection)
    with output_lock(job.out), output_lock(job.workdir):
        check_output(job.out, job.may_replace)  # again under the lock: another run may have published meanwhile
        for stale in job.out.parent.glob(f".{glob.escape(job.out.name)}.{STAGING}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's: only a run holding this lock stages here
        try:
            fitted = fit(job)
            if job.save_protector is None:
                return write(job, fitted)
            from .protector import staged_protector

            # Made, written beside its place and checked to load before the release is published; renamed into
            # place right after it is (a run that fails before publishing leaves no protector behind).
            with staged_protector(job.save_protector, job.method, job.data, job.splits, overwrite=job.overwrite):
                return write(job, fitted)
        except BaseException:
            if job.workdir == work_folder_for(job.out) and job.workdir.is_dir() and not any(job.workdir.iterdir()):
                job.workdir.rmdir()  # nothing to resume from: no empty folder left behind
            raise


# ------------------------------------------------------------------------------ evaluate
#: The attacker's counter-measures that need more than the release's train split (``evaluate`` and the
#: experiment grid run them; a victim alone cannot): early stopping on the owner's clean val split,
#: training on every split released clean, and known-pattern removal with this package's own defaults.
ATTACKER_STEPS = ("best-val", "clean-splits", "purify")


@dataclass(frozen=True)
class PurifySettings:
    """The known-pattern attacker (``purify``): it re-protects the release with ``method`` (our default,
    its default options, ``rounds`` bi-level rounds, a seed of its own) and trains the denoiser of
    :class:`~salm_fast.victims.purify.KnownPatternRemoval` for ``steps`` steps. ``options``: further
    options of the re-protection as ``(name, value)`` pairs (e.g. a smaller surrogate for a quick run)."""

    method: str = "salm"
    rounds: int | None = 2
    steps: int = 300
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rounds": self.rounds, "steps": self.steps,
                "options": {k: repr(v) for k, v in self.options}}

    def protector(self, n_classes: int, seed: int):
        """``protector(images_u8, labels) -> images_u8``: ``method`` from the registry under ``seed``."""
        options = dict(self.options)
        if self.rounds is not None:
            options["rounds"] = self.rounds
        algo = make_method(self.method, seed=seed, **options)  # bad options fail here, before any training

        def protector(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            protection = algo.fit(images.float() / 255, labels, n_classes)
            return quantize_release(images, protection.delta.to(images.device), algo.eps)

        return protector


def split_counter_measures(defense: str | Sequence[str] | None) -> tuple[tuple[str, ...], str | None]:
    """``(attacker steps, victim defenses)`` of counter-measure names joined by '+': the steps of
    :data:`ATTACKER_STEPS` in their fixed order, the rest for the victim (checked: ValueError on an
    unknown name)."""
    from .victims import parse_defenses

    if defense is None:
        tokens: list[str] = []
    elif isinstance(defense, str):
        tokens = [t.strip().lower() for t in defense.split("+") if t.strip()]
    else:
        tokens = [t.strip().lower() for d in defense for t in d.split("+") if t.strip()]
    tokens = [t for t in tokens if t != "none"]
    steps = tuple(s for s in ATTACKER_STEPS if s in tokens)
    if len(steps) != sum(t in ATTACKER_STEPS for t in tokens):
        raise ValueError(f"a counter-measure is given twice in {defense!r}")
    rest = "+".join(t for t in tokens if t not in ATTACKER_STEPS) or None
    parse_defenses(rest)
    return steps, rest


def counter_measure_name(defense: str | Sequence[str] | None) -> str:
    """The one name of a set of counter-measures: the attacker's steps, then the victim's defenses in
    their canonical order; ``none`` when there are none."""
    from .victims import parse_defenses

    steps, rest = split_counter_measures(defense)
    victim = parse_defenses(rest).name
    return "+".join([*steps, *([victim] if victim != "none" else [])]) or "none"


def attacker_seed(seed: int) -> int:
    """The known-pattern attacker's own seed, drawn from the victim's seed (never the owner's)."""
    return int.from_bytes(hashlib.sha256(f"purify-attacker-{seed}".encode()).digest()[:7], "big")


@dataclass
class AttackerData:
    """What the attacker trains on (uint8 N x C x H x W and labels), the clean labeled images it early-stops
    on (``select="best_val"``), and what the steps did (``notes``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    select: str = "last"
    notes: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def victim_options(self) -> dict[str, Any]:
        """``train_victim`` keywords of the early stopping (none under ``select="last"``)."""
        return {} if self.select == "last" else {"val_x": self.val_x, "val_y": self.val_y, "select": self.select}


def _labels_of(split) -> torch.Tensor:
    return torch.from_numpy(np.array(split.labels[:, 0])).long()


def attacker_data(clean: Dataset, data: Dataset, steps: Sequence[str], *, seed: int = 0,
                  purify: PurifySettings | None = None) -> AttackerData:
    """The attacker's training set from ``data`` (a release, or the clean data for the reference run) under
    ``steps`` (see :data:`ATTACKER_STEPS`); ``clean`` is the owner's data (its val split is the attacker's
    clean labeled images for ``best-val``, and the judge of which splits were released clean)."""
    splits, notes = ["train"], []
    if "clean-splits" in steps:
        extra = [s for s in data.splits if s not in ("train", "test")]
        for s in extra:
            if s not in clean.splits or not np.array_equal(data[s].labels, clean[s].labels):
                raise DataError(f"the {s} split's labels differ from the clean data's: not a release of this dataset")
        released_clean = [s for s in extra if np.array_equal(data[s].images, clean[s].images)]
        if released_clean:
            splits += released_clean
            notes.append(f"clean-splits: trained on train + {', '.join(released_clean)} (released clean)")
        elif extra:
            splits += extra
            notes.append(f"clean-splits: no clean split released; trained on train + {', '.join(extra)} as released")
        else:
            notes.append("clean-splits: no split beside train and test")
    parts = [storage_to_nchw(data[s].images) for s in splits]
    labels = [_labels_of(data[s]) for s in splits]
    if "purify" in steps:
        from .victims.purify import KnownPatternRemoval

        settings = purify or PurifySettings()
        own = attacker_seed(seed)
        remover = KnownPatternRemoval(settings.protector(clean.n_classes, own), steps=settings.steps, seed=seed)
        # Everything trained on except a split identical to the owner's (the clean data's train split counts
        # as a release: the reference run measures what the filter does to clean images).
        dirty = [i for i, s in enumerate(splits) if s == "train" or not np.array_equal(data[s].images, clean[s].images)]
        x = torch.cat([parts[i] for i in dirty])
        y = torch.cat([labels[i] for i in dirty])
        purified = remover(x, y).split([len(parts[i]) for i in dirty])
        for i, p in zip(dirty, purified):
            parts[i] = p
        notes.append(f"purify: {settings.method} re-protection ({settings.rounds or 'default'} rounds) + "
                     f"denoiser ({settings.steps} steps) on {', '.join(splits[i] for i in dirty)}")
    out = AttackerData(torch.cat(parts), torch.cat(labels), notes=notes, splits=splits)
    if "best-val" in steps:
        if "val" not in clean.splits:
            raise DataError("best-val early-stops on the clean val split: the clean data has none")
        out.val_x, out.val_y, out.select = storage_to_nchw(clean["val"].images), _labels_of(clean["val"]), "best_val"
    return out


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
    n_classes: int = 2
    notes: dict[str, list[str]] = field(default_factory=dict)  # per run: what the attacker's steps did

    def protection_auc(self, run: str = "release") -> float:
        """The AUC an attacker gets (binary tasks: max(AUC, 1 - AUC), an inverted ranking flipped)."""
        from .victims import protection_auc

        return protection_auc(getattr(self, run)["test"]["auc"], self.n_classes)

    def table(self) -> str:
        head = f"victim {self.victim} | defense {self.defense} | precision {self.precision}"
        lines = [head, f"{'trained on':<12} {'test ACC':>9} {'test AUC':>9} {'protection AUC':>15} {'bal. ACC':>9} "
                       f"{'train ACC':>10} {'best epoch':>11}"]
        for name in ("clean", "release"):
            r = getattr(self, name)
            t, tr = r["test"], r.get("train") or {}
            best = "-" if r.get("best_epoch") is None else str(r["best_epoch"])
            lines.append(f"{name:<12} {t['acc']:>9.3f} {t['auc']:>9.3f} {self.protection_auc(name):>15.3f} "
                         f"{t['balanced_acc']:>9.3f} {tr.get('acc', float('nan')):>10.3f} {best:>11}")
        p = self.perturbation
        lines.append(f"release vs clean: L-inf {p['linf_255']:.0f}/255, L0 {p['l0']:.3f}, "
                     f"PSNR {p['psnr_db']:.1f} dB, SSIM {p['ssim']:.4f}")
        lines += [f"{name}: {note}" for name, notes in self.notes.items() for note in notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"victim": self.victim, "defense": self.defense, "precision": self.precision,
                "protection_auc": {run: self.protection_auc(run) for run in ("clean", "release")},
                "clean": self.clean, "release": self.release, "perturbation": self.perturbation,
                "notes": self.notes, "settings": self.settings}


def _check_pair(clean: Dataset, release: Dataset) -> None:
    if "train" not in release.splits or "test" not in clean.splits:
        raise DataError("evaluate needs a train split in the release and a test split in the clean data")
    a, b = clean["train"], release["train"]
    if a.images.shape != b.images.shape:
        raise DataError(f"release train images {b.images.shape} do not match the clean ones {a.images.shape}")
    if not np.array_equal(a.labels, b.labels):
        raise DataError("release train labels differ from the clean labels: not a release of this dataset")


def _write_evaluation(res: EvaluationResult, out: Path) -> None:
    from .figures import learning_curves

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "evaluation.json", res.as_dict())
    learning_curves({"clean": res.clean["history"], "release": res.release["history"]},
                    out / "learning_curves.png", title=f"{res.victim} ({res.defense})")


def evaluate(clean: str | Path | Dataset, release: str | Path | Dataset, *, victim: str = "resnet18",
             defense: str | None = None, augment: str = "crop_flip", epochs: int | None = None, seed: int = 0,
             precision: str = "auto", out: str | Path | None = None, progress: bool = False,
             purify: PurifySettings | None = None, device: str | torch.device | None = "auto",
             **train_options: Any) -> EvaluationResult:
    """Train ``victim`` from scratch on the clean and on the released training split.

    Both runs share every setting (seed, precision, epochs, augmentation, counter-measures)
    and are tested on the owner's clean test split. ``defense``: counter-measures by name,
    joined with '+': the victim's (see ``salm_fast.victims.defenses``) and the attacker's
    (:data:`ATTACKER_STEPS`: ``best-val`` keeps the epoch of best AUC on the clean val split,
    ``clean-splits`` adds every split released clean (or, when none is, val as released),
    ``purify`` removes the pattern our own code makes, settings in ``purify``). Binary tasks
    report the protection AUC, max(AUC, 1 - AUC), beside the AUC. ``device``: where the victims
    train (``auto``: CUDA when present); ``precision="auto"`` is chosen for that device. Writes
    ``evaluation.json`` and ``learning_curves.png`` into ``out`` when given.
    """
    from .models import MODELS, build_model
    from .victims import choose_precision, perturbation_metrics, train_victim

    if victim not in MODELS:
        raise ValueError(f"unknown victim {victim!r}; choose one of {', '.join(MODELS)}")
    seed = _check_count("seed", seed, 0)
    epochs = None if epochs is None else _check_count("epochs", epochs, 1)
    dev = resolve_device(device)
    steps, victim_defense = split_counter_measures(defense)  # validates the names before any training
    if purify is not None and not isinstance(purify, PurifySettings):
        raise TypeError(f"purify must be a PurifySettings or None, got {type(purify).__name__}")
    if out is not None:  # created only once everything is checked
        check_out_dir(Path(out))
        if Path(out).is_dir():
            check_writable(Path(out) / "evaluation.json", overwrite=True)
    clean_ds, release_ds = _as_dataset(clean), _as_dataset(release)
    _check_pair(clean_ds, release_ds)
    test = clean_ds["test"]
    probe = build_model(victim, clean_ds.channels, clean_ds.n_classes, clean_ds.image_shape[0])
    prec, reason = choose_precision(precision, dev, model=probe, num_classes=clean_ds.n_classes,
                                    sample_shape=(32, clean_ds.channels, *clean_ds.image_shape))
    threads, threads_reason = choose_threads(train_options.pop("threads", "auto"), dev, model=probe,
                                             num_classes=clean_ds.n_classes, precision=prec,
                                             sample_shape=(128, clean_ds.channels, *clean_ds.image_shape))
    common = dict(epochs=epochs, augment=augment, defense=victim_defense, seed=seed, precision=prec,
                  num_classes=clean_ds.n_classes, device=dev, threads=threads, **train_options)
    runs, notes = {}, {}
    for name, ds in (("clean", clean_ds), ("release", release_ds)):
        if progress:
            print(f"training {victim} on the {name} data ...", flush=True)
        data = attacker_data(clean_ds, ds, steps, seed=seed, purify=purify)
        result = train_victim(victim, data.train_x, data.train_y, test.images, test.labels, progress=progress,
                              **common, **data.victim_options())
        runs[name], notes[name] = result.to_dict(), data.notes
    pert = perturbation_metrics(storage_to_nchw(clean_ds["train"].images),
                                storage_to_nchw(release_ds["train"].images))
    res = EvaluationResult(victim, counter_measure_name(defense), runs["clean"], runs["release"], pert, prec,
                           {"seed": seed, "augment": augment, "precision_reason": reason,
                            "device": describe_device(dev), "threads_reason": threads_reason,
                            **({"purify": (purify or PurifySettings()).as_dict()} if "purify" in steps else {}),
                            "machine": machine_info()},
                           clean_ds.n_classes, {k: v for k, v in notes.items() if v})
    if out is not None:
        _write_evaluation(res, Path(out))
    return res
