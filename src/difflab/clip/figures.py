"""Figures for zero-shot results: a confusion matrix that stays legible at 50-100 classes, and captioned galleries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from difflab.io import atomic_write


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Row-normalised (recall per true class) heat map; counts are written in the cells only while they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = max(6.0, 0.24 * n + 2)  # ~0.24 inch per class keeps 7-pt tick labels apart
    font = 9 if n <= 30 else 7
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (rows normalised to recall)")
    if n <= 30:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=font - 1,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)


def plot_gallery(images: Sequence, captions: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """One row of images (PIL) with a caption above each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.2), squeeze=False, layout="constrained")
    for ax in axes[0]:
        ax.axis("off")
    for ax, im, cap in zip(axes[0], images, captions):
        ax.imshow(im)
        ax.set_title(cap, fontsize=9)
    if not images:
        axes[0][0].text(0.5, 0.5, "none", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
