"""Captioned galleries of zero-shot results (the confusion matrix is `difflab.report.plots`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from difflab.io import atomic_write


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


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
