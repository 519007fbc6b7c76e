"""`difflab personalize demo`: the CLIP and personalization jobs end to end on the miniature SD + CLIP stack, with
what each mechanism does measured by the digits judges (which digit, which style).

1. CLIP zero-shot on held-out digits in the course's flat layout, one template against the ensemble;
2. textual inversion of <new1> from 5 SVHN-style and <new2> from 5 MNIST-M-style images (captions never name
   a style, so the model has no word for either);
3. generation in the course layout from an `input.json` that uses the tokens, and the same prompts without
   them (the base rate); CLIP scoring with best-of-N (the kept images against all candidates);
4. composition against the naive prompt on two-concept, two-digit prompts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from difflab.clip.score import ClipScorer
from difflab.digits.data import DOMAINS
from difflab.io import load_rgb, open_run, save_json, save_png, write_metadata
from difflab.minisd import data as mdata
from difflab.minisd.judges import Judges, both_halves_right, rates
from difflab.personalize.sd import load_pipeline
from difflab.precision import Precision
from difflab.report import mark
from difflab.utils import DifflabError, Stages, image_grid

# Concept key (as in input.json) -> (token, the style of its reference images).
CONCEPTS = (("<new1>", "svhn"), ("<new2>", "mnistm"))
STYLE_PROMPT = "the number {d} in the style of {token}"
BASE_PROMPT = "the number {d}"
USED_STAGES = ("clip", "sd", "judges")  # what the demo reads of a mini-SD stack
PAIRS = ((3, 5), (1, 7), (0, 8), (2, 6), (4, 9), (5, 2), (7, 0), (9, 3), (6, 1), (8, 4))
# Composition's held-out pairs beside the reverse of every pair above; nothing is tuned on them.
NEW_PAIRS = ((1, 2), (3, 8), (5, 9), (6, 0), (7, 4), (2, 9), (4, 1), (8, 6), (0, 3), (9, 7))


def composition_sets() -> dict[str, list[tuple[int, str, int, str]]]:
    """(left digit, its token, right digit, its token) per two-concept prompt. Development: the pairs above, <new1>
    on the left. Held-out: their reverses and NEW_PAIRS, every other prompt with <new2>'s concept first, so that
    no rule "concept i goes to half i" can pass."""
    (first, _), (second, _) = CONCEPTS
    held = [(b, a) for a, b in PAIRS] + list(NEW_PAIRS)
    return {
        "development": [(a, first, b, second) for a, b in PAIRS],
        "held-out": [(a, *((second, b, first) if i % 2 else (first, b, second))) for i, (a, b) in enumerate(held)],
    }


@dataclass
class PersonalizeDemoConfig:
    out: str
    stack: str | None = None  # a mini-SD stack; None: <out>/minisd, unpacked from the shipped one when missing
    from_scratch: bool = False  # build <out>/minisd instead of unpacking the shipped stack
    n_heldout: int = 50  # zero-shot images per digit, half of each style (the course: 50 per class)
    refs_per_concept: int = 5
    # The textual-inversion settings below were chosen by the sweeps in docs/minisd.md ("Textual inversion").
    ti_steps: int = 600
    ti_batch: int = 16
    ti_lr: float = 5e-3
    # Each token starts from a word that describes its references coarsely, as textual inversion's initialiser
    # does ("textured": an MNIST-M-like digit sits on a photo).
    ti_init: tuple[str, str] = ("photo", "textured")
    # Each reference image captioned "the number {d} in the style of <token>" (its metadata.jsonl), so the token
    # learns the style and not which digits the references happen to show; False: the style templates.
    ti_captions: bool = True
    per_prompt: int = 25  # the course layout
    top_k: int = 5  # best-of-N keeps the course's 5 best of per_prompt
    steps: int = 25
    guidance: float = 7.5
    compose_seeds: int = 4  # per two-digit prompt
    compose_layout_steps: int = 0  # stage 2 starts from the layout image's latents after this many steps
    compose_layouts: int | None = None  # stage-1 images tried per composition; None: the finder's default
    seed: int = 0
    device: str | None = None
    precision: Precision = Precision("auto")
    overwrite: bool = False


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def write_zeroshot_set(out: Path, n_per_digit: int, seed: int) -> Path:
    """Held-out digits of both styles as `<class>_<idx>.png` + `id2label.json` (the course's CLIP layout)."""
    held = mdata.single_digits(5 * n_per_digit, seed, split="val")  # n_per_digit / 2 per digit and style
    counts: dict[int, int] = {}
    for image, digits in zip(held.images, held.digits):
        d = digits[0]
        save_png(image, out / f"{d}_{counts.setdefault(d, 0):04d}.png")
        counts[d] += 1
    save_json({str(d): w for d, w in enumerate(mdata.NUMBER_WORDS)}, out / "id2label.json")
    return out


def style_index(key: str) -> int:
    return DOMAINS.index(CONCEPTS[int(key)][1])


def reference_digits(concept: int, n: int) -> list[int]:
    return [(concept + 2 * i) % 10 for i in range(n)]


def write_references(out: Path, n: int, seed: int, captions: bool) -> list[Path]:
    """`n` held-out images of one style per concept folder `<key>/` (digits 0, 2, 4, ... for the first concept,
    1, 3, 5, ... for the second), with `captions` a `metadata.jsonl` naming each image's digit."""
    held = mdata.single_digits(50, seed + 1, split="val")
    folders = []
    for k, (_, domain) in enumerate(CONCEPTS):
        folder = out / str(k)
        wanted = reference_digits(k, n)
        for i, d in enumerate(wanted):
            idx = next(j for j, (dg, dm) in enumerate(zip(held.digits, held.domains)) if dg == (d,) and dm == (domain,))
            save_png(held.images[idx], folder / f"{i:02d}.png")
        if captions:
            rows = [
                {"file_name": f"{i:02d}.png", "text": STYLE_PROMPT.format(d=d, token="{}")}
                for i, d in enumerate(wanted)
            ]
            write_metadata(rows, folder)
        folders.append(folder)
    return folders


def input_spec() -> dict:
    """The course's `input.json`: one key per concept, a prompt per digit, the eval prompt without the token."""
    spec = {}
    for k, (token, domain) in enumerate(CONCEPTS):
        spec[str(k)] = {
            "src_image": f"{domain}-style digits",
            "token_name": token,
            "prompt": [STYLE_PROMPT.format(d=d, token=token) for d in range(10)],
            "prompt_4_clip_eval": [BASE_PROMPT.format(d=d) for d in range(10)],
            # The course's thresholds are for CLIP ViT-B/32; the mini CLIP has no published baseline.
            "baseline": [[0, 0]] * 10,
        }
    return spec


def base_spec() -> dict:
    return {"base": {"prompt": [BASE_PROMPT.format(d=d) for d in range(10)]}}


def read_prompt_images(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(load_rgb(folder / name)) for name in sorted(p.name for p in folder.glob("*.png"))[:n]])


def judge_generation(judges: Judges, gen: Path, spec: dict, per_prompt: int) -> dict:
    """Per key: digit accuracy and style rate over all its prompts' images (wanted style: the key's concept)."""
    out = {}
    for key, entry in spec.items():
        images, digits = [], []
        for idx in range(len(entry["prompt"])):
            images.append(read_prompt_images(gen / key / str(idx), per_prompt))
            digits += [idx] * per_prompt
        out[key] = rates(judges(np.concatenate(images)), np.array(digits), style_index(key))
    return out


def judge_best_of(judges: Judges, results, spec: dict) -> dict:
    """Judged digit accuracy and style rate of the images best-of-N kept, per concept key."""
    out = {}
    for key in spec:
        kept = [(r.prompt_idx, f) for r in results if r.key == key for f in r.selected]
        images = np.stack([np.asarray(load_rgb(f)) for _, f in kept])
        out[key] = rates(judges(images), np.array([i for i, _ in kept]), style_index(key))
    return out


def token_examples(judges: Judges, out: Path, n_refs: int) -> dict[str, dict[str, tuple[np.ndarray, list[str]]]]:
    """Per token, for the report: its reference images, the first image of each digit's prompt with the token and
    the same prompt without it, each captioned with what the judges see (✓: the digit or style wanted)."""

    def judged(images: np.ndarray, digits: list[int], style: int | None) -> tuple[np.ndarray, list[str]]:
        v = judges(images)
        captions = [
            f"{d} {mark(d == want)} · {DOMAINS[s]}" + (f" {mark(s == style)}" if style is not None else "")
            for d, s, want in zip(v.digit, v.domain, digits)
        ]
        return images, captions

    base = np.stack([read_prompt_images(out / "base" / "base" / str(d), 1)[0] for d in range(10)])
    examples = {}
    for k, (token, domain) in enumerate(CONCEPTS):
        style = DOMAINS.index(domain)
        refs = np.stack([np.asarray(load_rgb(out / "references" / str(k) / f"{i:02d}.png")) for i in range(n_refs)])
        made = np.stack([read_prompt_images(out / "generated" / str(k) / str(d), 1)[0] for d in range(10)])
        examples[token] = {
            f"its {n_refs} reference images ({domain}-style)": judged(
                refs, [(k + 2 * i) % 10 for i in range(n_refs)], style
            ),
            f'"{STYLE_PROMPT.format(d="0…9", token=token)}"': judged(made, list(range(10)), style),
            f'the same prompts without the token: "{BASE_PROMPT.format(d="0…9")}"': judged(base, list(range(10)), None),
        }
    return examples


def open_stack(cfg: PersonalizeDemoConfig, out: Path) -> Path:
    """`--stack` must be a finished stack. Without it, <out>/minisd is reused when finished; otherwise the stack
    difflab ships is unpacked there, or (with `from_scratch`, when none is shipped, or to finish a build that
    was cut off) built there."""
    from difflab.minisd import prebuilt
    from difflab.minisd.build import BUILD_LOG, BuildConfig, build, done

    if cfg.stack is not None:
        stack = Path(cfg.stack)
        missing = [s for s in USED_STAGES if not done(stack, s)]
        if missing:
            raise DifflabError(
                f"{stack}: not a complete mini-SD stack (missing {', '.join(missing)}); finish it with "
                f"`difflab minisd build --out {stack} --resume`"
            )
        return stack
    stack = out / "minisd"
    started = [s for s in USED_STAGES if done(stack, s)]
    if len(started) == len(USED_STAGES):
        return stack
    if not started and not cfg.from_scratch and prebuilt.available(prebuilt.PREBUILT):
        return prebuilt.unpack(stack, prebuilt.PREBUILT)
    resume = (stack / BUILD_LOG).is_file()
    return build(BuildConfig(out=str(stack), seed=cfg.seed, device=cfg.device, precision=cfg.precision, resume=resume))


def run_demo(cfg: PersonalizeDemoConfig) -> dict:
    """Jobs 3 and 4 into `cfg.out`; an earlier demo there is replaced only with `cfg.overwrite`, and a mini stack
    in its minisd/ is kept and reused."""
    with open_run(cfg.out, "personalize demo", overwrite=cfg.overwrite, keep=("minisd",)):
        return _run_demo(cfg, Path(cfg.out))


def _run_demo(cfg: PersonalizeDemoConfig, out: Path) -> dict:
    stages = Stages()
    stack = stages.run("mini stack", open_stack, cfg, out)
    judges = Judges(stack / "judges", "cpu")
    metrics: dict = {"config": asdict(cfg), "judges_held_out": judges.held_out}
    metrics["zeroshot"] = stages.run("CLIP zero-shot", zeroshot, cfg, stack, out / "zeroshot")
    refs = write_references(out / "references", cfg.refs_per_concept, cfg.seed, cfg.ti_captions)
    embeds = stages.run("textual inversion", textual_inversion, cfg, stack, refs, out / "ti")
    pipe = load_pipeline(stack / "sd", [embeds], cfg.device, cfg.precision)
    spec = input_spec()
    save_json(spec, out / "input.json")
    metrics["generation"] = stages.run("generation", generation, cfg, pipe, spec, judges, out)
    metrics["best_of"] = stages.run(
        "CLIP score, best-of-N", best_of, cfg, spec, judges, stack, out, metrics["generation"]
    )
    scorer = ClipScorer.from_pretrained(stack / "clip", cfg.device)
    metrics["compose"] = stages.run("composition", composition, cfg, pipe, judges, scorer, out / "compose")
    metrics["seconds"] = stages.seconds
    save_json(metrics, out / "metrics.json")
    from difflab.demos.personalize_report import print_summary, write_report

    write_report(metrics, out, token_examples(judges, out, cfg.refs_per_concept))
    print_summary(metrics)
    return metrics


def zeroshot(cfg: PersonalizeDemoConfig, stack: Path, out: Path) -> dict:
    from difflab.clip.evaluate import ZeroShotConfig, run_zeroshot

    images = write_zeroshot_set(out / "val", cfg.n_heldout, cfg.seed)
    results = {}
    for name, templates in (("one template", "A photo of {}."), ("ensemble", "ensemble")):
        r = run_zeroshot(
            ZeroShotConfig(
                images=images,
                labels=images / "id2label.json",
                model=stack / "clip",
                out=out / name.replace(" ", "_"),
                templates=templates,
                device=cfg.device,
                precision=cfg.precision,
            )
        )
        results[name] = {"top1": r.top1, "top5": r.top5, "n": r.n_images}
    results["ensemble_gain_top1"] = results["ensemble"]["top1"] - results["one template"]["top1"]
    return results


def textual_inversion(cfg: PersonalizeDemoConfig, stack: Path, refs: list[Path], out: Path) -> Path:
    from difflab.personalize.textual_inversion import Concept, TextualInversionConfig, train_textual_inversion

    concepts = [
        Concept(str(folder), token, init, "style")
        for folder, (token, _), init in zip(refs, CONCEPTS, cfg.ti_init, strict=True)
    ]
    ti = TextualInversionConfig(
        concepts=concepts,
        sd=str(stack / "sd"),
        out=str(out),
        resolution=32,
        steps=cfg.ti_steps,
        batch_size=cfg.ti_batch,
        grad_accum=1,
        lr=cfg.ti_lr,
        scale_lr=False,
        flip_p=0.0,  # a mirrored digit is no digit
        save_every=0,
        checkpoint_every=0,
        precision=cfg.precision,
        seed=cfg.seed,
        device=cfg.device,
    )
    return train_textual_inversion(ti)


def generate_config(cfg: PersonalizeDemoConfig):
    from difflab.personalize.generate import GenerateConfig

    return GenerateConfig(
        per_prompt=cfg.per_prompt,
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        batch_size=cfg.per_prompt,
    )


def generation(cfg: PersonalizeDemoConfig, pipe, spec: dict, judges: Judges, out: Path) -> dict:
    from difflab.personalize.generate import generate

    gcfg = generate_config(cfg)
    generate(pipe, spec, out / "generated", gcfg)
    generate(pipe, base_spec(), out / "base", gcfg)
    styled = judge_generation(judges, out / "generated", spec, cfg.per_prompt)
    base_images = [read_prompt_images(out / "base" / "base" / str(d), cfg.per_prompt) for d in range(10)]
    base = judges(np.concatenate(base_images))
    result = {"base_digit_accuracy": float((base.digit == np.repeat(np.arange(10), cfg.per_prompt)).mean())}
    for k, (token, domain) in enumerate(CONCEPTS):
        # The base rate: the share of plain "the number {d}" images the domain judge calls this style.
        base_rate = float((base.domain == DOMAINS.index(domain)).mean())
        result[token] = {"style": domain, **styled[str(k)], "base_style_rate": base_rate}
    return result


def best_of(cfg: PersonalizeDemoConfig, spec: dict, judges: Judges, stack: Path, out: Path, generated: dict) -> dict:
    """The images best-of-N keeps against all candidates (`generated`: the judged rates of `generation`)."""
    from difflab.personalize.score import run_score

    results = run_score(
        out / "input.json",
        out / "references",
        out / "generated",
        stack / "clip",
        out / "score",
        device=cfg.device,
        top_k=cfg.top_k,
    )
    kept = judge_best_of(judges, results, spec)
    rows = {}
    for k, (token, _) in enumerate(CONCEPTS):
        a, b = generated[token], kept[str(k)]
        rows[token] = {
            "all": a,
            "kept": b,
            "digit_gain": b["digit_accuracy"] - a["digit_accuracy"],
            "style_gain": b["style_rate"] - a["style_rate"],
        }
    return rows


def two_concept_prompt(a: int, ta: str, b: int, tb: str):
    """The naive prompt, the layout prompt and the two regions (halves as boxes) of digit a in token ta's style next
    to digit b in token tb's."""
    from difflab.personalize.compose import Region

    left, right = f"the number {a} in the style of {ta}", f"the number {b} in the style of {tb}"
    concepts = [Region(str(a), left, (0, 0, 0.5, 1)), Region(str(b), right, (0.5, 0, 1, 1))]
    return f"{left} next to {right}", f"the number {a} next to the number {b}", concepts


def composition(cfg: PersonalizeDemoConfig, pipe, judges: Judges, scorer, out: Path) -> dict:
    """Both halves right (digit and style) on the development and held-out prompts: the naive prompt against
    region-wise denoising with the regions given ("next to": left and right half) and found by `--layout auto` in a
    layout image of the plain two-digit prompt, all from the same initial noise. Stage 1's images, the found masks
    and the composed images of a few held-out prompts are kept for the report."""
    from difflab.personalize.compose import (
        AUTO_FINDER,
        ComposeConfig,
        box_masks,
        decode,
        denoise_regions,
        layout_noises,
        masks_figure,
        plain,
        read_layouts,
        surest,
    )

    ccfg = ComposeConfig(
        steps=cfg.steps, guidance=cfg.guidance, height=32, width=64, layout_steps=cfg.compose_layout_steps,
        layouts=cfg.compose_layouts, clip_template="a photo of the number {}",
    )  # fmt: skip
    styles = dict(CONCEPTS)
    layouts = ccfg.layouts_for(AUTO_FINDER)
    result = {"finder": AUTO_FINDER, "layout_steps": ccfg.layout_steps, "layouts": layouts}
    for set_name, prompts in composition_sets().items():
        images: dict[str, list] = {"naive": [], "composed": [], "composed_auto": []}
        wanted, sides, examples = [], [], []
        for a, ta, b, tb in prompts:
            prompt, layout_prompt, concepts = two_concept_prompt(a, ta, b, tb)
            region_prompts = [prompt, *(c.prompt for c in concepts)]
            for s in range(cfg.compose_seeds):
                noises = layout_noises(pipe, cfg.seed + s, ccfg.height, ccfg.width, layouts)
                latents = noises[0]
                chosen = surest(read_layouts(pipe, layout_prompt, noises, concepts, ccfg, AUTO_FINDER, scorer))
                layout, at_k, masks = chosen.layout, chosen.at_k, chosen.masks
                made = {
                    "naive": denoise_regions(pipe, latents, *plain(prompt, latents), ccfg),
                    "composed": denoise_regions(pipe, latents, region_prompts, box_masks(
                        [c.box for c in concepts], latents.shape[-2:]), ccfg),
                    "composed_auto": denoise_regions(pipe, at_k, region_prompts, masks, ccfg,
                                                     start=ccfg.layout_steps),
                }  # fmt: skip
                for name, latent in made.items():
                    images[name].append(np.asarray(decode(pipe, latent).convert("RGB")))
                if s == 0 and len(examples) < 6:
                    figure = masks_figure(layout.image, masks)
                    examples.append(np.concatenate([figure, image_grid(images["composed_auto"][-1][None], 1, 1)], 1))
                wanted.append((a, b))
                sides.append((DOMAINS.index(styles[ta]), DOMAINS.index(styles[tb])))
        result[set_name] = composition_scores(judges, images, np.array(wanted), np.array(sides))
        if set_name == "development":
            for name, made in images.items():
                # The first seed of each prompt, two rows of five: wide enough to read at three times the size.
                save_png(image_grid(np.stack(made)[:: cfg.compose_seeds][:10], 2, 5), out / f"{name}.png")
        else:
            save_png(image_grid(np.stack(examples), len(examples), 1), out / "layouts.png")
    return result


def composition_scores(judges: Judges, images: dict, want: np.ndarray, styles: np.ndarray) -> dict:
    """Both-halves-right rate of each way of composing, its Wilson 95 % interval, and its paired gain over naive."""
    from scipy.stats import binomtest

    right = {name: both_halves_right(judges, np.stack(made), want, styles) for name, made in images.items()}
    scores: dict = {"n": len(want)}
    for name, ok in right.items():
        interval = binomtest(int(ok.sum()), len(ok)).proportion_ci(method="wilson")
        scores[name] = float(ok.mean())
        scores[f"{name}_interval"] = [float(interval.low), float(interval.high)]
        if name != "naive":
            diff = ok.astype(float) - right["naive"]
            scores[f"{name}_gain"] = float(diff.mean())
            scores[f"{name}_gain_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return scores
