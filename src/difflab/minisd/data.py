"""Captioned digits for the miniature Stable Diffusion: images in a Hugging Face `imagefolder` layout.

    <root>/metadata.jsonl   one JSON object per line: {"file_name", "text", "digits", "domains", "looks"}
    <root>/<file_name>      32x32 RGB (one digit) or 32x64 RGB (two digits side by side)

`text` names the digits in varied words and templates and never the domain (MNIST-M- or SVHN-like): the model
can draw the style but has no word for it, which is what textual inversion is for. Half the single-digit
captions also describe what the image looks like, as a person captioning it would ("the digit 7, white on a
textured blue background"; adjectives such as "blurry" or "dark" only where true), so that the text, as in
Stable Diffusion's captions, has a say over appearance and a learned embedding has directions to move along.
`digits` / `domains` are the labels difflab measures with; `looks` lists what a caption may truly state of the
image, which CLIP training uses to tell true captions from false ones; the UNet reads only `file_name` and
`text`, as diffusers' text-to-image example does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.digits.data import DOMAINS, generate_split
from difflab.io import load_rgb, read_metadata, save_pngs

SIZE = 32  # the 28x28 digits are resized to a size the 4x-downsampling VAE divides evenly
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
NEUTRAL_ADJECTIVES = ("", "", "", "good ", "small ", "large ", "cropped ")
# Thresholds on the embedded data: the 97th percentile of the luminance gradient has medians 96 (MNIST-M
# style) and 59 (SVHN style); the mean gradient in the top and bottom rows 8.4 and 5.3.
SHARP_EDGE, TEXTURED_BORDER, DARK, BRIGHT = 75.0, 8.0, 70.0, 170.0
COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")  # by hue, 45° apart from red
GREYS = ("black", "grey", "white")
MEASURED_ADJECTIVES = ("blurry", "dark", "bright")  # used in a caption only where `looks` finds them true
# Every appearance word a caption can state, as "<colour> digit", "<colour> background" or the word itself.
ATTRIBUTES = (
    tuple(f"{c} {part}" for part in ("digit", "background") for c in GREYS + COLOURS)
    + ("plain", "textured")
    + MEASURED_ADJECTIVES
)
_DESCRIBED = re.compile(r", (\w+) on a (plain|textured) (\w+) background$")


@dataclass(frozen=True)
class Looks:
    """What an image looks like, in words a captioner would use."""

    digit_colour: str
    background_colour: str
    texture: str  # "plain" or "textured"
    adjectives: tuple[str, ...]  # the true ones among MEASURED_ADJECTIVES

    def words(self) -> tuple[str, ...]:
        """Everything a caption may truly state of the image, in ATTRIBUTES' terms."""
        return (f"{self.digit_colour} digit", f"{self.background_colour} background", self.texture, *self.adjectives)


def stated(text: str) -> tuple[str, ...]:
    """The appearance words (ATTRIBUTES) a caption states."""
    words = [w for w in MEASURED_ADJECTIVES if w in text.split()]
    found = _DESCRIBED.search(text)
    if found:
        words += [f"{found[1]} digit", found[2], f"{found[3]} background"]
    return tuple(words)


def attribute_bits(words: tuple[str, ...]) -> int:
    return sum(1 << ATTRIBUTES.index(w) for w in words)


def colour_name(rgb: np.ndarray) -> str:
    r, g, b = (float(c) / 255 for c in rgb)
    top, low = max(r, g, b), min(r, g, b)
    if top - low < 0.15:  # no clear hue: a grey level
        return "black" if top < 0.25 else "white" if low > 0.75 else "grey"
    if top < 0.2:
        return "black"
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return COLOURS[int(((hue + 22.5) % 360) // 45)]


def looks(image: np.ndarray) -> Looks:
    """Describe a uint8 (H, W, 3) digit image: colours of the digit and the background, background texture,
    blur and brightness."""
    x = image.astype(np.float32)
    lum = x.mean(2)
    border = np.ones(lum.shape, bool)
    border[3:-3, 3:-3] = False
    background = np.median(x[border], axis=0)
    h, w = lum.shape
    centre = x[h // 4 : h - h // 4, w // 4 : w - w // 4].reshape(-1, 3)
    distance = np.linalg.norm(centre - background, axis=1)
    digit = np.median(centre[distance >= np.percentile(distance, 85)], axis=0)
    gx, gy = np.abs(np.diff(lum, axis=1)), np.abs(np.diff(lum, axis=0))
    edge = np.percentile(np.concatenate([gx.ravel(), gy.ravel()]), 97)
    border_detail = np.concatenate([gx[:4].ravel(), gx[-4:].ravel()]).mean()
    true = (edge < SHARP_EDGE, lum.mean() < DARK, lum.mean() > BRIGHT)
    adjectives = tuple(word for word, is_true in zip(MEASURED_ADJECTIVES, true) if is_true)
    return Looks(
        colour_name(digit),
        colour_name(background),
        "textured" if border_detail > TEXTURED_BORDER else "plain",
        adjectives,
    )


def number_name(digit: int, rng: np.random.Generator) -> str:
    return NUMBER_WORDS[digit] if rng.random() < 0.5 else str(digit)


def caption(digits: tuple[int, ...], rng: np.random.Generator, seen: Looks | None = None) -> str:
    """A random caption for one digit or a left-right pair; never mentions the style. With `seen` (a single
    digit's looks) its adjectives are true ones, and half the time the colours and texture follow."""
    templates = SINGLE_TEMPLATES if len(digits) == 1 else PAIR_TEMPLATES
    text = templates[rng.integers(len(templates))]
    names = [number_name(d, rng) for d in digits]
    adjectives = NEUTRAL_ADJECTIVES + tuple(f"{a} " for a in (seen.adjectives if seen else ()))
    text = text.format(n=names[0], m=names[-1], a=adjectives[rng.integers(len(adjectives))])
    if seen is not None and rng.random() < 0.5:
        text += f", {seen.digit_colour} on a {seen.texture} {seen.background_colour} background"
    # "a 8" -> "an 8", "a eight" -> "an eight"
    return " ".join(
        "an" if w == "a" and nxt[:1] in "8aeiou" else w for w, nxt in zip(text.split(), text.split()[1:] + [""])
    )


@dataclass
class CaptionedDigits:
    """Images (N, H, W, 3) uint8 with one caption and label set each; all images of one set share a size.
    `looks`: what a caption may truly state of each image (`Looks.words`), where known."""

    images: np.ndarray
    texts: list[str]
    digits: list[tuple[int, ...]]
    domains: list[tuple[str, ...]]
    looks: list[tuple[str, ...]] | None = None


def resize(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """uint8 (N, 28, 28, 3) -> uint8 (N, size, size, 3), bilinear with antialiasing."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def single_digits(n_per_domain: int, seed: int, split: str = "train") -> CaptionedDigits:
    """`n_per_domain` digits of each style (labels balanced), shuffled together, one caption each."""
    rng = np.random.default_rng([seed, 7])
    images, digits, domains, seen = [], [], [], []
    for domain in DOMAINS:
        x, y = generate_split(domain, n_per_domain, seed, split)
        images.append(resize(x))
        seen += [looks(image) for image in x]  # at 28x28: the resize softens the edges the thresholds measure
        digits += [(int(d),) for d in y]
        domains += [(domain,)] * len(y)
    order = rng.permutation(len(digits))
    images = np.concatenate(images)[order]
    digits = [digits[i] for i in order]
    domains = [domains[i] for i in order]
    texts = [caption(digits[j], rng, seen[i]) for j, i in enumerate(order)]
    return CaptionedDigits(images, texts, digits, domains, [seen[i].words() for i in order])


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
        if data.looks is not None:
            rows[-1]["looks"] = list(data.looks[i])
    save_pngs(items, desc="captioned digits")
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
            [tuple(r["looks"]) for _, r in items] if all("looks" in r for _, r in items) else None,
        )
    return out
