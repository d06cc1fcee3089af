"""The in-memory dataset: uint8 images and integer labels per split, in MedMNIST's conventions.

* ``Split.images``: uint8, ``N x H x W`` (grayscale) or ``N x H x W x 3`` (RGB), as in a
  MedMNIST ``.npz`` (no channel axis for grayscale).
* ``Split.labels``: int64, ``N x 1`` (MedMNIST's single-label shape). Multi-class only.
* Split names: ``train``, ``val``, ``test`` (any non-empty subset; ``train`` first by convention).

Both types are immutable (frozen dataclasses over read-only arrays): building the protected
release makes a new :class:`Dataset` with :meth:`Dataset.replace_split`, so the clean data is
never modified in place. Models see float tensors ``N x C x H x W`` in [0, 1] via
:meth:`Split.to_tensors` (a whole split) or :class:`~salm_fast.data.view.ImageView` (batch by
batch, on a device); a float result goes back to uint8 with :func:`to_uint8_images` (round to
nearest, the same quantization every release goes through).

Images may be memory-mapped: :func:`stored_npy_memmap` maps a ``.npy`` member that an ``.npz``
stores uncompressed (``np.savez``), so a large file is paged in as it is read instead of copied
into memory; a compressed member (``np.savez_compressed``, MedMNIST's own files) is read whole.
"""
from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError

if TYPE_CHECKING:  # torch is only needed for the tensor helpers
    import torch

__all__ = ["SPLITS", "MAX_CLASSES", "Split", "Dataset", "class_count", "split_from_tensors", "stored_npy_memmap",
           "to_uint8_images"]

#: Split names, in MedMNIST's order.
SPLITS = ("train", "val", "test")
#: Labels are class indices 0..n_classes-1; a larger label is almost surely not a class index.
MAX_CLASSES = 1000
#: Float images may exceed [0, 1] by this much (float rounding) before being refused.
_RANGE_TOL = 1e-5


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's own array keeps its flags)."""
    v = a.view()
    v.flags.writeable = False
    return v


_LAYOUT = "N x H x W (grayscale) or N x H x W x 3 (RGB)"


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """Validate a uint8 image array in storage layout; raise DataError (prefixed by ``what``)."""
    if not isinstance(images, np.ndarray):
        raise DataError(f"{what}: must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DataError(f"{what}: has dtype {images.dtype}; images must be uint8 (0-255)")
    if images.ndim == 4 and images.shape[-1] != 3:
        c = images.shape[-1]
        hint = "3-D volumes are not supported" if c > 4 else f"{c} channels are not supported"
        raise DataError(f"{what}: has shape {images.shape}; expected {_LAYOUT} ({hint})")
    if images.ndim not in (3, 4):
        raise DataError(f"{what}: has shape {images.shape}; expected {_LAYOUT}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: is empty (shape {images.shape})")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{what}: has shape {images.shape}; images must be at least 1 x 1 pixel")
    return images


def check_labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    """Validate integer class labels (``N x 1`` or ``N``); return them as int64 ``N x 1``."""
    if not isinstance(labels, np.ndarray):
        raise DataError(f"{what}: must be a numpy array, got {type(labels).__name__}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: has dtype {labels.dtype}; labels must be integer class indices")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{what}: has shape {labels.shape} (N x L, a multi-label task); "
                        "only single-label multi-class data (N x 1) is supported")
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"{what}: has shape {labels.shape}; expected N x 1 (or N)")
    if labels.shape[0] != n:
        raise DataError(f"{what}: has {labels.shape[0]} labels but there are {n} images")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise DataError(f"{what}: has negative label {lo}; labels must be class indices >= 0")
        if hi >= MAX_CLASSES:
            raise DataError(f"{what}: has label {hi}; class indices must be < {MAX_CLASSES}")
    return labels.reshape(n, 1).astype(np.int64, copy=False)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local file header: signature ... name length, extra length


def stored_npy_memmap(path: str | Path, member: str) -> np.ndarray | None:
    """A read-only memory map of the ``.npy`` member ``member`` of the zip archive ``path``, or None
    where it cannot be mapped: compressed or encrypted members, object or Fortran-order arrays, a
    header that does not fit the member. Nothing is unpickled (the header is parsed by NumPy's
    ``.npy`` reader, the data is never interpreted as objects)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    fmt = np.lib.format
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            return None
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or fortran or offset + nbytes > start + info.file_size or nbytes == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def _ranges(values: list[int]) -> str:
    """[2, 3, 4, 7] -> '2..4, 7' (at most a few runs, then '...')."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs[:4])
    return text + (", ..." if len(runs) > 4 else "")


def class_count(labels: Mapping[str, np.ndarray], where: str, n_classes: int | None = None,
                known_as: str = "") -> int:
    """The number of classes of a dataset whose splits hold ``labels`` (split name -> class indices >= 0),
    checked across splits; raise DataError naming the split and the label otherwise.

    ``n_classes`` known (a MedMNIST flag's, named ``known_as``): every split's labels must lie in
    [0, n_classes). Unknown: the train split defines the classes (0 .. its largest label; every
    split's when there is no train split); a label of another split outside them is an error, and
    every class index below the largest must have an image in some split, so that one stray label
    (999 among 0/1) cannot silently turn a 2-class problem into a 1000-class one.
    """
    tops = {s: int(y.max()) for s, y in labels.items() if y.size}
    derived = n_classes is None
    if n_classes is None:
        reference = ["train"] if "train" in tops else list(tops)
        n_classes = max(tops[s] for s in reference) + 1
        defined_by = "the train split" if reference == ["train"] else "the dataset"
        outside = f"is not a class of {defined_by} (its labels are 0..{n_classes - 1})"
    else:
        outside = f"is out of range: {known_as or 'the dataset'} has {n_classes} classes (0..{n_classes - 1})"
    for split, top in tops.items():
        if top >= n_classes:
            raise DataError(f"{where}: {split} label {top} {outside}")
    present = np.unique(np.concatenate([np.asarray(y).reshape(-1) for y in labels.values()]))
    if len(present) < 2:
        raise DataError(f"{where}: every label is {int(present[0]) if len(present) else '-'}; "
                        "a classification dataset needs at least 2 classes")
    if derived:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        if missing:
            raise DataError(f"{where}: no image has label {_ranges(missing)} although labels go up to {n_classes - 1}; "
                            "labels must be class indices 0..n-1 (is a label mistyped?)")
    return n_classes


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous: identity equality
class Split:
    """One split: ``images`` uint8 ``N x H x W`` or ``N x H x W x 3``, ``labels`` int64 ``N x 1``.

    Construction validates and stores read-only views; labels of any integer dtype and
    shape ``N`` or ``N x 1`` are accepted and normalized to int64 ``N x 1``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images = check_images(self.images)
        labels = check_labels(self.labels, images.shape[0])
        object.__setattr__(self, "images", _readonly(images))
        object.__setattr__(self, "labels", _readonly(labels))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, image_shape={self.images.shape[1:]}, classes={np.unique(self.labels).tolist()})"

    @property
    def channels(self) -> int:
        return 3 if self.images.ndim == 4 else 1

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def to_tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: x float32 ``N x C x H x W`` in [0, 1] (contiguous), y int64 ``N``."""
        import torch

        x = storage_to_nchw(self.images).to(device=device, dtype=torch.float32).div_(255.0)
        y = torch.from_numpy(np.array(self.labels[:, 0])).to(device)
        return x, y

    def with_images(self, images: Any) -> Split:
        """A new Split with the same labels and new images of the same shape.

        ``images`` is either a uint8 numpy array in storage layout (``N x H x W`` or
        ``N x H x W x 3``) or a float tensor/array ``N x C x H x W`` in [0, 1] (e.g. the
        perturbed ``x + delta``), which is quantized with :func:`to_uint8_images`.
        """
        new = _as_uint8_storage(images)
        if new.shape != self.images.shape:
            raise DataError(f"new images have shape {new.shape} (storage layout) but the split has "
                            f"{self.images.shape}")
        return Split(new, self.labels)


def storage_to_nchw(images: np.ndarray):
    """uint8 images in storage layout (N x H x W, N x H x W x C) -> a contiguous N x C x H x W tensor."""
    import torch

    # np.array copies: torch.from_numpy warns on read-only arrays (a Split's are).
    t = torch.from_numpy(np.array(images))
    return (t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)).contiguous()


def nchw_to_storage(t) -> np.ndarray:
    """The inverse of :func:`storage_to_nchw` (a C=1 tensor becomes N x H x W)."""
    t = t[:, 0] if t.shape[1] == 1 else t.permute(0, 2, 3, 1)
    return np.ascontiguousarray(t.numpy())


def to_uint8_images(x: Any) -> np.ndarray:
    """Quantize float images ``N x C x H x W`` in [0, 1] (tensor or array, C = 1 or 3) to uint8 storage layout.

    Rounds to the nearest level, ``round(255 * x)``; the exact inverse of
    :meth:`Split.to_tensors` (``to_uint8_images(split.to_tensors()[0])`` gives back
    ``split.images`` bit for bit). NaN/inf or values outside [0, 1] raise DataError.
    A perturbation smaller than half a level (0.5/255) is erased by this rounding: a method
    must keep |delta| on the grid it means to release.
    """
    if isinstance(x, np.ndarray):
        a = x
    else:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        if torch is None or not isinstance(x, torch.Tensor):
            raise DataError(f"images must be a float tensor or array N x C x H x W, got {type(x).__name__}")
        x = x.detach().to("cpu")
        if x.dtype in (torch.float16, torch.bfloat16):  # no numpy bfloat16; float32 holds both exactly
            x = x.float()
        a = x.numpy()
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"float images N x C x H x W in [0, 1] expected, got dtype {a.dtype}")
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise DataError(f"float images must be N x C x H x W with C = 1 or 3, got shape {a.shape}")
    if a.size == 0:
        raise DataError(f"float images are empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise DataError(f"float images contain {int((~np.isfinite(a)).sum())} NaN/inf values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise DataError(f"float images must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    q = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)  # stays float32 for float32 input (NEP 50)
    return np.ascontiguousarray(q[:, 0] if q.shape[1] == 1 else q.transpose(0, 2, 3, 1))


def _as_uint8_storage(images: Any) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return check_images(images, "new images")
    return to_uint8_images(images)


def split_from_tensors(x: Any, y: Any) -> Split:
    """A Split from float images ``N x C x H x W`` in [0, 1] and integer labels ``N`` (tensors or arrays)."""
    images = to_uint8_images(x)
    labels = y.detach().to("cpu").numpy() if hasattr(y, "detach") else np.asarray(y)
    return Split(images, labels)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset: named splits of equal image shape, ``n_classes`` classes.

    name:        short identifier; for MedMNIST the flag (``breastmnist``), else e.g. ``synthetic``.
    splits:      ``{"train": Split, "val": Split, "test": Split}``, any non-empty subset.
    n_classes:   number of classes (>= 2); every label is < n_classes.
    source:      where it came from (a path or a spec), for messages and reports.
    label_names: optional class names, one per class.
    label_dtype: dtype the labels are stored with on disk (MedMNIST: ``uint8``); kept so a
                 release is written exactly like its input.
    """

    name: str
    splits: Mapping[str, Split]
    n_classes: int
    source: str = ""
    label_names: tuple[str, ...] | None = None
    label_dtype: str = "uint8"

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        if not isinstance(self.name, str) or not self.name or "/" in self.name or "\\" in self.name:
            raise DataError(f"{where}: name must be a non-empty string without path separators")
        if not self.splits:
            raise DataError(f"{where}: has no splits")
        for k, s in self.splits.items():
            if k not in SPLITS:
                raise DataError(f"{where}: unknown split name {k!r}; expected one of {', '.join(SPLITS)}")
            if not isinstance(s, Split):
                raise DataError(f"{where}: split {k!r} is a {type(s).__name__}, not a Split")
        ordered = {k: self.splits[k] for k in SPLITS if k in self.splits}
        first_name, first = next(iter(ordered.items()))
        for k, s in ordered.items():
            if s.images.shape[1:] != first.images.shape[1:]:
                raise DataError(f"{where}: split {k!r} has images of shape {s.images.shape[1:]} but "
                                f"{first_name!r} has {first.images.shape[1:]}; all splits must agree")
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, (int, np.integer)):
            raise DataError(f"{where}: n_classes must be an int, got {self.n_classes!r}")
        if not 2 <= int(self.n_classes) <= MAX_CLASSES:
            raise DataError(f"{where}: needs at least 2 classes (and at most {MAX_CLASSES}), "
                            f"got n_classes={self.n_classes}")
        top = max(int(s.labels.max()) for s in ordered.values())
        if top >= self.n_classes:
            raise DataError(f"{where}: label {top} is out of range for n_classes={self.n_classes}")
        if self.label_names is not None:
            names = tuple(str(n) for n in self.label_names)
            if len(names) != self.n_classes:
                raise DataError(f"{where}: {len(names)} label names for {self.n_classes} classes")
            object.__setattr__(self, "label_names", names)
        if np.dtype(self.label_dtype).kind not in "iu":
            raise DataError(f"{where}: label_dtype must be an integer dtype, got {self.label_dtype}")
        object.__setattr__(self, "label_dtype", np.dtype(self.label_dtype).name)
        object.__setattr__(self, "n_classes", int(self.n_classes))
        object.__setattr__(self, "splits", MappingProxyType(ordered))

    def __getitem__(self, split: str) -> Split:
        try:
            return self.splits[split]
        except KeyError:
            raise DataError(f"dataset {self.name!r} has no split {split!r} (has {', '.join(self.splits)})") from None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(s)}" for k, s in self.splits.items())
        return (f"Dataset({self.name!r}, {sizes}, image_shape={self.image_shape}, channels={self.channels}, "
                f"n_classes={self.n_classes}, source={self.source!r})")

    @property
    def channels(self) -> int:
        """1 (grayscale) or 3 (RGB)."""
        return next(iter(self.splits.values())).channels

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W)."""
        return next(iter(self.splits.values())).image_shape

    @property
    def size(self) -> int | None:
        """Side of the (square) images in pixels, MedMNIST's size flag; None if not square."""
        h, w = self.image_shape
        return h if h == w else None

    def replace_split(self, name: str, images: Any) -> Dataset:
        """A new Dataset whose split ``name`` has new images (same shape) and the same labels.

        ``images``: uint8 storage layout, or float ``N x C x H x W`` in [0, 1] (quantized);
        see :meth:`Split.with_images`. ``self`` is not modified.
        """
        new = self[name].with_images(images)
        return self.with_split(name, new)

    def with_split(self, name: str, split: Split) -> Dataset:
        """A new Dataset with split ``name`` set (added or replaced) to ``split``."""
        splits = dict(self.splits)
        splits[name] = split
        return Dataset(self.name, splits, self.n_classes, self.source, self.label_names, self.label_dtype)
