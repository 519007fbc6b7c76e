"""CLIP image preprocessing split in two halves so it batches well.

The per-image half (resize the shortest side with PIL bicubic, center crop, keep uint8) runs in DataLoader
workers; the per-batch half (scale to [0,1], subtract CLIP mean, divide by std) runs once on the whole batch on
the model's device. Together they give the same pixels as transformers' CLIP image processor (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def _size_field(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass(frozen=True)
class ClipTransform:
    shortest_edge: int | None  # resize so the short side has this length (None: resize to height x width)
    height: int
    width: int
    crop_height: int | None
    crop_width: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BICUBIC
    scale: float = 1 / 255

    @classmethod
    def from_processor(cls, processor) -> "ClipTransform":
        size, crop = processor.size, processor.crop_size if processor.do_center_crop else None
        return cls(
            shortest_edge=_size_field(size, "shortest_edge"),
            height=_size_field(size, "height"),
            width=_size_field(size, "width"),
            crop_height=_size_field(crop, "height") if crop else None,
            crop_width=_size_field(crop, "width") if crop else None,
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            resample=int(processor.resample),
            scale=float(processor.rescale_factor),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing; the long side is truncated like transformers does."""
        if self.shortest_edge is None:
            return self.width, self.height
        s = self.shortest_edge
        if width <= height:
            return s, int(s * height / width)
        return int(s * width / height), s

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3,H,W) uint8 tensor, resized and center-cropped."""
        image = image.convert("RGB")
        image = image.resize(self.resized_size(*image.size), resample=self.resample)
        x = np.asarray(image)
        if self.crop_height is not None:
            x = _center_crop(x, self.crop_height, self.crop_width)
        return torch.from_numpy(np.array(x)).permute(2, 0, 1)  # copy: PIL buffers are read-only

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) uint8 -> normalised float32, on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() * self.scale - mean) / std


def _center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Crop (H,W,C) to (h,w) around the centre; pad with zeros where the image is smaller (as transformers does)."""
    H, W = x.shape[:2]
    if H < h or W < w:
        ph, pw = max(h - H, 0), max(w - W, 0)
        x = np.pad(x, (((ph + 1) // 2, ph // 2), ((pw + 1) // 2, pw // 2), (0, 0)))
        H, W = x.shape[:2]
    top, left = (H - h) // 2, (W - w) // 2
    return x[top : top + h, left : left + w]
