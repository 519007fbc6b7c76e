"""Captioned galleries of zero-shot results (the confusion matrix is `difflab.report.plots`)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

from difflab.io import atomic_write

# At 100 dpi, five 2-inch cells make a ~1020 px wide PNG: it fits the report's text column (1100 px) unscaled, so
# the 9-pt captions stay legible; more images wrap to further rows instead of widening the figure.
MAX_COLS = 5
CELL_INCHES = 2.0
GALLERY_DPI = 100
CAPTION_CHARS = 24  # ~1.8 inch of 9-pt text: one cell


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def plot_gallery(
    images: Sequence, captions: Sequence[str], path: str | os.PathLike, title: str = "", cols: int = MAX_COLS
) -> Path:
    """Images (PIL) with a caption above each, in rows of at most `cols`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    ncols = min(n, cols)
    nrows = -(-n // ncols)
    size = (CELL_INCHES * ncols, (CELL_INCHES + 0.45) * nrows + (0.35 if title else 0))  # + caption, title
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, cap in zip(axes.flat, images, captions):
        ax.imshow(im)
        # Wrapped, so a long "true -> predicted" pair cannot run into the neighbouring caption.
        ax.set_title(textwrap.fill(cap, CAPTION_CHARS), fontsize=9)
    if not images:
        axes[0][0].text(0.5, 0.5, "none", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=GALLERY_DPI)
