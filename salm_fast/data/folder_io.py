"""A folder of image files with a labels CSV, in and out: 8-bit PNG/JPEG, 16-bit PNG/TIFF, DICOM.

Layout (what :func:`save_image_folder` writes, and what :func:`load_image_folder` reads by default)::

    folder/
      labels.csv          header required: filename,label[,split]  (extra columns are ignored)
      train/000000.png    file names in labels.csv are relative to folder (any sub-folders)
      val/000000.png
      test/...

* ``label``: a class index 0, 1, ...; ``split``: ``train``, ``val`` or ``test`` (an empty cell
  or no split column means ``train``). Rows keep their order within each split.
* 8-bit images, read with PIL in mode ``L`` (grayscale) or ``RGB``, are the Dataset's uint8
  images. Their release is written as lossless PNGs (:func:`save_image_folder`, the layout
  above): JPEG is fine as input, but its lossy compression would destroy a perturbation of a
  few grey levels, i.e. the protection itself.
* 16-bit grayscale PNG/TIFF (PIL modes ``I;16``, ``I;16B``, and ``I`` holding 0..65535) and DICOM
  files (``.dcm``, :mod:`.dicom_io`, the ``dicom`` extra) are read at their stored depth into a
  :class:`~salm_fast.data.stored.FolderDataset`: the models see an 8-bit view, and the release
  is written back file for file (:func:`save_folder_release`): same names, same format and
  depth, the perturbation put on the stored grid (eps a fraction of the stored range).
* Every image must have the same size and kind (8-bit gray, 8-bit RGB, 16-bit gray; a folder is
  all DICOM or none); the first mismatch is named with both sizes. ``resize=(h, w)`` (CLI
  ``--resize HxW``) resizes every image on reading instead, with PIL's bilinear filter
  (:data:`~salm_fast.data.stored.RESIZE_FILTER`): the release is then of the resized images,
  and the summary says so. Other modes (palette, RGBA, 16-bit colour, 32-bit) are refused
  rather than silently converted.
"""
from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import check_writable_dir
from .dataset import SPLITS, Dataset, Split, class_count
from .errors import DataError, UnwritableOutputError
from .outdir import make_staging_dir, publish_dir
from .stored import RESIZE_FILTER, FolderDataset, StoredImage, StoredImages, perturb_stored, resize_stored, \
    stored_budget

__all__ = ["LABELS_CSV", "load_image_folder", "parse_resize", "save_folder_release", "save_image_folder",
           "write_folder_release"]

#: Default labels file name inside the folder.
LABELS_CSV = "labels.csv"
_MODES = ("L", "RGB")
_MODES_16 = ("I;16", "I;16B", "I;16L", "I")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_MAX_SIDE = 8192  # a resize beyond this is a typo, not a request


def _read_rows(csv_path: Path) -> list[tuple[str, int, str, int]]:
    """``(filename, label, split, line_number)`` per data row of the labels CSV."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path}: is empty; expected a header filename,label[,split]")
            cols = [h.strip().lower() for h in header]
            for need in ("filename", "label"):
                if need not in cols:
                    raise DataError(f"{csv_path}: header {','.join(header)!r} has no {need!r} column; "
                                    "expected filename,label[,split]")
            i_file, i_label = cols.index("filename"), cols.index("label")
            i_split = cols.index("split") if "split" in cols else None
            rows = []
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(cols):
                    raise DataError(f"{csv_path}:{line}: has {len(row)} fields, the header has {len(cols)}")
                name, label_text = row[i_file].strip(), row[i_label].strip()
                if not name:
                    raise DataError(f"{csv_path}:{line}: empty filename")
                if not (label_text.isascii() and label_text.isdigit()):
                    raise DataError(f"{csv_path}:{line}: label {label_text!r} is not a class index (0, 1, ...)")
                label = int(label_text)
                split = (row[i_split].strip().lower() if i_split is not None else "") or "train"
                if split not in SPLITS:
                    raise DataError(f"{csv_path}:{line}: split {row[i_split]!r} is not one of {', '.join(SPLITS)}")
                rows.append((name, label, split, line))
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the labels CSV ({' '.join(str(e).split())})") from None
    if not rows:
        raise DataError(f"{csv_path}: has a header but no rows")
    return rows


def _read_image(path: Path, shown: str) -> StoredImage:
    """One PNG/JPEG/TIFF file: 8-bit L/RGB as uint8, 16-bit grayscale as int32 (bits 16)."""
    if not path.is_file():
        raise DataError(f"{shown}: no such image file")
    try:
        with Image.open(path) as im:
            mode, fmt = im.mode, (im.format or "png").lower()
            wide = any(";16" in str(tile.args) for tile in im.tile)  # 16-bit colour: Pillow would read 8 bits
            if mode in _MODES and wide:
                raise DataError(f"{shown}: is 16-bit {mode}; 16-bit colour images are not supported "
                                "(Pillow reads them as 8-bit)")
            if mode in _MODES:
                return StoredImage(np.array(im, dtype=np.uint8), 8, fmt, mode)
            if mode not in _MODES_16:
                raise DataError(f"{shown}: image mode {mode!r} is not supported; convert it to L (grayscale), RGB "
                                "or 16-bit grayscale")
            pixels = np.array(im).astype(np.int32)
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{shown}: cannot read the image ({' '.join(str(e).split())})") from None
    if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) > 65535):
        raise DataError(f"{shown}: mode {mode} holds values in [{int(pixels.min())}, {int(pixels.max())}]; "
                        "only 16-bit images (0..65535) are supported")
    return StoredImage(pixels, 16, fmt, mode)


def _dicom_reader() -> Callable[[Path, str], StoredImage]:
    from .dicom_io import read_dicom, require_pydicom

    require_pydicom()  # one line naming the extra before any file is opened
    return read_dicom


def _kind(image: StoredImage) -> str:
    if image.fmt == "dicom":
        return f"{image.mode} {image.bits}-bit" if image.pixels.ndim == 2 else "RGB"
    return image.mode if image.bits == 8 else f"{image.bits}-bit"


def _describe(image: StoredImage) -> str:
    """Width x height and kind, as PIL names sizes: '8x9 L'."""
    h, w = image.pixels.shape[:2]
    return f"{w}x{h} {_kind(image)}"


def _check_like(shown: str, image: StoredImage, first_name: str, first: StoredImage, resizing: bool) -> None:
    """The same kind as the first image (channels; 8 vs 16 bits outside DICOM) and, unless resizing, size."""
    same_kind = image.pixels.ndim == first.pixels.ndim and (image.fmt == "dicom" or image.bits == first.bits)
    same_size = image.pixels.shape[:2] == first.pixels.shape[:2]
    if same_kind and (same_size or resizing):
        return
    hint = "" if same_size else " (width x height; resize=(h, w) or --resize HxW resizes every image)"
    raise DataError(f"{shown}: is {_describe(image)} but {first_name} is {_describe(first)}; all images must share "
                    f"size and mode{hint}")


def parse_resize(value: Any) -> tuple[int, int] | None:
    """``"64x48"`` (height x width), ``(64, 48)`` or None -> ``(h, w)`` or None; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"resize must be HxW in pixels, e.g. 64x64, got {value!r}")
        value = (int(parts[0]), int(parts[1]))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"resize must be (height, width) in pixels, got {value!r}")
    h, w = int(value[0]), int(value[1])
    if not (1 <= h <= _MAX_SIDE and 1 <= w <= _MAX_SIDE):
        raise ValueError(f"resize must be between 1 and {_MAX_SIDE} pixels a side, got {h}x{w}")
    return h, w


def load_image_folder(folder: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None, *,
                      resize: tuple[int, int] | str | None = None) -> Dataset:
    """Read a folder of images listed in a labels CSV (default ``folder/labels.csv``) into a Dataset.

    File names in the CSV are relative to ``folder`` and must stay inside it (no absolute path,
    no ``..``, no symbolic link leading out). The dataset is named after the folder; the train
    split's labels define the classes (see :func:`~salm_fast.data.dataset.class_count`).
    8-bit PNG/JPEG folders give a plain :class:`Dataset`; 16-bit PNG/TIFF and DICOM folders, and any
    folder read with ``resize=(h, w)``, a :class:`~salm_fast.data.stored.FolderDataset` (module doc).
    """
    size = parse_resize(resize)
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a directory")
    csv_path = Path(labels_csv) if labels_csv is not None else folder / LABELS_CSV
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no labels CSV (expected filename,label[,split] with a header)")
    rows = _read_rows(csv_path)
    dicom = [name.lower().endswith(".dcm") for name, *_ in rows]
    if any(dicom) and not all(dicom):
        names = [rows[dicom.index(True)][0], rows[dicom.index(False)][0]]
        raise DataError(f"{csv_path}: lists DICOM and other image files ({names[0]}, {names[1]}); "
                        "a folder holds one or the other")
    read = _dicom_reader() if all(dicom) else _read_image

    root = folder.resolve()
    seen: dict[str, int] = {}
    per_split: dict[str, tuple[list[str], list[StoredImage], list[int]]] = {}
    first: tuple[str, StoredImage] | None = None
    resized = 0
    for name, label, split, line in rows:
        if name in seen:
            raise DataError(f"{csv_path}:{line}: {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        image = read(_inside(root, folder, name, f"{csv_path}:{line}"), str(folder / name))
        if first is None:
            first = (name, image)
        else:
            _check_like(str(folder / name), image, *first, resizing=size is not None)
        if size is not None and image.pixels.shape[:2] != size:
            image, resized = resize_stored(image, size), resized + 1
        names, images, labels = per_split.setdefault(split, ([], [], []))
        names.append(name)
        images.append(image)
        labels.append(label)

    order = [s for s in SPLITS if s in per_split]
    labels = {s: np.array(per_split[s][2], dtype=np.int64) for s in order}
    n_classes = class_count(labels, str(csv_path))
    label_dtype = "uint8" if n_classes <= 256 else "int64"
    if size is None and not any(im.full_depth for s in order for im in per_split[s][1]):
        splits = {s: Split(np.stack([im.pixels for im in per_split[s][1]]).astype(np.uint8), labels[s]) for s in order}
        return Dataset(root.name, splits, n_classes, source=str(folder), label_dtype=label_dtype)
    stored = {s: StoredImages.stack(per_split[s][0], per_split[s][1]) for s in order}
    splits = {s: Split(stored[s].view(), labels[s]) for s in order}
    note = None if size is None else {"to": list(size), "filter": RESIZE_FILTER, "images_resized": resized,
                                      "images": len(rows), "note": "the release holds the resized images"}
    return FolderDataset(root.name, splits, n_classes, source=str(folder), label_dtype=label_dtype, stored=stored,
                         resized=note)


def _inside(root: Path, folder: Path, name: str, row: str) -> Path:
    """``folder / name``, refused (naming the CSV row) if it leads out of the folder: a labels file
    must not make the reader open files elsewhere on the machine."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DataError(f"{row}: {name!r} is not a path inside {folder}; file names must be relative to the "
                        "folder, without '..'")
    path = folder / relative
    if not path.resolve().is_relative_to(root):
        raise DataError(f"{row}: {name!r} is a symbolic link leading out of {folder}; refused")
    return path


# ------------------------------------------------------------------------------ writing
def _write_folder(folder: str | os.PathLike[str], overwrite: bool,
                  fill: Callable[[Path], list[tuple[str, int, str]]]) -> Path:
    """Publish a folder whole: ``fill(tmp)`` writes the images into a staging folder beside ``folder``
    and returns the labels.csv rows; then labels.csv, and one rename (module :mod:`.outdir`)."""
    folder = Path(folder)
    check_writable_dir(folder.parent, folder)
    if folder.exists() and not folder.is_dir():
        raise UnwritableOutputError(f"{folder}: exists and is not a directory")
    non_empty = folder.is_dir() and any(folder.iterdir())
    if non_empty and not overwrite:
        raise UnwritableOutputError(f"{folder}: exists and is not empty (pass overwrite=True to replace it)")
    tmp = make_staging_dir(folder)
    try:
        rows = fill(tmp)
        with open(tmp / LABELS_CSV, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("filename", "label", "split"))
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_image_folder(dataset: Dataset, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``dataset``'s uint8 images as lossless PNGs plus ``labels.csv`` (the layout above); return the folder.

    PNG only: JPEG would destroy a perturbation (see the module docstring). The folder
    appears complete or not at all: everything is written into a temporary folder beside it
    and renamed into place. An existing non-empty folder is refused unless ``overwrite=True``;
    then it is moved aside, replaced, and deleted only once the new one is in place (restored
    if the swap fails).
    """
    if not isinstance(dataset, Dataset):
        raise DataError(f"save_image_folder: expected a Dataset, got {type(dataset).__name__}")

    def fill(tmp: Path) -> list[tuple[str, int, str]]:
        rows = []
        for s, split in dataset.splits.items():
            (tmp / s).mkdir()
            width = max(6, len(str(len(split) - 1)))
            for i, (img, label) in enumerate(zip(split.images, split.labels[:, 0])):
                name = f"{s}/{i:0{width}d}.png"
                Image.fromarray(img).save(tmp / name, format="PNG")
                rows.append((name, int(label), s))
        return rows

    return _write_folder(folder, overwrite, fill)


def _write_pil(dest: Path, image: StoredImage, pixels: np.ndarray) -> None:
    """A 16-bit PNG/TIFF in its own format and mode (a PNG read as mode I is written as I;16)."""
    if image.fmt == "png" or image.mode in ("I;16", "I;16L"):
        im = Image.fromarray(pixels.astype(np.uint16))
    elif image.mode == "I;16B":
        h, w = pixels.shape
        im = Image.frombytes("I;16B", (w, h), pixels.astype(">u2").tobytes())
    else:
        im = Image.fromarray(pixels.astype(np.int32))  # mode I
    im.save(dest, format=image.fmt.upper())


def _description(image: StoredImage, eps: float, perturbed: bool, resized: Mapping[str, Any] | None,
                 before: tuple[int, ...]) -> str | None:
    """What was done to one file of size ``before`` (for DICOM's DerivationDescription; nothing from its
    header); None when nothing was."""
    from .. import __version__
    from ..release import stored_budget_levels

    parts = []
    if resized and tuple(before[:2]) != tuple(resized["to"]):
        parts.append(f"resized to {resized['to'][0]}x{resized['to'][1]} ({resized['filter']})")
    if perturbed:
        parts.append(f"unlearnable-example perturbation of the pixel data, at most "
                     f"{stored_budget_levels(eps, image.maxval)} of {image.maxval} stored levels (eps {eps:.6g})")
    return f"salm-fast {__version__}: " + "; ".join(parts) if parts else None


def save_folder_release(dataset: FolderDataset, folder: str | os.PathLike[str], perturbations: Mapping[str, Any],
                        eps: float, *, k: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the release of a folder read at its stored depth: every file under its own name, format and depth.

    ``perturbations``: split -> float perturbation ``N x C x H x W`` in [0, 1] units of the 8-bit
    view (what a method computed); it goes onto each file's stored grid (:func:`perturb_stored`)
    and the budget is verified on the stored values (``eps``, and ``k`` pixels per image when
    given: a violation raises RuntimeError). Files of splits not perturbed are copied byte for byte
    (re-encoded if they were resized). Published whole like :func:`save_image_folder`. Returns the
    stored budget per perturbed split.
    """
    if not isinstance(dataset, FolderDataset) or not dataset.full_depth:
        raise DataError("save_folder_release: expected a FolderDataset read from 16-bit or DICOM files")
    unknown = sorted(set(perturbations) - set(dataset.splits))
    if unknown:
        raise DataError(f"save_folder_release: no split {', '.join(unknown)} in dataset {dataset.name!r}")
    source = Path(dataset.source)
    budgets: dict[str, Any] = {}

    def fill(tmp: Path) -> list[tuple[str, int, str]]:
        from .dicom_io import write_dicom

        rows = []
        for s, stored in dataset.stored.items():
            perturbed = s in perturbations
            new = perturb_stored(stored, perturbations[s], eps) if perturbed else stored.pixels
            written = []
            for i, name in enumerate(stored.names):
                dest, image = tmp / name, stored.image(i)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not perturbed and dataset.resized is None:
                    shutil.copyfile(source / name, dest)
                    written.append(stored.pixels[i])
                elif image.fmt == "dicom":
                    text = partial(_description, image, eps, perturbed, dataset.resized)
                    written.append(write_dicom(source / name, dest, image, new[i], text, shown=str(source / name)))
                else:
                    _write_pil(dest, image, new[i])
                    written.append(new[i])
                rows.append((name, int(dataset[s].labels[i, 0]), s))
            if perturbed:
                budgets[s] = stored_budget(stored, np.stack(written), eps, k)
        return rows

    _write_folder(folder, overwrite, fill)
    return budgets


def write_folder_release(data: Dataset, released: Dataset, folder: str | os.PathLike[str],
                         perturbations: Callable[[], Mapping[str, Any]], eps: float, *,
                         k: int | None = None) -> dict[str, Any]:
    """The release of an image-folder input: at the files' depth (:func:`save_folder_release`) when
    ``data`` was read from 16-bit or DICOM files, else ``released``'s uint8 images as PNGs
    (:func:`save_image_folder`). ``perturbations()`` gives split -> float perturbation; it is called
    only for files kept at their depth (the only release that needs the float perturbation whole).
    Returns what the summary says about it: the input files (``input_files``: format, stored bit
    depths, a resize) and the budget on the stored values (``stored_budget``, per perturbed split)."""
    if not isinstance(data, FolderDataset):
        save_image_folder(released, folder)
        return {}
    info: dict[str, Any] = {"input_files": data.describe()}
    if data.full_depth:
        info["stored_budget"] = save_folder_release(data, folder, perturbations(), eps, k=k)
    else:
        save_image_folder(released, folder)
    return info
