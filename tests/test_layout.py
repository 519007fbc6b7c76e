"""The region finders of `compose --layout`, on inputs whose answer is known and is not a fixed rule's: attention
maps made for the purpose, and real held-out digits pasted at random places (not halves) on 32x96 canvases,
found by the miniature CLIP that difflab ships."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.measure import label

from difflab.personalize.layout import Layout, attention_regions, clip_regions, windows

LATENT = (16, 48)  # a 32x96 canvas in the mini SD's latent


def centre_x(mask: torch.Tensor) -> float:
    cols = mask.sum(0)
    return float((cols * torch.arange(len(cols))).sum() / cols.sum()) + 0.5


def assert_good_masks(masks: torch.Tensor) -> None:
    """Disjoint, each concept's region one connected piece covering 15-60 % of the latent."""
    assert (masks.sum(0) == 1).all() and set(masks.unique().tolist()) <= {0.0, 1.0}
    for m in masks[1:]:
        assert 0.15 <= float(m.mean()) <= 0.60, float(m.mean())
        assert label(m.numpy().astype(bool), connectivity=1).max() == 1


def synthetic_layout(centres: tuple[float, float], flip: bool = False) -> Layout:
    """Cross-attention of "a dog next to a cat" at two resolutions: most mass on the start token (as in a real UNet),
    "dog" (token 2) and "cat" (token 6) as bumps around their centres, padding tokens strongest far right."""
    attention = {}
    for factor in (1, 2):
        h, w = LATENT[0] // factor, LATENT[1] // factor
        x = (torch.arange(w) + 0.5) * factor
        probs = torch.full((h, w, 77), 0.002)
        probs[..., 0] = 0.8
        probs[..., 9:] += 0.01 * (x / LATENT[1])[:, None]  # padding: must not count
        for token, centre in zip((2, 6), centres):
            probs[..., token] += 0.2 * torch.exp(-(((x - centre) / 6) ** 2))
        if flip:
            probs = probs.flip(1)
        attention[h * w] = (probs / probs.sum(-1, keepdim=True)).reshape(h * w, 77)
    return Layout(Image.new("RGB", (96, 32)), attention, prompt_length=8, latent_hw=LATENT)


@pytest.mark.parametrize("centres", [(9.0, 35.0), (30.0, 8.0), (20.0, 42.0)])
def test_attention_regions_sit_on_their_words_and_mirror_with_the_image(centres):
    masks = attention_regions(synthetic_layout(centres), [[2], [6]], smooth=1.0)
    assert_good_masks(masks)
    for r, centre in enumerate(centres, start=1):
        assert abs(centre_x(masks[r]) - centre) <= 4
    mirrored = attention_regions(synthetic_layout(centres, flip=True), [[2], [6]], smooth=1.0)
    assert torch.equal(mirrored, masks.flip(-1))


def test_windows_slide_the_whole_long_side():
    boxes = windows(96, 32, 2)
    assert boxes[0][0] == 0 and abs(boxes[-1][2] - 1) < 1e-6 and all(b[1:4:2] == (0.0, 1.0) for b in boxes)
    assert all(abs((b[2] - b[0]) - 1 / 3) < 1e-6 for b in boxes) and len(boxes) >= 20
    assert all(b[0::2] == (0.0, 1.0) for b in windows(32, 96, 2))  # a tall image: strips down it


@pytest.fixture(scope="module")
def mini_clip(tmp_path_factory):
    from difflab.clip.score import ClipScorer
    from difflab.minisd.prebuilt import unpack

    stack = unpack(tmp_path_factory.mktemp("stack") / "minisd")
    return ClipScorer.from_pretrained(stack / "clip", "cpu")


def pasted(images, a: int, b: int, xa: int, xb: int) -> Image.Image:
    canvas = np.empty((32, 96, 3), np.uint8)
    canvas[:] = np.concatenate([images[a][:, :2], images[b][:, -2:]], 1).reshape(-1, 3).mean(0)
    canvas[:, xa : xa + 32], canvas[:, xb : xb + 32] = images[a], images[b]
    return Image.fromarray(canvas)


def test_the_clip_finder_locates_real_digits_pasted_anywhere(mini_clip):
    """40 canvases of two held-out digits at random x. The mini CLIP confuses some pairs (a 3 for an 8), so the
    claim is a rate: at least 90 % of the centroids within 4 latent pixels of the truth; and with the digits placed
    mirror-wise, the found centroids mirror as well at the same rate."""
    from difflab.minisd.data import single_digits

    digits = single_digits(30, seed=5, split="val")
    rng = np.random.default_rng(5)
    errors, mirror_errors = [], []
    while len(errors) < 80:
        a, b = rng.choice(len(digits.images), 2, replace=False)
        if digits.digits[a] == digits.digits[b]:
            continue
        xa = int(rng.integers(0, 32))
        xb = int(rng.integers(xa + 32, 65))
        texts = [f"a photo of the number {digits.digits[i][0]}" for i in (a, b)]
        for place, found in (((xa, xb), errors), ((96 - 32 - xa, 96 - 32 - xb), mirror_errors)):
            image = pasted(digits.images, a, b, *place)
            masks, _, _ = clip_regions(Layout(image, {}, 0, LATENT), texts, mini_clip)
            assert_good_masks(masks)
            found += [abs(centre_x(masks[r]) - (x + 16) / 2) for r, x in enumerate(place, start=1)]
    for found in (errors, mirror_errors):
        assert np.mean(np.array(found) <= 4) >= 0.9, sorted(found)[-8:]


def test_centred_windows_that_overlap_meet_halfway_between_their_centres():
    from difflab.personalize.layout import _meet_halfway

    left, right = (0.14, 0.0, 0.64, 1.0), (0.44, 0.0, 0.94, 1.0)  # centres 0.39 and 0.69: they meet at 0.54
    assert _meet_halfway([left, right]) == [(0.14, 0.0, 0.54, 1.0), (0.54, 0.0, 0.94, 1.0)]
    assert _meet_halfway([right, left]) == [(0.54, 0.0, 0.94, 1.0), (0.14, 0.0, 0.54, 1.0)]  # whatever the order
    apart = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert _meet_halfway(apart) == apart
    down = _meet_halfway([(0.0, 0.1, 1.0, 0.6), (0.0, 0.3, 1.0, 0.8)])  # windows down a tall image
    assert down[0][3] == down[1][1] == pytest.approx(0.45)
