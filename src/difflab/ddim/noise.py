"""Files of the DDIM exercise: noise tensors (`00.pt` ...), checkpoints, and images written the HW2 way
(min-max normalised per image, then 8-bit)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from difflab.io import atomic_write, load_rgb, read_torch, save_png
from difflab.utils import DifflabError

NOISE_SUFFIXES = (".pt", ".pth")


def list_noise_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DifflabError(f"{folder}: noise folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix in NOISE_SUFFIXES and p.is_file())
    if not files:
        raise DifflabError(f"{folder}: no noise files (*.pt) in this folder")
    return files


def load_noise(path: str | os.PathLike, channels: int | None = None) -> torch.Tensor:
    """One noise file as a float32 (1, C, H, W) tensor; (C, H, W) is accepted too."""
    path = Path(path)
    noise = read_torch(path, "noise")
    if not isinstance(noise, torch.Tensor):
        raise DifflabError(f"{path}: holds a {type(noise).__name__}, expected a noise tensor of shape (1, C, H, W)")
    if not noise.is_floating_point():
        raise DifflabError(f"{path}: noise has dtype {noise.dtype}, expected a floating-point tensor (float32)")
    if noise.ndim == 3:
        noise = noise.unsqueeze(0)
    if noise.ndim != 4 or noise.shape[0] != 1 or (channels is not None and noise.shape[1] != channels):
        c = "C" if channels is None else str(channels)
        raise DifflabError(f"{path}: noise has shape {tuple(noise.shape)}, expected (1, {c}, H, W) or ({c}, H, W)")
    if not bool(torch.isfinite(noise).all()):
        raise DifflabError(f"{path}: noise contains NaN or infinite values")
    return noise.float().contiguous()


def load_noises(files: list[Path], channels: int | None = None) -> torch.Tensor:
    """Stack noise files into one (N, C, H, W) batch; all must have the same shape."""
    noises = [load_noise(f, channels) for f in files]
    for f, n in zip(files, noises):
        if n.shape != noises[0].shape:
            raise DifflabError(
                f"{f}: noise shape {tuple(n.shape)} differs from {files[0].name}'s {tuple(noises[0].shape)}"
            )
    return torch.cat(noises)


def save_noise(noise: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (1, C, H, W) float32 noise tensor the way the exercise ships them."""
    noise = noise.detach().float().cpu().contiguous()
    return atomic_write(path, lambda tmp: torch.save(noise, tmp))


def minmax_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C) uint8, each image stretched to [0, 1] by its own min and max, then
    floor(255·v + 0.5) as the course's image saver does."""
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_pngs(images: torch.Tensor, names: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write `<out_dir>/<name>.png` per image, min-max normalised per image."""
    out_dir = Path(out_dir)
    return [save_png(arr, out_dir / f"{name}.png") for arr, name in zip(minmax_uint8(images), names)]


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) float32 tensor in [-1, 1]."""
    arr = np.asarray(load_rgb(path), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def load_uint8(path: str | os.PathLike) -> np.ndarray:
    return np.asarray(load_rgb(path), dtype=np.uint8)
