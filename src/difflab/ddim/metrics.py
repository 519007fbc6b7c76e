"""The HW2 grading metric: per-image MSE over all 8-bit RGB values, averaged over images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflab.ddim.noise import load_uint8
from difflab.io import image_files
from difflab.utils import DifflabError


@dataclass
class MSEResult:
    per_image: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_image.values())))


def _pngs(folder: Path, side: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DifflabError(f"{folder}: {side} folder not found")
    files = {p.name: p for p in image_files(folder, None)}
    if not files:
        raise DifflabError(f"{folder}: no images in the {side} folder")
    return files


def image_mse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean of (pred - gt)^2 over all values, in floats (uint8 arithmetic would wrap around)."""
    return float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))


def mse_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> MSEResult:
    """Compare `pred/NN.png` with `gt/NN.png` for every file name; both sides must hold the same names."""
    pred, gt = _pngs(Path(pred_dir), "prediction"), _pngs(Path(gt_dir), "ground-truth")
    only_gt, only_pred = sorted(gt.keys() - pred.keys()), sorted(pred.keys() - gt.keys())
    if only_gt or only_pred:
        parts = [
            f"missing in {pred_dir}: {', '.join(only_gt)}" if only_gt else "",
            f"missing in {gt_dir}: {', '.join(only_pred)}" if only_pred else "",
        ]
        raise DifflabError("file names differ; " + "; ".join(p for p in parts if p))
    per_image = {}
    for name in sorted(gt):
        a, b = load_uint8(pred[name]), load_uint8(gt[name])
        if a.shape != b.shape:
            raise DifflabError(
                f"{pred[name]}: size {a.shape[1]}x{a.shape[0]} differs from {gt[name]} ({b.shape[1]}x{b.shape[0]})"
            )
        per_image[name] = image_mse(a, b)
    return MSEResult(per_image)
