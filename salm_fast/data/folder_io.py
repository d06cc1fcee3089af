"""A folder of PNG/JPEG images with a labels CSV, in and out.

Layout (what :func:`save_image_folder` writes, and what :func:`load_image_folder` reads by default)::

    folder/
      labels.csv          header required: filename,label[,split]  (extra columns are ignored)
      train/000000.png    file names in labels.csv are relative to folder (any sub-folders)
      val/000000.png
      test/...

* ``label``: a class index 0, 1, ...; ``split``: ``train``, ``val`` or ``test`` (an empty cell
  or no split column means ``train``). Rows keep their order within each split.
* Images are read with PIL in mode ``L`` (grayscale) or ``RGB``; every image must have the
  same size and mode (the error names the odd file). Other modes (palette, RGBA, 16-bit)
  are refused rather than silently converted.
* JPEG is fine as input, but output is always PNG: JPEG's lossy compression would destroy a
  perturbation of a few grey levels, i.e. the protection itself.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import check_writable_dir
from .dataset import SPLITS, Dataset, Split, class_count
from .errors import DataError, UnwritableOutputError
from .outdir import make_staging_dir, publish_dir

__all__ = ["LABELS_CSV", "load_image_folder", "save_image_folder"]

#: Default labels file name inside the folder.
LABELS_CSV = "labels.csv"
_MODES = ("L", "RGB")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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


def _read_image(path: Path, shown: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{shown}: no such image file")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _MODES:
                raise DataError(f"{shown}: image mode {mode!r} is not supported; convert it to L (grayscale) or RGB")
            return np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{shown}: cannot read the image ({' '.join(str(e).split())})") from None


def load_image_folder(folder: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None) -> Dataset:
    """Read a folder of images listed in a labels CSV (default ``folder/labels.csv``) into a Dataset.

    File names in the CSV are relative to ``folder`` and must stay inside it (no absolute path,
    no ``..``, no symbolic link leading out). The dataset is named after the folder; the train
    split's labels define the classes (see :func:`~salm_fast.data.dataset.class_count`).
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a directory")
    csv_path = Path(labels_csv) if labels_csv is not None else folder / LABELS_CSV
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no labels CSV (expected filename,label[,split] with a header)")
    rows = _read_rows(csv_path)

    root = folder.resolve()
    seen: dict[str, int] = {}
    per_split: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    first: tuple[str, tuple[int, ...]] | None = None
    for name, label, split, line in rows:
        if name in seen:
            raise DataError(f"{csv_path}:{line}: {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        img = _read_image(_inside(root, folder, name, f"{csv_path}:{line}"), str(folder / name))
        if first is None:
            first = (name, img.shape)
        elif img.shape != first[1]:
            raise DataError(f"{folder / name}: is {_describe(img.shape)} but {first[0]} is {_describe(first[1])}; "
                            "all images must share size and mode")
        images, labels = per_split.setdefault(split, ([], []))
        images.append(img)
        labels.append(label)

    splits = {s: Split(np.stack(per_split[s][0]), np.array(per_split[s][1], dtype=np.int64))
              for s in SPLITS if s in per_split}
    n_classes = class_count({s: split.labels for s, split in splits.items()}, str(csv_path))
    return Dataset(root.name, splits, n_classes, source=str(folder),
                   label_dtype="uint8" if n_classes <= 256 else "int64")


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


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]} {'RGB' if len(shape) == 3 else 'L'}"


def save_image_folder(dataset: Dataset, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``dataset`` as lossless PNGs plus ``labels.csv`` (the layout above); return the folder.

    PNG only: JPEG would destroy a perturbation (see the module docstring). The folder
    appears complete or not at all: everything is written into a temporary folder beside it
    and renamed into place. An existing non-empty folder is refused unless ``overwrite=True``;
    then it is moved aside, replaced, and deleted only once the new one is in place (restored
    if the swap fails).
    """
    if not isinstance(dataset, Dataset):
        raise DataError(f"save_image_folder: expected a Dataset, got {type(dataset).__name__}")
    folder = Path(folder)
    check_writable_dir(folder.parent, folder)
    if folder.exists() and not folder.is_dir():
        raise UnwritableOutputError(f"{folder}: exists and is not a directory")
    non_empty = folder.is_dir() and any(folder.iterdir())
    if non_empty and not overwrite:
        raise UnwritableOutputError(f"{folder}: exists and is not empty (pass overwrite=True to replace it)")
    tmp = make_staging_dir(folder)
    try:
        rows = []
        for s, split in dataset.splits.items():
            (tmp / s).mkdir()
            width = max(6, len(str(len(split) - 1)))
            for i, (img, label) in enumerate(zip(split.images, split.labels[:, 0])):
                name = f"{s}/{i:0{width}d}.png"
                Image.fromarray(img).save(tmp / name, format="PNG")
                rows.append((name, int(label), s))
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

