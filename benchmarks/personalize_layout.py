"""`compose --layout`: how often both halves of a two-concept image are right (digit and style, by the digits
judges) on the miniature stack, for the naive prompt, boxes, and each region finder of the two-stage path.

- development set: the personalization demo's 10 pairs ("the number a in the style of <new1> next to the number b
  in the style of <new2>") x 16 seeds (the demo's 4, reported apart too, and 12 more); each finder's stage-2 start
  k, number of stage-1 images and way of picking one are chosen on it;
- held-out set: 20 other ordered pairs x 4 seeds: the reverse of every development pair and 10 new pairs, half of
  the prompts with <new2>'s concept first. Nothing is tuned on it. The same pairs with 8 new seeds make a second
  held-out set, never looked at before the way to measure on it was fixed.
Controls: the found masks flipped left-right, and masks split at a random column with a random side per concept.
Also: stage 1's own layout accuracy (the class words' digits on the sides the layout prompt names, the ceiling)
and how often each found mask lies on the side its digit is on in stage 1. Wilson 95 % intervals; the gain over
naive is paired (same noise), with its standard error.

    .venv/bin/python benchmarks/personalize_layout.py [runs/personalize-demo]   # what `make demo-personalize` made
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from difflab.demos.personalize import CONCEPTS, composition_sets, two_concept_prompt  # noqa: E402
from difflab.digits.data import DOMAINS  # noqa: E402
from difflab.minisd.judges import Judges, both_halves_right, halves  # noqa: E402
from difflab.personalize.compose import (  # noqa: E402
    ComposeConfig,
    LayoutRead,
    box_masks,
    decode,
    denoise_regions,
    layout_noises,
    plain,
    read_layouts,
    surest,
)
from difflab.personalize.generate import initial_latents, set_scheduler  # noqa: E402
from difflab.personalize.layout import FINDERS, SmallRegion  # noqa: E402

STYLES = {token: DOMAINS.index(style) for token, style in CONCEPTS}
# development: the demo's 4 seeds, and 12 more to choose between ways
SEEDS = {"development": range(16), "held-out": range(4), "held-out, new seeds": range(4, 12)}
STEPS = 25
# (finder, stage-1 images tried, stage 2's start k within stage 1's 25 steps, how the image is picked): the ways
# tried on the development set. The held-out set measures each finder's best of them.
DEVELOPMENT = [
    ("attention", 1, 0, "surest"),
    ("attention", 1, 5, "surest"),
    ("clip", 1, 0, "surest"),
    ("clip", 1, 5, "surest"),
    ("clip", 4, 0, "surest"),
    ("clip", 8, 0, "surest"),
    ("clip", 8, 0, "majority"),
]
CLIP_ALONE = ("clip", 1, 0, "surest")  # one stage-1 image: measured on the held-out sets too, beside the best way


def stage1_sides(judges: Judges, layout_image) -> tuple[int, int]:
    """The digits the judges read on the left and right half of stage 1's image."""
    left, right = halves(np.asarray(layout_image.convert("RGB"))[None])
    return int(judges(left).digit[0]), int(judges(right).digit[0])


def mask_side(masks: torch.Tensor, region: int) -> int:
    cols = masks[region].sum(0)
    centre = float((cols * torch.arange(len(cols))).sum() / cols.sum().clamp_min(1))
    return 0 if centre < len(cols) / 2 else 1


def majority(read: list[LayoutRead]) -> LayoutRead:
    """The surest image among those whose concepts lie in the order (left to right) that most images show."""
    kept = [r for r in read if r.masks is not None]
    if not kept:
        return surest(read)  # raises the first refusal
    orders = [tuple(mask_side(r.masks, c) for c in range(1, r.masks.shape[0])) for r in kept]
    common = max(set(orders), key=orders.count)
    return surest([r for r, o in zip(kept, orders) if o == common])


PICK = {"surest": surest, "majority": majority}


def label(finder: str, tries: int, k: int, pick: str) -> str:
    return f"{finder}, k = {k}" + (f", {pick} of {tries} layouts" if tries > 1 else "")


def run(pipe, judges, scorer, prompts, seeds: range, plan: list[tuple[str, int, int, str]], controls: bool):
    """Every prompt x seed: naive, boxes, and each (finder, stage-1 images tried, stage-2 start k, pick) in `plan`.
    Stage 1 runs once per noise for each (finder, k), and stage 2 once per distinct image picked."""
    made: dict[str, list] = {}
    ceiling, on_side = [], {label(*way): [] for way in plan}
    rng = np.random.default_rng(0)
    wanted = []
    for a, ta, b, tb in prompts:
        prompt, layout_prompt, concepts = two_concept_prompt(a, ta, b, tb)
        prompts_r = [prompt, *(c.prompt for c in concepts)]
        for s in seeds:
            wanted.append((a, ta, b, tb))
            latents = initial_latents(pipe, [s], 32, 64)
            base = ComposeConfig(steps=STEPS, height=32, width=64, clip_template="a photo of the number {}")
            naive = decode(pipe, denoise_regions(pipe, latents, *plain(prompt, latents), base))
            made.setdefault("naive", []).append(naive)
            boxes = box_masks([c.box for c in concepts], latents.shape[-2:])
            made.setdefault("boxes", []).append(decode(pipe, denoise_regions(pipe, latents, prompts_r, boxes, base)))
            reads, composed = {}, {}
            for finder, k in dict.fromkeys((w[0], w[2]) for w in plan):
                tries = max(w[1] for w in plan if (w[0], w[2]) == (finder, k))
                cfg = ComposeConfig(**{**base.__dict__, "layout_steps": k})
                noises = layout_noises(pipe, s, 32, 64, tries)
                reads[finder, k] = (cfg, read_layouts(pipe, layout_prompt, noises, concepts, cfg, finder, scorer))
            ceiling.append(stage1_sides(judges, reads[plan[0][0], plan[0][2]][1][0].layout.image) == (a, b))
            for finder, tries, k, pick in plan:
                cfg, read = reads[finder, k]
                name = label(finder, tries, k, pick)
                controlled = [f"{name}: flipped masks", f"{name}: random masks"] if controls else []
                try:
                    chosen = PICK[pick](read[:tries])
                except SmallRegion:  # every region under the smallest share: counted as the naive image
                    for variant in [name, *controlled]:
                        made.setdefault(variant, []).append(naive)
                    continue
                sides = stage1_sides(judges, chosen.layout.image)
                on_side[name] += [sides[mask_side(chosen.masks, r + 1)] == d for r, d in enumerate((a, b))]
                masks = chosen.masks
                cut = int(rng.integers(4, masks.shape[-1] - 4))
                split = torch.zeros_like(masks)
                order = rng.permutation([1, 2])
                split[order[0], :, :cut], split[order[1], :, cut:] = 1, 1
                if id(chosen) not in composed:  # another way picked the same image: the same composition
                    composed[id(chosen)] = decode(
                        pipe, denoise_regions(pipe, chosen.at_k, prompts_r, masks, cfg, start=k)
                    )
                made.setdefault(name, []).append(composed[id(chosen)])
                for variant, m in zip(controlled, (masks.flip(-1), split)):
                    made.setdefault(variant, []).append(
                        decode(pipe, denoise_regions(pipe, chosen.at_k, prompts_r, m, cfg, start=k))
                    )
    want = np.array([(w[0], w[2]) for w in wanted])
    styles = np.array([(STYLES[w[1]], STYLES[w[3]]) for w in wanted])
    scores = {
        name: both_halves_right(judges, np.stack([np.asarray(im.convert("RGB")) for im in images]), want, styles)
        for name, images in made.items()
    }
    return scores, np.array(ceiling), {f: float(np.mean(v)) if v else float("nan") for f, v in on_side.items()}


def rows_for(set_name: str, scores: dict, ceiling: np.ndarray, on_side: dict, keep=slice(None)) -> list[list]:
    naive = scores["naive"][keep].astype(float)
    rows = []
    for name, ok in scores.items():
        ok = ok[keep]
        k, n = int(ok.sum()), len(ok)
        interval = binomtest(k, n).proportion_ci(method="wilson")
        lo, hi = interval.low, interval.high
        diff = ok.astype(float) - naive
        se = diff.std(ddof=1) / math.sqrt(n)
        rows.append([set_name, name, f"{k / n:.3f}", f"{lo:.3f}-{hi:.3f}", f"{diff.mean():+.3f} ± {1.96 * se:.3f}",
                     f"{on_side[name]:.3f}" if name in on_side else "", n])  # fmt: skip
    rows.append([set_name, "stage 1 layout accuracy (ceiling)", f"{ceiling[keep].mean():.3f}", "", "", "", len(naive)])
    return rows


def main(demo: str = "runs/personalize-demo") -> None:
    from difflab.clip.score import ClipScorer
    from difflab.personalize.sd import load_pipeline

    torch.manual_seed(0)
    root = Path(demo)
    if not (root / "ti" / "learned_embeds.safetensors").is_file():
        raise SystemExit(f"{root}: no personalization demo here; run `make demo-personalize` first")
    pipe = load_pipeline(root / "minisd" / "sd", [root / "ti" / "learned_embeds.safetensors"], "cpu", "fp32")
    set_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    judges = Judges(root / "minisd" / "judges", "cpu")
    scorer = ClipScorer.from_pretrained(root / "minisd" / "clip", "cpu")
    sets = composition_sets()
    scores, ceiling, on_side = run(pipe, judges, scorer, sets["development"], SEEDS["development"], DEVELOPMENT, False)
    demo_set = np.isin(np.tile(SEEDS["development"], len(sets["development"])), SEEDS["held-out"])  # as the demo
    rows = rows_for("development, seeds 0-3", scores, ceiling, {}, demo_set)
    rows += rows_for("development, seeds 0-15", scores, ceiling, on_side)
    print("\n".join(" | ".join(map(str, r)) for r in rows), flush=True)
    best = {f: max((w for w in DEVELOPMENT if w[0] == f), key=lambda w: scores[label(*w)].mean()) for f in FINDERS}
    plan = list(dict.fromkeys([*best.values(), CLIP_ALONE]))
    for set_name in ("held-out", "held-out, new seeds"):
        scores, ceiling, on_side = run(pipe, judges, scorer, sets["held-out"], SEEDS[set_name], plan, True)
        rows += rows_for(set_name, scores, ceiling, on_side)
    write_results(
        "personalize_layout",
        ["set", "layout", "both halves right", "Wilson 95 %", "gain over naive (paired, ± 1.96 se)",
         "mask on the digit's side in stage 1", "n"],  # fmt: skip
        rows,
        f"Miniature stack ({root}), DDIM {STEPS} steps, guidance 7.5, 32x64 canvases; seeds per prompt: development "
        "0-15, held-out 0-3, held-out new seeds 4-11; "
        f"the held-out set measures each finder's way that scored best on the development set: {best}.",
    )  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:2])
