"""Where each concept goes: region finders over a layout image, stage 1 of a two-stage composition (as OMG, Kong
et al. 2024). Stage 1 denoises a plain prompt of the concepts' class words ("a dog next to a cat"); a finder reads
that image and gives each concept one connected region of the latent, disjoint from the others'.

- `attention_regions`: the cross-attention of each class word's own tokens during stage 1's early steps, at every
  resolution; the start, end and padding tokens are dropped and the rest re-normalised (as Attend-and-Excite
  does); each concept's map is compared with the others' at every pixel, and its region is the connected part of
  the pixels it wins that holds its peak.
- `clip_regions`: windows sliding along the layout image, scored against each class word by the CLIP model at
  hand; each concept gets the window that CLIP ascribes most surely to it over the others, no two overlapping,
  then centred on the windows that score alike around it; centred windows that overlap meet halfway.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.utils import DifflabError

FINDERS = ("attention", "clip")
WINDOW_STEPS = 32  # window positions along the image's longer side: a region's centre is found to half a step
MAX_WINDOW_SETS = 200_000  # windows x concepts searched exhaustively up to this many combinations


@dataclass
class Layout:
    """What stage 1 leaves for the finders."""

    image: Image.Image
    attention: dict[int, torch.Tensor]  # query pixels -> (pixels, tokens) mean cross-attention of the prompt's row
    prompt_length: int  # tokens of the layout prompt, start and end tokens included
    latent_hw: tuple[int, int]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C,h,w) -> blurred (C,h,w) with a separable Gaussian, edges replicated."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps.device)
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    return F.conv2d(out, k.view(1, 1, -1, 1))[:, 0]


def word_maps(layout: Layout, groups: Sequence[Sequence[int]], smooth: float) -> torch.Tensor:
    """(concepts, H, W) attention of each concept's token positions at latent size, averaged over resolutions."""
    height, width = layout.latent_hw
    maps = []
    for pixels, probs in layout.attention.items():
        words = probs[:, 1 : layout.prompt_length - 1].float()  # without the start, end and padding tokens
        words = words / words.sum(-1, keepdim=True).clamp_min(1e-12)
        factor = round(math.sqrt(height * width / pixels))
        per_concept = torch.stack([words[:, [i - 1 for i in g]].sum(-1) for g in groups])
        per_concept = per_concept.reshape(len(groups), height // factor, width // factor)
        maps.append(F.interpolate(per_concept[:, None], size=(height, width), mode="bilinear")[:, 0])
    maps = torch.stack(maps).mean(0)
    return gaussian_blur(maps, smooth) if smooth > 0 else maps


def attention_regions(layout: Layout, groups: Sequence[Sequence[int]], smooth: float) -> torch.Tensor:
    """(1+C,H,W) one-hot masks: each concept's connected region around its peak among the pixels where its map,
    relative to its own mean, beats every other concept's; the rest is the background (region 0)."""
    from skimage.measure import label

    maps = word_maps(layout, groups, smooth)
    relative = maps / maps.flatten(1).mean(1).clamp_min(1e-12)[:, None, None]
    winner = relative.argmax(0).numpy()
    region = np.zeros(winner.shape, dtype=np.int64)
    for c in range(len(groups)):
        won = winner == c
        if not won.any():
            continue
        parts = label(won, connectivity=1)
        peak = np.unravel_index(np.where(won, relative[c].numpy(), -np.inf).argmax(), won.shape)
        region[parts == parts[peak]] = c + 1
    return F.one_hot(torch.from_numpy(region), len(groups) + 1).permute(2, 0, 1).float()


def windows(width: int, height: int, concepts: int) -> list[tuple[float, float, float, float]]:
    """Candidate boxes (left, top, right, bottom as fractions): strips across the image's longer side, as wide as
    its shorter side allows with room for every concept, every WINDOW_STEPS-th of the longer side, the last one
    flush with the edge."""
    across = width >= height
    long, short = (width, height) if across else (height, width)
    size = min(short, long / concepts) / long
    starts = sorted({*np.arange(0, 1 - size, 1 / WINDOW_STEPS).round(6).tolist(), round(1 - size, 6)})
    return [(a, 0.0, a + size, 1.0) if across else (0.0, a, 1.0, a + size) for a in starts]


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 1e-9 and b[0] < a[2] - 1e-9 and a[1] < b[3] - 1e-9 and b[1] < a[3] - 1e-9


def clip_regions(layout: Layout, texts: Sequence[str], scorer) -> tuple[torch.Tensor, list, float]:
    """(1+C,H,W) one-hot masks, the chosen boxes and how surely CLIP reads them (the mean log-odds): the windows,
    one per concept and none overlapping, that maximise the summed log-odds CLIP gives each concept's text over the
    others' for its window."""
    image = layout.image.convert("RGB")
    width, height = image.size
    boxes = windows(width, height, len(texts))
    crops = [image.crop((round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)))
             for x0, y0, x1, y1 in boxes]  # fmt: skip
    logits = 100 * scorer.image_embeds(crops) @ scorer.text_embeds(list(texts)).T  # (windows, concepts)
    # Log-odds of each concept against the others: unlike a softmax it keeps rising as a window centres on its
    # concept, where a softmax saturates at once.
    others = torch.stack([torch.logsumexp(logits[:, [o for o in range(len(texts)) if o != c]], 1)
                          for c in range(len(texts))], 1) if len(texts) > 1 else torch.zeros_like(logits)  # fmt: skip
    logp = (logits - others).numpy()
    order = np.argsort(-logp, axis=0)  # each concept's windows, best first
    keep = max(len(texts), int(MAX_WINDOW_SETS ** (1 / len(texts))))
    best, choice = -np.inf, None
    for combo in itertools.product(*(order[:keep, c] for c in range(len(texts)))):
        if any(_overlap(boxes[a], boxes[b]) for a, b in itertools.combinations(combo, 2)):
            continue
        total = sum(logp[w, c] for c, w in enumerate(combo))
        if total > best:
            best, choice = total, combo
    if choice is None:
        raise DifflabError(f"no {len(texts)} windows of the layout image are disjoint: too many concepts for it")
    chosen = _meet_halfway([_centred(boxes, logp[:, c], w) for c, w in enumerate(choice)])
    return box_masks(chosen, layout.latent_hw), chosen, float(best / len(texts))


def _sliding_axis(box: tuple[float, float, float, float]) -> int:
    """0 for a window of `windows` that slides across the image (it spans the full height), 1 for one sliding down."""
    return 0 if box[1] == 0.0 and box[3] == 1.0 else 1


def _centred(boxes: list, score: np.ndarray, chosen: int) -> tuple[float, float, float, float]:
    """The chosen window moved to the score-weighted mean position of the windows within half a window of it: a
    thin concept scores alike over several windows, and their middle is where it is."""
    axis = _sliding_axis(boxes[0])
    starts = np.array([b[axis] for b in boxes])
    size = boxes[0][axis + 2] - boxes[0][axis]
    near = np.abs(starts - starts[chosen]) <= size / 2
    weights = np.exp(score[near] - score[near].max())
    start = float(np.clip((starts[near] * weights).sum() / weights.sum(), 0, 1 - size))
    return (start, 0.0, start + size, 1.0) if axis == 0 else (0.0, start, 1.0, start + size)


def _meet_halfway(boxes: list) -> list:
    """Windows that overlap once centred meet halfway between their centres, so each concept keeps the side of the
    overlap nearer its own centre (otherwise a later box takes all of it and an earlier region is pushed aside)."""
    axis = _sliding_axis(boxes[0])
    out = [list(b) for b in boxes]
    by_centre = sorted(range(len(boxes)), key=lambda i: boxes[i][axis] + boxes[i][axis + 2])
    for i, j in zip(by_centre, by_centre[1:]):
        if out[i][axis + 2] > out[j][axis]:
            out[i][axis + 2] = out[j][axis] = (sum(boxes[i][axis::2]) + sum(boxes[j][axis::2])) / 4
    return [tuple(b) for b in out]


def box_masks(boxes: Sequence[tuple[float, float, float, float]], latent_hw, names: Sequence[str] = ()):
    """(1+C,H,W) one-hot masks from boxes (left, top, right, bottom as fractions): a later box wins where boxes
    overlap, the rest is the background (region 0)."""
    h, w = latent_hw
    region = torch.zeros(h, w, dtype=torch.long)
    for r, (left, top, right, bottom) in enumerate(boxes, start=1):
        region[round(top * h) : round(bottom * h), round(left * w) : round(right * w)] = r
    masks = F.one_hot(region, len(boxes) + 1).permute(2, 0, 1).float()
    empty = [str(names[i] if i < len(names) else boxes[i]) for i, m in enumerate(masks[1:]) if not m.any()]
    if empty:
        raise DifflabError(f"the boxes of {', '.join(empty)} cover no latent pixel ({h}x{w}) that a later box leaves")
    return masks


class SmallRegion(DifflabError):
    """A found region under the smallest share of the image: a fault of that layout image, not of the request."""


def check_regions(masks: torch.Tensor, words: Sequence[str], smallest: float) -> None:
    """Every concept's region must hold at least `smallest` of the latent."""
    shares = masks[1:].flatten(1).mean(1)
    small = [f"{w!r} ({s:.0%})" for w, s in zip(words, shares.tolist()) if s < smallest]
    if small:
        raise SmallRegion(
            f"the layout leaves {', '.join(small)} under {smallest:.0%} of the image: too many concepts for it, or "
            "a class word stage 1 did not draw; give boxes instead"
        )
