"""Judging mini-SD images with the stack's digit classifiers: which style (domain judge) and which digit (the digit
judge of that style), on one-digit images or on each half of a two-digit canvas."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.digits.classifier import classifier_path, load_classifier
from difflab.digits.data import DOMAINS, SIZE
from difflab.io import load_json


@dataclass
class Verdict:
    digit: np.ndarray  # (N,) predicted digit
    domain: np.ndarray  # (N,) predicted domain index into DOMAINS


def to_judge_size(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 28, 28, 3), as the course's graders resize."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def halves(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right squares of two-digit canvases (N, H, 2H, 3)."""
    w = images.shape[2] // 2
    return images[:, :, :w], images[:, :, w:]


class Judges:
    def __init__(self, folder: str | os.PathLike, device: str | torch.device | None = "cpu"):
        folder = Path(folder)
        self.digit = {d: load_classifier(classifier_path(folder, d), device) for d in DOMAINS}
        self.domain = load_classifier(folder / "domain.safetensors", device)
        self.held_out = {p.stem: load_json(p).get("held_out_accuracy") for p in sorted(folder.glob("*.json"))}

    def __call__(self, images: np.ndarray) -> Verdict:
        x = to_judge_size(images)
        domain = self.domain.predict(x)
        digit = np.zeros(len(x), dtype=np.int64)
        for k, name in enumerate(DOMAINS):
            mine = domain == k
            if mine.any():
                digit[mine] = self.digit[name].predict(x[mine])
        return Verdict(digit, domain)


def rates(verdict: Verdict, digits: np.ndarray, domain: int | None) -> dict[str, float]:
    """Share of images with the wanted digit, of the wanted style (if any), and of both."""
    right_digit = verdict.digit == digits
    out = {"n": int(len(digits)), "digit_accuracy": float(right_digit.mean())}
    if domain is not None:
        right_style = verdict.domain == domain
        out["style_rate"] = float(right_style.mean())
        out["both"] = float((right_digit & right_style).mean())
    return out


def both_halves_right(judge, canvases: np.ndarray, digits: np.ndarray, styles) -> np.ndarray:
    """(N,) bool: the left half shows digits[:, 0] in style styles[..., 0] and the right half digits[:, 1] in
    styles[..., 1]; `styles` is one (left, right) pair for all canvases or one per canvas, (N, 2)."""
    styles = np.broadcast_to(np.asarray(styles), (len(canvases), 2))
    ok = np.ones(len(canvases), dtype=bool)
    for side, half in enumerate(halves(canvases)):
        v = judge(half)
        ok &= (v.digit == digits[:, side]) & (v.domain == styles[:, side])
    return ok
