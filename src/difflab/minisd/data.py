"""Captioned digits for the miniature Stable Diffusion: images in a Hugging Face `imagefolder` layout.

    <root>/metadata.jsonl   one JSON object per line: {"file_name", "text", "digits", "domains"}
    <root>/<file_name>      32x32 RGB (one digit) or 32x64 RGB (two digits side by side)

`text` names the digits in varied words and templates and never the domain (MNIST-M- or SVHN-like): the model
can draw the style but has no word for it, which is what textual inversion is for. `digits` / `domains` are
the labels difflab measures with; training reads only `file_name` and `text`, as diffusers' text-to-image
example does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.digits.data import DOMAINS, generate_split
from difflab.io import atomic_write, load_rgb, read_text, save_pngs
from difflab.utils import DifflabError

SIZE = 32  # the 28x28 digits are resized to a size the 4x-downsampling VAE divides evenly
METADATA = "metadata.jsonl"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {n}: the digit as a word or a numeral, chosen at random; {a}: an optional photo adjective. Words that CLIP
# zero-shot and textual-inversion templates use ("photo", "a close-up", "blurry") appear, the domain never.
SINGLE_TEMPLATES = (
    "a photo of the number {n}",
    "the number {n}",
    "the digit {n}",
    "{n}",
    "a photo of a {n}",
    "a {a}photo of the digit {n}",
    "an image of the number {n}",
    "a picture of a {n}",
    "a {a}picture of the number {n}",
    "a close-up photo of the digit {n}",
    "the {a}number {n}",
    "a {n}",
)
PAIR_TEMPLATES = (
    "the number {n} next to the number {m}",
    "a photo of the number {n} next to the number {m}",
    "{n} next to {m}",
    "the digit {n} and the digit {m}",
    "a {a}picture of the number {n} next to the number {m}",
)
ADJECTIVES = ("", "", "", "blurry ", "dark ", "bright ", "good ", "bad ", "small ", "large ", "cropped ", "clean ")


def number_name(digit: int, rng: np.random.Generator) -> str:
    return NUMBER_WORDS[digit] if rng.random() < 0.5 else str(digit)


def caption(digits: tuple[int, ...], rng: np.random.Generator) -> str:
    """A random caption for one digit or a left-right pair; never mentions the style."""
    templates = SINGLE_TEMPLATES if len(digits) == 1 else PAIR_TEMPLATES
    text = templates[rng.integers(len(templates))]
    names = [number_name(d, rng) for d in digits]
    text = text.format(n=names[0], m=names[-1], a=ADJECTIVES[rng.integers(len(ADJECTIVES))])
    # "a 8" -> "an 8", "a eight" -> "an eight"
    return " ".join(
        "an" if w == "a" and nxt[:1] in "8aeiou" else w for w, nxt in zip(text.split(), text.split()[1:] + [""])
    )


@dataclass
class CaptionedDigits:
    """Images (N, H, W, 3) uint8 with one caption and label set each; all images of one set share a size."""

    images: np.ndarray
    texts: list[str]
    digits: list[tuple[int, ...]]
    domains: list[tuple[str, ...]]


def resize(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """uint8 (N, 28, 28, 3) -> uint8 (N, size, size, 3), bilinear with antialiasing."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def single_digits(n_per_domain: int, seed: int, split: str = "train") -> CaptionedDigits:
    """`n_per_domain` digits of each style (labels balanced), shuffled together, one caption each."""
    rng = np.random.default_rng([seed, 7])
    images, digits, domains = [], [], []
    for domain in DOMAINS:
        x, y = generate_split(domain, n_per_domain, seed, split)
        images.append(resize(x))
        digits += [(int(d),) for d in y]
        domains += [(domain,)] * len(y)
    order = rng.permutation(len(digits))
    images = np.concatenate(images)[order]
    digits = [digits[i] for i in order]
    domains = [domains[i] for i in order]
    return CaptionedDigits(images, [caption(d, rng) for d in digits], digits, domains)


def digit_pairs(singles: CaptionedDigits, n: int, seed: int) -> CaptionedDigits:
    """`n` canvases of two random single digits side by side, each keeping its own style."""
    rng = np.random.default_rng([seed, 11])
    left, right = rng.integers(len(singles.digits), size=(2, n))
    images = np.concatenate([singles.images[left], singles.images[right]], axis=2)
    digits = [singles.digits[a] + singles.digits[b] for a, b in zip(left, right)]
    domains = [singles.domains[a] + singles.domains[b] for a, b in zip(left, right)]
    return CaptionedDigits(images, [caption(d, rng) for d in digits], digits, domains)


def write_imagefolder(data: CaptionedDigits, root: str | os.PathLike, prefix: str = "") -> list[dict]:
    """Write the images as PNG under `root` and return their metadata rows (the caller writes the JSONL)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows, items = [], []
    for i, (image, text, digits, domains) in enumerate(zip(data.images, data.texts, data.digits, data.domains)):
        name = f"{prefix}{i:05d}.png"
        items.append((root / name, image))
        rows.append({"file_name": name, "text": text, "digits": list(digits), "domains": list(domains)})
    save_pngs(items, desc="captioned digits")
    return rows


def write_metadata(rows: list[dict], root: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    return atomic_write(Path(root) / METADATA, write)


def read_metadata(root: str | os.PathLike) -> list[dict]:
    """The rows of `<root>/metadata.jsonl`; a line that does not parse or lacks a field is a one-line error."""
    path = Path(root) / METADATA
    rows = []
    for line_no, line in enumerate(read_text(path, "caption").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DifflabError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise DifflabError(f"{path}: line {line_no} needs a string 'file_name' and a string 'text'")
        rows.append(row)
    if not rows:
        raise DifflabError(f"{path}: no captioned images listed")
    return rows


def load_imagefolder(root: str | os.PathLike) -> dict[tuple[int, int], CaptionedDigits]:
    """Every captioned image of an imagefolder, grouped by size (H, W) so that each group stacks into batches."""
    root = Path(root)
    groups: dict[tuple[int, int], list] = {}
    for row in read_metadata(root):
        image = np.asarray(load_rgb(root / row["file_name"]))
        groups.setdefault(image.shape[:2], []).append((image, row))
    out = {}
    for size, items in groups.items():
        out[size] = CaptionedDigits(
            np.stack([im for im, _ in items]),
            [r["text"] for _, r in items],
            [tuple(r.get("digits", ())) for _, r in items],
            [tuple(r.get("domains", ())) for _, r in items],
        )
    return out
