"""The figures several jobs draw: a confusion matrix and a training-loss curve, written as PNG atomically.
Built on `matplotlib.figure.Figure` (no pyplot: no GUI backend, no global state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from difflab.io import atomic_write


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix (rows normalised to recall)",
) -> Path:
    """Row-normalised (recall per true class) heat map; counts are written in the cells while they fit, so it
    stays legible from 10 to 100 classes."""
    from matplotlib.figure import Figure

    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = max(4.6, 0.24 * n + 2)  # ~0.24 inch per class keeps 7-pt tick labels apart
    font = 9 if n <= 30 else 7
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 10 else 0, fontsize=font)
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i, j in zip(*np.nonzero(cm)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font - 1, color=color)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | os.PathLike,
    xlabel: str = "step",
    smooth: int = 0,
    log: bool = False,
) -> Path:
    """Loss against steps; with `smooth` > 1 a running mean over that many points is drawn over the raw curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=120)
    ax = fig.add_subplot()
    losses = np.asarray(losses, dtype=float)
    ax.plot(steps, losses, lw=0.5 if smooth > 1 else 1.0, alpha=0.4 if smooth > 1 else 1.0, label="loss")
    if smooth > 1 and len(losses) >= smooth:
        mean = np.convolve(losses, np.ones(smooth) / smooth, "valid")
        ax.plot(np.asarray(steps)[smooth - 1 :], mean, label=f"mean of {smooth}")
        ax.legend()
    ax.set(xlabel=xlabel, ylabel="training loss", yscale="log" if log else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def plot_frontier(
    curves: dict[str, list[tuple[float, float, str]]],
    reference: dict[str, tuple[float, float]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One line per curve through its (x, y, label) points, each point labelled, and each curve's reference point
    (the real data; `reference` has the curves' names) as a star of its colour: a trade-off such as accuracy against
    a distance over guidance."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.8), dpi=120)
    ax = fig.add_subplot()
    for name, points in curves.items():
        xs, ys, labels = zip(*points)
        (line,) = ax.plot(xs, ys, "o-", label=name)
        for x, y, text in points:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=line.get_color())
        if name in reference:
            ax.plot(*reference[name], "*", markersize=13, color=line.get_color(), label=f"{name}: real data")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=120)
