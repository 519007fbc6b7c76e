"""Small helpers shared by every part of difflab: errors, devices, seeds, atomic files, images."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DifflabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 1."""


def pick_device(device: str | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when present, else CPU; anything else is passed to torch."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DifflabError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DifflabError(f"device {device!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return atomic_write(path, write)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DifflabError(f"{path}: not valid JSON ({e})") from None


def load_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB; a missing, corrupt or non-image file raises a one-line DifflabError."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DifflabError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if size is not None and im.size != size:
        raise DifflabError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
    return im


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def image_files(folder: str | os.PathLike, what: str | None = "image") -> list[Path]:
    """Image files directly in `folder`, sorted by name. With `what` (e.g. "reference image"), a missing
    folder or one without images is a DifflabError naming it; with what=None an empty list is returned."""
    folder = Path(folder)
    if not folder.is_dir():
        if what is None:
            return []
        raise DifflabError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and what is not None:
        raise DifflabError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this {what} folder")
    return files


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(B,C,H,W) float tensor in `value_range` -> (B,H,W,C) uint8 array."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one (H,W,C) uint8 array as PNG, atomically."""
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N,H,W,C) uint8 images row-major into one (rows*H, cols*W, C) array with padding."""
    n, h, w, c = images.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid
