"""``load_dataset(spec)``: the one entry point the CLI uses to open a dataset.

Spec syntax:

* ``path/to/file.npz``: a MedMNIST-format file (:func:`load_medmnist`).
* ``path/to/folder``: an image folder with ``labels.csv`` (:func:`load_image_folder`): 8-bit
  PNG/JPEG, 16-bit PNG/TIFF or DICOM files; ``resize=(h, w)`` resizes every image on reading.
* ``combine:a.npz+b.npz``: the classes of several sources in one dataset
  (:func:`salm_fast.data.combine.combine`; b's labels follow a's).
* ``synthetic`` or ``synthetic:key=value,...``: the built-in dataset (:func:`make_synthetic`).
  Keys (integers): ``n`` (total images, split 70/10/20 like MedMNIST), or ``n_train``,
  ``n_val``, ``n_test``; ``size``; ``channels`` (1 or 3); ``classes`` (2-10); ``seed``.
  E.g. ``synthetic:channels=3,classes=3,n=600,size=28,seed=1``. The word ``synthetic``
  always means this dataset; write ``./synthetic`` for a file or folder of that name.
"""
from __future__ import annotations

import os
from pathlib import Path

from .dataset import Dataset
from .errors import DataError
from .folder_io import load_image_folder
from .medmnist_io import load_medmnist
from .synthetic import make_synthetic

__all__ = ["load_dataset", "parse_synthetic_spec"]

_SYNTHETIC_KEYS = {"n": "n", "n_train": "n_train", "n_val": "n_val", "n_test": "n_test", "size": "size",
                   "channels": "channels", "classes": "n_classes", "n_classes": "n_classes", "seed": "seed"}
_HELP = "expected an .npz file, an image folder with labels.csv, or synthetic[:key=value,...]"


def parse_synthetic_spec(spec: str) -> dict[str, int]:
    """``"synthetic:channels=3,n=600"`` -> keyword arguments for :func:`make_synthetic`."""
    head, _, body = spec.partition(":")
    if head.strip() != "synthetic":
        raise DataError(f"{spec!r}: not a synthetic dataset spec")
    kwargs: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq:
            raise DataError(f"{spec!r}: {item!r} is not key=value")
        if key not in _SYNTHETIC_KEYS:
            raise DataError(f"{spec!r}: unknown key {key!r}; known keys: n, n_train, n_val, n_test, size, "
                            "channels, classes, seed")
        name = _SYNTHETIC_KEYS[key]
        if name in kwargs:
            raise DataError(f"{spec!r}: {key!r} given twice")
        try:
            kwargs[name] = int(value)
        except ValueError:
            raise DataError(f"{spec!r}: {key}={value!r} is not an integer") from None
    if "n" in kwargs:
        if {"n_train", "n_val", "n_test"} & kwargs.keys():
            raise DataError(f"{spec!r}: give either n or n_train/n_val/n_test, not both")
        n = kwargs.pop("n")
        if n < 10:
            raise DataError(f"{spec!r}: n must be >= 10 to fill three splits, got {n}")
        kwargs["n_val"], kwargs["n_test"] = round(0.1 * n), round(0.2 * n)
        kwargs["n_train"] = n - kwargs["n_val"] - kwargs["n_test"]
    return kwargs


def load_dataset(spec: str | os.PathLike[str], *, resize: tuple[int, int] | str | None = None) -> Dataset:
    """Open a dataset from a path or a spec (see the module docstring); raise DataError otherwise.

    ``resize`` (``(h, w)`` or ``"HxW"``) applies to image folders only: other sources are refused with it.
    """
    if resize is not None:
        path = Path(spec) if isinstance(spec, (str, os.PathLike)) else None
        if path is None or not path.is_dir():
            raise DataError(f"{spec}: resize applies to image folders (PNG/JPEG/TIFF/DICOM with labels.csv) only")
        return load_image_folder(path, resize=resize)
    if isinstance(spec, str) and spec.partition(":")[0].strip() == "synthetic":
        return make_synthetic(**parse_synthetic_spec(spec))
    if isinstance(spec, str) and spec.startswith("combine:"):
        from .combine import combine

        parts = [p for p in spec[len("combine:"):].split("+") if p.strip()]
        if len(parts) < 2:
            raise DataError(f"{spec!r}: combine needs two or more sources joined by '+'")
        return combine([load_dataset(p.strip()) for p in parts])
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"dataset spec must be a path or a string, got {type(spec).__name__}")
    path = Path(spec)
    if not str(spec).strip():
        raise DataError(f"empty dataset spec; {_HELP}")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; {_HELP}")
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() == ".npz":
        return load_medmnist(path)
    raise DataError(f"{path}: unknown dataset format; {_HELP}")
