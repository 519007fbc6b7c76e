"""The README's figure, made from two demo runs: digits by domain and digit (`make demo`), a DDIM slerp strip from
the same model, and compositions of two learned styles (`make demo-personalize`).

Usage: python scripts/readme_figure.py runs/demo runs/personalize-demo [docs/difflab.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CELL = 30  # a 28-pixel digit and its 2-pixel frame in difflab's grids
COLUMNS = 5  # samples shown per digit and domain


def read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run the demo that makes it first")
    return np.asarray(Image.open(path).convert("RGB"))


def first_columns(grid: np.ndarray, n: int) -> np.ndarray:
    """The first `n` samples of every digit (row) of a 10x10 grid."""
    return grid[:, : n * CELL + 2]


def main(digits_run: str, personalize_run: str, out: str = "docs/difflab.png") -> None:
    figures, compose = Path(digits_run) / "figures", Path(personalize_run) / "compose"
    panels = {
        "MNIST-M style": first_columns(read(figures / "grid_mnistm.png"), COLUMNS),
        "SVHN style": first_columns(read(figures / "grid_svhn.png"), COLUMNS),
        "DDIM, η = 0: slerp between two noises": read(figures / "interp_slerp.png"),
        "compose: a digit in <new1>'s style (SVHN) next to one in <new2>'s (MNIST-M)": read(compose / "composed.png"),
    }
    fig = plt.figure(figsize=(12, 5.2), dpi=150)
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 2.4, 0.01], height_ratios=[1, 1.6], wspace=0.08, hspace=0.25)
    places = [grid[:, 0], grid[:, 1], grid[0, 2], grid[1, 2]]
    for (title, image), place in zip(panels.items(), places):
        ax = fig.add_subplot(place)
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9, wrap=True)
        ax.axis("off")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__.strip().splitlines()[-1])
    main(*sys.argv[1:])
