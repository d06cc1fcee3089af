"""Images at their stored bit depth (12/16-bit DICOM, 16-bit PNG/TIFF), beside the 8-bit view the models see.

The pipeline is uint8 throughout (:class:`~salm_fast.data.Dataset`, the surrogate, the victims,
the release grid). A folder of files at another depth is read into both:

* the **view**: uint8 images in the Dataset's splits, ``round(255 * display)`` with
  ``display = (stored - low) / maxval`` in [0, 1], ``maxval = 2**bits - 1``; an image that a
  viewer shows inverted (DICOM MONOCHROME1, or a negative rescale slope) is inverted in its view
  (``1 - display``), so that in every view bright means what a reader sees as bright;
* the **stored pixels** (:class:`StoredImages`, one per split): the files' own integer values
  with each image's bit depth, lowest value (0, or ``-2**(bits-1)`` for signed DICOM) and
  inversion, and what writing the file back needs (its name, format and mode).

A perturbation is computed on the view, in display units; :func:`perturb_stored` puts it on
the stored grid once (:func:`salm_fast.release.stored_steps`): a nonzero perturbation moves its
pixel by at least one stored level and by at most ``floor(eps * maxval)`` (eps is a fraction of
the stored range), in the direction a viewer sees it (negated for an inverted image); pixels it
leaves at 0 stay identical. :func:`stored_budget` measures the budget on the stored values and
refuses a violation.

:class:`FolderDataset` is a Dataset read from such a folder (or resized on reading): it keeps the
stored pixels, so a release is written back file for file at the files' own depth.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .dataset import Dataset
from .errors import DataError

__all__ = ["FolderDataset", "StoredImage", "StoredImages", "perturb_stored", "resize_stored", "stored_budget"]

#: How images are resized when asked (``resize=(h, w)``): PIL's bilinear (triangle) filter, which
#: widens its support when shrinking (so it averages instead of aliasing) and never overshoots the
#: input's range, computed in float32 on the stored values and rounded back to the stored grid.
RESIZE_FILTER = "bilinear"


@dataclass(frozen=True, eq=False)
class StoredImage:
    """One image file as read: its stored values and how a viewer maps them to brightness."""

    pixels: np.ndarray  # integer H x W or H x W x 3, the stored values
    bits: int           # stored bit depth (DICOM BitsStored; 16 for a 16-bit PNG/TIFF, 8 for 8-bit files)
    fmt: str            # "dicom" | "png" | "tiff" | "jpeg" | ...: how the file is written back
    mode: str           # the PIL mode of a PNG/TIFF ("I;16", "I;16B", "I", "L", "RGB"); DICOM: its photometric
    low: int = 0        # the lowest stored value: 0, or -2**(bits-1) for signed DICOM pixels
    invert: bool = False  # a viewer shows low values bright (MONOCHROME1, or a negative rescale slope)

    @property
    def maxval(self) -> int:
        return (1 << self.bits) - 1

    @property
    def full_depth(self) -> bool:
        """Written back as itself (DICOM, or more than 8 bits), not as an 8-bit PNG."""
        return self.fmt == "dicom" or self.bits != 8


def _per_image(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A per-image value (shape N) shaped to broadcast against N x H x W (x C) pixels."""
    return a.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class StoredImages:
    """One split's images at their stored depth, in the split's order (file order in labels.csv)."""

    names: tuple[str, ...]  # file names relative to the folder
    pixels: np.ndarray      # int32 N x H x W or N x H x W x 3
    bits: np.ndarray        # int64 N
    low: np.ndarray         # int64 N
    invert: np.ndarray      # bool N
    formats: tuple[str, ...]
    modes: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.pixels.shape[0]
        if not (len(self.names) == len(self.formats) == len(self.modes) == n
                and self.bits.shape == self.low.shape == self.invert.shape == (n,)):
            raise DataError(f"stored images: {n} images but {len(self.names)} names, {self.bits.shape[0]} depths")
        for name in ("pixels", "bits", "low", "invert"):
            getattr(self, name).flags.writeable = False

    @classmethod
    def stack(cls, names: list[str], images: list[StoredImage]) -> StoredImages:
        return cls(tuple(names), np.stack([im.pixels.astype(np.int32, copy=False) for im in images]),
                   np.array([im.bits for im in images], np.int64), np.array([im.low for im in images], np.int64),
                   np.array([im.invert for im in images], bool), tuple(im.fmt for im in images),
                   tuple(im.mode for im in images))

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def maxval(self) -> np.ndarray:
        return (np.int64(1) << self.bits) - 1

    def image(self, i: int, pixels: np.ndarray | None = None) -> StoredImage:
        """Image ``i`` (with other ``pixels`` of the same shape, e.g. its release)."""
        return StoredImage(self.pixels[i] if pixels is None else pixels, int(self.bits[i]), self.formats[i],
                           self.modes[i], int(self.low[i]), bool(self.invert[i]))

    def view(self, pixels: np.ndarray | None = None) -> np.ndarray:
        """The uint8 view (see the module doc) of these images, or of ``pixels`` at their depths."""
        p = self.pixels if pixels is None else pixels
        display = (p - _per_image(self.low, p)) / _per_image(self.maxval, p).astype(np.float64)
        display = np.where(_per_image(self.invert, p), 1.0 - display, display)
        return np.rint(display * 255.0).astype(np.uint8)


def perturb_stored(stored: StoredImages, delta: Any, eps: float) -> np.ndarray:
    """The stored pixels plus a float perturbation ``delta`` (N x C x H x W, [0, 1] display units of
    the view), on the stored grid: at least one level where delta != 0, at most ``floor(eps * maxval)``
    levels, negated for inverted images, clamped to each image's stored range. Returns int32 pixels."""
    import torch

    from ..release import stored_steps
    from .dataset import nchw_to_storage

    delta = torch.as_tensor(delta)
    n = len(stored)
    if delta.ndim != 4 or delta.shape[0] != n:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; expected {n} x C x H x W")
    maxval = torch.from_numpy(np.array(stored.maxval)).view(n, 1, 1, 1)
    steps = stored_steps(delta.detach().cpu(), eps, maxval)
    steps = torch.where(torch.from_numpy(np.array(stored.invert)).view(n, 1, 1, 1), -steps, steps)
    steps = nchw_to_storage(steps)
    if steps.shape != stored.pixels.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but the stored images are {stored.pixels.shape}")
    low = _per_image(stored.low, steps)
    out = np.clip(stored.pixels + steps, low, low + _per_image(stored.maxval, steps))
    return out.astype(np.int32)


def stored_budget(clean: StoredImages, release: np.ndarray, eps: float | None = None,
                  k: int | None = None, *, strict: bool = True) -> dict[str, Any]:
    """The budget measured on the stored values, per bit depth (``"12": {...}``) and overall.

    With ``eps`` (and ``k``, pixels per image), each image's change must stay within
    ``floor(eps * maxval)`` levels of its own depth (and ``k`` pixels). A violation is a bug of
    the writer and raises RuntimeError, never a warning; ``strict=False`` (auditing a release
    made elsewhere) lists the violations under ``"over"`` instead.
    """
    from ..release import measure_stored_budget, stored_budget_levels

    if release.shape != clean.pixels.shape:
        raise ValueError(f"release {release.shape} and clean {clean.pixels.shape} stored images differ in shape")
    per_bits: dict[str, dict[str, Any]] = {}
    over: list[str] = []
    for bits in sorted(set(clean.bits.tolist())):
        pick = clean.bits == bits
        maxval = (1 << bits) - 1
        report = measure_stored_budget(clean.pixels[pick], release[pick], maxval).as_dict()
        if eps is not None:
            report["budget_levels"] = levels = stored_budget_levels(eps, maxval)
            if report["linf_levels"] > levels:
                over.append(f"stored L-inf {report['linf_levels']}/{maxval} exceeds eps {levels}/{maxval} "
                            f"({bits}-bit images)")
        if k is not None and report["l0_max_per_image"] > k:
            over.append(f"stored L0 {report['l0_max_per_image']} pixels exceeds K = {k} ({bits}-bit images)")
        per_bits[str(bits)] = {"maxval": maxval, **report}
    if over and strict:
        raise RuntimeError(f"{over[0]}: a bug, nothing is written")
    parts = list(per_bits.values())
    n = sum(p["n_images"] for p in parts)
    return {
        "linf": max(p["linf"] for p in parts),  # a fraction of each image's own stored range
        "l0_fraction": sum(p["l0_fraction"] * p["n_images"] for p in parts) / n,
        "l0_max_per_image": max(p["l0_max_per_image"] for p in parts),
        "changed_images": sum(p["changed_images"] for p in parts),
        "n_images": n,
        "per_bits": per_bits,
        **({"over": over} if over else {}),
    }


def resize_stored(image: StoredImage, size: tuple[int, int]) -> StoredImage:
    """``image`` resized to ``size`` = (h, w) with :data:`RESIZE_FILTER`, on its stored values."""
    from PIL import Image

    h, w = size
    p = image.pixels
    if p.shape[:2] == (h, w):
        return image
    planes = [p] if p.ndim == 2 else [p[..., c] for c in range(p.shape[-1])]
    out = [np.asarray(Image.fromarray(q.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
           for q in planes]
    resized = np.rint(out[0] if p.ndim == 2 else np.stack(out, axis=-1))
    resized = np.clip(resized, image.low, image.low + image.maxval).astype(np.int32)
    return StoredImage(resized, image.bits, image.fmt, image.mode, image.low, image.invert)


@dataclass(frozen=True, eq=False)
class FolderDataset(Dataset):
    """A Dataset read from a folder of image files whose release is written back file for file.

    Beyond :class:`Dataset`: ``stored`` (split -> :class:`StoredImages`, the files' own values;
    the splits' uint8 images are their views) and ``resized`` (None, or what resizing on
    reading did: ``{"to": [h, w], "filter": ..., "images_resized": n}``). Derived datasets
    (:meth:`Dataset.replace_split`) are plain Datasets: the release's stored values come from
    :func:`perturb_stored`, not from its 8-bit view.
    """

    stored: Mapping[str, StoredImages] = field(default_factory=dict)
    resized: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.stored) != set(self.splits):
            raise DataError(f"dataset {self.name!r}: stored images for {sorted(self.stored)} but splits "
                            f"{sorted(self.splits)}")
        for name, s in self.stored.items():
            if len(s) != len(self.splits[name]):
                raise DataError(f"dataset {self.name!r}: split {name!r} has {len(self.splits[name])} images "
                                f"but {len(s)} stored ones")
        object.__setattr__(self, "stored", MappingProxyType(dict(self.stored)))

    @property
    def full_depth(self) -> bool:
        """The release is written at the files' own depth and format (DICOM, or more than 8 bits)."""
        return any(f == "dicom" for s in self.stored.values() for f in s.formats) or \
            any(bool((s.bits != 8).any()) for s in self.stored.values())

    def describe(self) -> dict[str, Any]:
        """What a summary says about the files: format, stored bit depths, and a resize if one was made."""
        formats = sorted({f for s in self.stored.values() for f in s.formats})
        bits = sorted({int(b) for s in self.stored.values() for b in s.bits})
        resized = dict(self.resized) if self.resized else None
        return {"format": "+".join(formats), "bits_stored": bits, "resized": resized}
