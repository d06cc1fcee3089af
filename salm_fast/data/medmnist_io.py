"""MedMNIST ``.npz`` files in and out, in the ``medmnist`` package's own format.

Format: one ``.npz`` (zip of ``.npy``) with ``{split}_images`` (uint8, ``N x H x W`` or
``N x H x W x 3``) and ``{split}_labels`` (integer, ``N x 1``; MedMNIST uses uint8) for the
splits ``train``, ``val``, ``test``. File names: ``{flag}.npz`` for 28 px and
``{flag}_{size}.npz`` for 64/128/224 px (``breastmnist_64.npz``). A file written by
:func:`save_medmnist` under such a name loads with ``medmnist``'s own dataset classes.

Reading never unpickles: ``np.load(..., allow_pickle=False)`` always, and object arrays are
refused from their ``.npy`` header before any data is read. Our choices where the format is loose:

* ``train`` is required; ``val`` and ``test`` are optional, but a split's images and labels
  come together. Any other member is refused (it would be silently lost in the release).
* Labels ``N x 1`` (MedMNIST) or ``N`` are accepted; in memory and on save they are ``N x 1``.
  Multi-label tasks (``N x L``, e.g. ChestMNIST) are refused: multi-class only.
* ``n_classes`` is the MedMNIST count for a known flag (:data:`MEDMNIST_2D_CLASSES`, which needs
  no ``medmnist`` package), else the train split's largest label + 1; labels are checked against it
  in every split (:func:`~salm_fast.data.dataset.class_count`). ChestMNIST (multi-label) is refused.
  Class names come from ``medmnist.INFO`` when that package is importable.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .atomic import atomic_path, check_writable
from .dataset import SPLITS, Dataset, Split, check_images, check_labels, class_count, stored_npy_memmap
from .errors import DataError

__all__ = ["MEDMNIST_2D_CLASSES", "MEDMNIST_2D_FLAGS", "MEDMNIST_MULTI_LABEL", "MEDMNIST_SIZES", "load_medmnist",
           "save_medmnist", "medmnist_filename", "parse_medmnist_filename"]

#: Classes of each 2-D MedMNIST v2 flag (``len(medmnist.INFO[flag]["label"])``; a test compares the
#: two when ``medmnist`` is importable). 3-D flags are volumes, not supported here.
MEDMNIST_2D_CLASSES = {
    "pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
    "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11, "organsmnist": 11,
}
MEDMNIST_2D_FLAGS = tuple(MEDMNIST_2D_CLASSES)
#: Flags whose task is multi-label (14 binary findings per ChestMNIST image): not supported.
MEDMNIST_MULTI_LABEL = frozenset({"chestmnist"})
#: Size flags of MedMNIST+ 2-D data; 28 has no suffix in file names.
MEDMNIST_SIZES = (28, 64, 128, 224)

_NAME_RE = re.compile(r"^(?P<flag>.+?)(?:_(?P<size>28|64|128|224))?\.npz$")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def parse_medmnist_filename(path: str | os.PathLike[str]) -> tuple[str, int | None]:
    """``(flag, size)`` from a file name: ``breastmnist_64.npz`` -> ``("breastmnist", 64)``.

    ``size`` is None when the name has no size suffix (MedMNIST's 28 px convention); a name
    that is not ``*.npz`` gives its stem and None (``dataset.protected.npz`` -> ``("dataset.protected", None)``).
    """
    name = Path(path).name
    m = _NAME_RE.match(name)
    if m is None:
        return Path(name).stem, None
    size = m.group("size")
    return m.group("flag"), (int(size) if size else None)


def medmnist_filename(flag: str, size: int = 28) -> str:
    """The file name ``medmnist`` looks for: ``{flag}.npz`` at 28 px, ``{flag}_{size}.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _expected_size(path: Path) -> int | None:
    """Image size the file name promises, if it promises one."""
    flag, size = parse_medmnist_filename(path)
    if size is not None:
        return size
    return 28 if flag in MEDMNIST_2D_FLAGS else None


def _check_name_size(path: Path, image_shape: tuple[int, int]) -> None:
    want = _expected_size(path)
    if want is not None and image_shape != (want, want):
        raise DataError(f"{path}: the file name means {want} x {want} px images (MedMNIST naming) but the images "
                        f"are {image_shape[0]} x {image_shape[1]}; name it "
                        f"{medmnist_filename(parse_medmnist_filename(path)[0], image_shape[0])}")


def _describe(image_shape: tuple[int, ...]) -> str:
    h, w = image_shape[:2]
    return f"{h} x {w} {'RGB' if len(image_shape) == 3 else 'grayscale'}"


def _medmnist_info(flag: str) -> dict | None:
    """``medmnist.INFO[flag]`` if medmnist is importable and knows the flag, else None (class names only:
    the class counts are in :data:`MEDMNIST_2D_CLASSES`)."""
    if flag not in MEDMNIST_2D_FLAGS:
        return None
    try:
        # medmnist's __init__ prints a notice when optional deps (pandas...) are missing.
        with contextlib.redirect_stdout(io.StringIO()):
            from medmnist.info import INFO
    except Exception:  # optional dependency: any failure to import just means "unknown"
        return None
    return INFO.get(flag)


def _member_dtype(npz: np.lib.npyio.NpzFile, member: str, path: Path) -> np.dtype:
    """dtype of one ``.npy`` member, read from its header only (no data, nothing unpickled)."""
    fmt = np.lib.format
    try:
        with npz.zip.open(member) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                _, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                _, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise DataError(f"{path}: member {member!r} uses .npy format version {version}, which is not supported")
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: member {member!r} is not a readable .npy array ({_one_line(e)})") from None
    return dtype


def load_medmnist(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate a MedMNIST-format ``.npz``; raise :class:`DataError` (one line) on any problem.

    The dataset's ``name`` is the flag from the file name, ``source`` the path,
    ``label_dtype`` the labels' dtype in the file (so :func:`save_medmnist` writes it back the same).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a MedMNIST .npz file")
    try:
        # We own the file object: np.load leaks its own handle when the zip directory is corrupt.
        fid = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or _one_line(e)})") from None
    with fid:
        return _load_open_npz(fid, path)


def _load_open_npz(fid, path: Path) -> Dataset:
    flag = parse_medmnist_filename(path)[0]
    if flag in MEDMNIST_MULTI_LABEL:
        raise DataError(f"{path}: {flag} is a multi-label task ({MEDMNIST_2D_CLASSES[flag]} binary findings per "
                        "image); salm-fast supports single-label multi-class data only")
    try:
        npz = np.load(fid, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz archive ({_one_line(e)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive with {{split}}_images/_labels")
    with npz:
        splits, label_dtype = _read_splits(npz, path, _split_names(npz, path))
    first = next(iter(splits.values()))
    _check_name_size(path, first.image_shape)
    n_classes = class_count({s: sp.labels for s, sp in splits.items()}, str(path), MEDMNIST_2D_CLASSES.get(flag),
                            known_as=flag if flag in MEDMNIST_2D_CLASSES else "")
    return Dataset(flag, splits, n_classes, source=str(path), label_names=_class_names(flag, n_classes),
                   label_dtype=label_dtype.name)


def _split_names(npz: np.lib.npyio.NpzFile, path: Path) -> list[str]:
    """The splits the archive holds, train first, after checking its members from their headers alone."""
    members = {}  # key -> member name in the zip
    for member in npz.zip.namelist():
        if not member.endswith(".npy"):
            raise DataError(f"{path}: member {member!r} is not a .npy array; not a MedMNIST .npz file")
        members[member[:-4]] = member
    for key, member in members.items():
        dtype = _member_dtype(npz, member, path)
        if dtype.hasobject:
            raise DataError(f"{path}: {key!r} is a pickled object array; refused (never unpickled)")
    known = {f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")}
    extra = sorted(set(members) - known)
    if extra:
        raise DataError(f"{path}: unexpected key(s) {', '.join(extra)}; a MedMNIST .npz holds only "
                        "{train,val,test}_{images,labels}")
    present = [s for s in SPLITS if f"{s}_images" in members or f"{s}_labels" in members]
    required = ["train"] + [s for s in present if s != "train"]
    missing = [f"{s}_{kind}" for s in required for kind in ("images", "labels") if f"{s}_{kind}" not in members]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    return required


def _read_splits(npz: np.lib.npyio.NpzFile, path: Path, names: list[str]) -> tuple[dict[str, Split], np.dtype]:
    """Each split's images and labels, validated; and the labels' dtype in the file (kept for the release)."""
    splits: dict[str, Split] = {}
    label_dtype: np.dtype | None = None
    first: tuple[str, tuple[int, ...]] | None = None
    for s in names:
        try:
            # An uncompressed member is memory-mapped (paged in as read), a compressed one read whole.
            images = stored_npy_memmap(path, f"{s}_images.npy")
            images = npz[f"{s}_images"] if images is None else images
            labels = npz[f"{s}_labels"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: split {s!r} cannot be read ({_one_line(e)})") from None
        check_images(images, f"{path}: {s}_images")
        if label_dtype is None:
            label_dtype = labels.dtype
        labels = check_labels(labels, images.shape[0], f"{path}: {s}_labels")
        if first is None:
            first = (s, images.shape[1:])
        elif images.shape[1:] != first[1]:
            raise DataError(f"{path}: {s}_images are {_describe(images.shape[1:])} but {first[0]}_images are "
                            f"{_describe(first[1])}; all splits must have the same size and channels")
        splits[s] = Split(images, labels)
    return splits, label_dtype


def _class_names(flag: str, n_classes: int) -> tuple[str, ...] | None:
    info = _medmnist_info(flag)
    names = (info or {}).get("label") or {}
    if len(names) != n_classes:
        return None
    return tuple(names[str(i)] for i in range(n_classes))


def save_medmnist(dataset: Dataset, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``dataset`` as a MedMNIST ``.npz``, atomically; return the path written.

    Keys, dtypes and shapes follow the format: ``{split}_images`` uint8 as stored,
    ``{split}_labels`` ``N x 1`` in ``dataset.label_dtype`` (the input file's label dtype;
    MedMNIST's is uint8), zip-deflated like the published files. Only images and labels are
    written (no noise, seed or clean copy). If ``path`` is an existing directory the file is
    named the ``medmnist`` way inside it (:func:`medmnist_filename`), so that e.g.
    ``BreastMNIST(split="train", root=path, size=...)`` loads it.

    Checked before anything is written: the directory is writable, an existing file is only
    replaced with ``overwrite=True``, a MedMNIST-style name matches the image size, and the
    labels fit their dtype. The write goes to a temporary file beside ``path`` that is
    fsynced and renamed into place; on any failure nothing is left behind and an existing
    file is untouched.
    """
    if not isinstance(dataset, Dataset):
        raise DataError(f"save_medmnist: expected a Dataset, got {type(dataset).__name__}")
    path = Path(path)
    if path.is_dir():
        if dataset.size is None:
            raise DataError(f"{path}: MedMNIST names need square images, got {dataset.image_shape}; give a file path")
        path = path / medmnist_filename(dataset.name, dataset.size)
    check_writable(path, overwrite=overwrite)
    _check_name_size(path, dataset.image_shape)
    label_dtype = np.dtype(dataset.label_dtype)
    top = max(int(s.labels.max()) for s in dataset.splits.values())
    if top > np.iinfo(label_dtype).max:
        raise DataError(f"{path}: label {top} does not fit the label dtype {label_dtype}")

    arrays = {f"{s}_images": np.ascontiguousarray(split.images) for s, split in dataset.splits.items()}
    arrays.update({f"{s}_labels": split.labels.astype(label_dtype) for s, split in dataset.splits.items()})
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path
