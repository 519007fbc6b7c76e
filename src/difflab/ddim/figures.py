"""The DDIM figures: an η grid and interpolation strips, each written as a PNG and as a report section."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from difflab.ddim.noise import minmax_uint8
from difflab.io import save_png
from difflab.report import HtmlReport
from difflab.utils import image_grid


def eta_grid_figure(
    images: torch.Tensor, noise_names: Sequence[str], etas: Sequence[float], out_dir: Path, report: HtmlReport
) -> Path:
    """`images` (noises, etas, C, H, W) -> `eta_grid.png`, rows = noises, columns = η."""
    rows, cols = images.shape[:2]
    path = save_png(image_grid(minmax_uint8(images.flatten(0, 1)), rows, cols), Path(out_dir) / "eta_grid.png")
    report.heading("DDIM: noise × η")
    report.text(
        f"Rows: noises {', '.join(noise_names)}. Columns: η = {', '.join(f'{e:g}' for e in etas)}. "
        "η = 0 is deterministic; larger η adds fresh noise at every step and drifts from the η = 0 image."
    )
    report.image(path, caption="rows = noise, columns = η", pixelated=True)
    return path


def interpolation_figure(
    strips: dict[str, torch.Tensor], alphas: Sequence[float], names: tuple[str, str], out_dir: Path, report: HtmlReport
) -> list[Path]:
    """One `interp_<method>.png` strip per method, α increasing left to right."""
    report.heading(f"Interpolating noise {names[0]} → {names[1]}")
    report.text(
        f"α = {', '.join(f'{a:g}' for a in alphas)} (α = 0 is {names[0]}, α = 1 is {names[1]}). "
        "lerp shrinks the norm of mid-way noises, so those images wash out; slerp keeps it."
    )
    paths = []
    for method, images in strips.items():
        path = save_png(image_grid(minmax_uint8(images), 1, len(images)), Path(out_dir) / f"interp_{method}.png")
        report.image(path, caption=method, pixelated=True)
        paths.append(path)
    return paths
