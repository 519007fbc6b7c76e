"""Small helpers shared by every part of difflab: the user-facing error, devices, seeds, image arrays.
File reading and writing lives in `difflab.io`."""

from __future__ import annotations

import random
import signal
import sys
import threading
import time

import numpy as np
import torch


class DifflabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code` (1)."""

    exit_code = 1


class Interrupted(DifflabError):
    """A run stopped on Ctrl-C or SIGTERM after saving what lets it continue; exits 130 like a shell's Ctrl-C."""

    exit_code = 130


class StopRequest:
    """Within `with StopRequest() as stop:`, the first Ctrl-C or SIGTERM only sets `stop.requested`, so a
    training loop can finish its step and save; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


def stream_seed(seed: int, offset: int = 0, stride: int = 1) -> int:
    """`seed * stride + offset` folded into the range torch's generators take (0 .. 2**63-1): a stream of its own
    per process or image, the same as unfolded for every seed small enough not to need the fold."""
    return (seed * stride + offset) % 2**63


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def count_flops(fn) -> int:
    """FLOPs of calling `fn()`, by torch's FLOP counter: the work, whatever the machine's speed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(B,C,H,W) float tensor in `value_range` -> (B,H,W,C) uint8 array."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


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


class Stages:
    """Runs the demo's stages one after the other and keeps their wall times for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {self.seconds[name]:.1f} s", flush=True)
        return result
