"""Class-combined datasets: the classes of several sources side by side in one dataset.

``combine([a, b])`` keeps a's classes as 0..a-1 and appends b's as a..a+b-1, split by split.
It answers a data owner's question: if my protected classes end up mixed with clean
classes from somewhere else, does a model trained on the mixture still fail on mine?
(Protect only the first source's classes with SALM's ``classes`` option and compare the
per-class test accuracy.) Sources must share image size and channel count.

Spec for :func:`salm_fast.data.load_dataset`: ``combine:first.npz+second.npz``.
"""
from __future__ import annotations

import numpy as np

from .dataset import SPLITS, Dataset, Split
from .errors import DataError


def combine(datasets: list[Dataset], name: str | None = None) -> Dataset:
    if len(datasets) < 2:
        raise DataError("combine needs at least two datasets")
    first = datasets[0]
    for d in datasets[1:]:
        if d.channels != first.channels or d.image_shape != first.image_shape:
            raise DataError(f"combine: {d.name} has {d.channels} x {d.image_shape} images, "
                            f"{first.name} has {first.channels} x {first.image_shape}")
    splits = {}
    for s in SPLITS:
        parts = [d for d in datasets if s in d.splits]
        if len(parts) != len(datasets):
            continue  # a split only some sources have is left out
        offsets = np.cumsum([0] + [d.n_classes for d in datasets[:-1]])
        images = np.concatenate([d[s].images for d in datasets])
        labels = np.concatenate([d[s].labels + off for d, off in zip(datasets, offsets)])
        splits[s] = Split(images, labels)
    if "train" not in splits:
        raise DataError("combine: the sources share no train split")
    names = []
    for d in datasets:
        own = d.label_names or [str(i) for i in range(d.n_classes)]
        names += [f"{d.name}:{n}" for n in own]
    return Dataset(name or "+".join(d.name for d in datasets), splits, sum(d.n_classes for d in datasets),
                   source="combine", label_names=names)
