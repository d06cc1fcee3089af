"""Figures (PNG): where people would rather look than read.

* :func:`protection_figure`: clean | protected | amplified |delta| | mask, a few
  images per class, so a data owner sees that the release looks unchanged and where
  the perturbation sits;
* :func:`learning_curves`: a victim's train and test accuracy per epoch on clean vs
  protected data (the release is fitted, the real images are not learned).

Files are written atomically. Figures are drawn on :class:`matplotlib.figure.Figure` objects and
saved through the Agg canvas directly: no pyplot, no backend switching, so a caller's notebook
or GUI backend is left as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data.atomic import atomic_path


def new_figure(width: float, height: float):
    """A figure of ``width`` x ``height`` inches on its own Agg canvas, outside pyplot's registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _show(ax, img: np.ndarray, **kw) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def protection_figure(clean: np.ndarray, release: np.ndarray, mask: Any, labels: np.ndarray, path: str | Path, *,
                      per_class: int = 2, max_classes: int = 4, class_names: Sequence[str] | None = None,
                      title: str = "") -> Path:
    """Rows: a few images of each class; columns: clean, protected, |delta| x (255/max), mask.

    ``clean``/``release``: uint8 in storage layout (N x H x W or N x H x W x 3);
    ``mask``: N x 1 x H x W (tensor or array); ``labels``: N class indices.
    """
    mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)[:, 0]
    labels = np.asarray(labels).reshape(-1)
    rows = [i for c in np.unique(labels)[:max_classes] for i in np.flatnonzero(labels == c)[:per_class]]
    diff = np.abs(release.astype(np.int16) - clean.astype(np.int16))
    diff = diff.max(axis=-1) if diff.ndim == 4 else diff
    scale = 255.0 / max(1, int(diff.max()))
    cols = ["clean", "protected", f"|delta| x{scale:.0f}", "mask"]
    fig = new_figure(6.4, 1.7 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for r, i in enumerate(rows):
        _show(axes[r, 0], clean[i], vmin=0, vmax=255)
        _show(axes[r, 1], release[i], vmin=0, vmax=255)
        _show(axes[r, 2], np.clip(diff[i] * scale, 0, 255).astype(np.uint8), vmin=0, vmax=255)
        _show(axes[r, 3], mask[i], vmin=0, vmax=1)
        name = class_names[labels[i]] if class_names is not None and labels[i] < len(class_names) else str(labels[i])
        axes[r, 0].set_ylabel(str(name)[:14], fontsize=8)
    for c, label in enumerate(cols):
        axes[0, c].set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def learning_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str = "") -> Path:
    """Train and test accuracy per epoch for each named run (e.g. clean vs release)."""
    fig = new_figure(6.0, 3.6)
    ax = fig.subplots()
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple"]
    for (name, hist), color in zip(histories.items(), colors):
        epochs = [h["epoch"] for h in hist]
        if any(h.get("train_acc") is not None for h in hist):
            ax.plot(epochs, [h.get("train_acc") for h in hist], "--", color=color, label=f"{name}: train")
        pts = [(h["epoch"], h["test_acc"]) for h in hist if h.get("test_acc") is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", ms=3, color=color, label=f"{name}: clean test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
