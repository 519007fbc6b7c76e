"""What each tab of the app computes, as plain functions of the page's values: they return images (uint8 arrays)
and numbers, and raise `DifflabError` with a one-line message on bad input. The page layout is in `ui.py`."""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from difflab.app.models import Models
from difflab.digits.data import DOMAINS
from difflab.report import mark
from difflab.utils import DifflabError, image_grid, to_uint8

MAX_IMAGES = 64
ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_range(name: str, value: float, low: float, high: float) -> float:
    if value is None or not math.isfinite(value) or not low <= value <= high:
        raise DifflabError(f"{name} = {value}: must be in [{low:g}, {high:g}]")
    return value


def whole(name: str, value: float, low: int, high: int) -> int:
    check_range(name, value, low, high)
    if value != int(value):
        raise DifflabError(f"{name} = {value}: must be a whole number")
    return int(value)


def enlarge(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """A small image (or grid) blown up by whole pixels, so the browser shows it sharp."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


# ---- digits ---------------------------------------------------------------------------------------------------
def digits(
    models: Models,
    domain: str,
    digit: float,
    guidance_digit: float,
    guidance_domain: float,
    method: str,
    steps: float,
    eta: float,
    seed: float,
    count: float,
) -> tuple[list[tuple[np.ndarray, str]], np.ndarray, str]:
    """The images `difflab digits sample --seed SEED` makes first for (domain, digit), each with the judges' verdict,
    and the reverse process of the first one."""
    from difflab.digits.pipeline import layout_generators
    from difflab.digits.sample import generate, make_conds, snapshot_timesteps
    from difflab.samplers import METHODS

    if domain not in DOMAINS:
        raise DifflabError(f"domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    if method not in (*METHODS, "ddpm"):
        raise DifflabError(f"sampler {method!r}: choose one of {', '.join((*METHODS, 'ddpm'))}")
    digit, count = whole("digit", digit, 0, 9), whole("count", count, 1, MAX_IMAGES)
    seed = whole("seed", seed, 0, 2**63 - 1)
    pipe = models.digits()
    cfg = replace(
        pipe.config,
        method=method,
        steps=whole("steps", steps, 1, pipe.schedule.num_steps),
        eta=check_range("eta", eta, 0, 1),
        guidance_digit=check_range("digit guidance", guidance_digit, 0, 100),
        guidance_domain=check_range("domain guidance", guidance_domain, 0, 100),
        seed=seed,
    )
    d = DOMAINS.index(domain)
    picks = snapshot_timesteps(cfg, pipe.schedule)
    cond = make_conds([d] * count, [digit] * count)
    gens = layout_generators(seed, d, digit, count)
    images, traj = generate(pipe.net, pipe.schedule, cond, cfg, pipe.device, capture=picks, generator=gens)
    pixels = to_uint8(images)
    judges = models.judges()
    if judges is None:
        captions = [f"#{n + 1}" for n in range(count)]
        verdict = "no judges beside the model: `make demo` trains them"
    else:
        said = judges[domain].predict(pixels)
        captions = [f"#{n + 1}: {k} {mark(k == digit)}" for n, k in enumerate(said)]
        verdict = f"the {domain} judge reads {int((said == digit).sum())} of {count} as {digit}"
    frames = [to_uint8(traj[t][:1].clamp(-1, 1))[0] for t in picks] + [pixels[0]]
    strip = enlarge(image_grid(np.stack(frames), 1, len(frames)))
    times = ", ".join(f"t={t}" for t in [*picks, 0])
    return [(enlarge(p), c) for p, c in zip(pixels, captions)], strip, f"{verdict}. Reverse process of #1 at {times}."


# ---- DDIM -----------------------------------------------------------------------------------------------------
def ddim_noises(model, seeds: tuple[float, float], files: tuple[str | None, str | None]):
    """Two noises: from the user's files where given, else drawn as `ddim sample --noise-seed S --num-noises 1`."""
    from difflab.ddim.noise import load_noise
    from difflab.ddim.pipeline import draw_noises

    noises = []
    for seed, file in zip(seeds, files):
        if file:
            noise = load_noise(file, model.channels)
            model.check_input(tuple(noise.shape), Path(file).name)
        else:
            noise = draw_noises(model, ["x"], whole("seed", seed, 0, 2**63 - 1))
        noises.append(noise)
    return noises


def ddim_model(models: Models, domain: str, digit: float, guidance: float):
    if domain not in DOMAINS:
        raise DifflabError(f"domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    return models.eps(DOMAINS.index(domain), whole("digit", digit, 0, 9), check_range("guidance", guidance, 0, 100))


def ddim_config(steps: float):
    from difflab.ddim.pipeline import DDIMConfig

    return DDIMConfig(steps=whole("steps", steps, 1, 1000), batch_size=32)


def ddim_views(
    models: Models,
    domain: str,
    digit: float,
    guidance: float,
    seed_a: float,
    seed_b: float,
    noise_a: str | None,
    noise_b: str | None,
    steps: float,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """An η strip of noise A; lerp and slerp strips from A to B; and the two images at `alpha`, with the noises'
    norms (lerp shrinks the noise between the ends, which DDIM turns into blur)."""
    from difflab.ddim.noise import minmax_uint8
    from difflab.ddim.pipeline import eta_grid, interpolate, lerp, slerp

    model = ddim_model(models, domain, digit, guidance)
    cfg = ddim_config(steps)
    alpha = check_range("alpha", alpha, 0, 1)
    a, b = ddim_noises(model, (seed_a, seed_b), (noise_a, noise_b))
    etas = eta_grid(model, a, ETAS, cfg)[0]  # the steps' progress bars show on the page
    strips = interpolate(model, a, b, ["lerp", "slerp"], [*ALPHAS, alpha], cfg)
    rows = np.stack([minmax_uint8(strips[m][: len(ALPHAS)]) for m in ("lerp", "slerp")])
    pair = np.stack([minmax_uint8(strips[m][-1:])[0] for m in ("lerp", "slerp")])
    ends = float((a.norm() + b.norm()) / 2)
    lerp_norm, slerp_norm = float(lerp(a, b, alpha).norm()), float(slerp(a, b, alpha).norm())
    norms = f"‖x‖ at α = {alpha:g}: lerp {lerp_norm:.1f}, slerp {slerp_norm:.1f}"
    return (
        enlarge(image_grid(minmax_uint8(etas), 1, len(ETAS))),
        enlarge(image_grid(rows.reshape(-1, *rows.shape[2:]), 2, len(ALPHAS))),
        enlarge(image_grid(pair, 1, 2)),
        f"η = {', '.join(map(str, ETAS))} from noise A. {norms} (the ends: {ends:.1f}).",
    )


def ddim_invert(
    models: Models, domain: str, digit: float, guidance: float, image: np.ndarray | None, steps: float
) -> tuple[np.ndarray, str]:
    """DDIM inversion of an uploaded image (resized to the model's size) and its reconstruction, with the MSE."""
    from difflab.ddim.pipeline import invert_image

    if image is None:
        raise DifflabError("upload an image to invert")
    model = ddim_model(models, domain, digit, guidance)
    size = model.sample_size or 64
    resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        resized.save(path)
        result = invert_image(model, path, config=ddim_config(steps))
    pair = np.stack([np.asarray(resized), to_uint8(result.reconstruction.clamp(-1, 1))[0]])
    return enlarge(image_grid(pair, 1, 2)), f"MSE (0-255) of the reconstruction: {result.mse:.2f}"


# ---- CLIP -----------------------------------------------------------------------------------------------------
def class_names(text: str, id2label: str | None) -> list[str]:
    """Class names from an `id2label.json` (ordered by id) or from the text (commas or lines)."""
    if id2label:
        from difflab.clip.data import load_id2label

        mapping = load_id2label(id2label)
        try:
            return [mapping[k] for k in sorted(mapping, key=int)]
        except ValueError:
            raise DifflabError(f"{Path(id2label).name}: ids must be whole numbers") from None
    names = [n.strip() for n in re.split(r"[,\n]", text or "") if n.strip()]
    if not names:
        raise DifflabError("give at least one class name (commas or one per line), or an id2label.json")
    return names


def clip_top5(
    models: Models, image: np.ndarray | None, classes: str, id2label: str | None, templates: str
) -> tuple[dict[str, float], dict[str, float], str]:
    """Top-5 probabilities with the first template alone and with the ensemble of all templates given."""
    from difflab.clip.zeroshot import ENSEMBLE_TEMPLATES, zeroshot_classifier

    if image is None:
        raise DifflabError("upload or pick an image")
    names = class_names(classes, id2label)
    lines = [t.strip() for t in (templates or "").splitlines() if t.strip()] or list(ENSEMBLE_TEMPLATES)
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise DifflabError(f"template {bad[0]!r} must contain exactly one '{{}}' for the class name")
    clip = models.clip()
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    out = []
    for used in ([lines[0]], lines):
        clf = zeroshot_classifier(clip.model, names, used, clip.tokenizer, clip.processor, models.device)
        pred = clf.predict([picture], k=5)
        out.append({names[int(i)]: float(p) for i, p in zip(pred.topk[0], pred.topk_probs[0])})
    return out[0], out[1], f"{len(names)} classes; one template: {lines[0]!r}; ensemble: {len(lines)} templates"


# ---- personalization ------------------------------------------------------------------------------------------
def known_tokens(pipe, prompt: str) -> list[str]:
    """The `<token>`s of a prompt, each checked to be loaded."""
    from difflab.personalize.generate import check_learned_tokens

    check_learned_tokens(pipe, [prompt])
    return re.findall(r"<[^<>\s]+>", prompt)


def personalize(
    models: Models, prompt: str, score_text: str, count: float, steps: float, guidance: float, seed: float
) -> tuple[list[tuple[np.ndarray, str]], str]:
    """Images of a prompt with learned tokens, each with its CLIP image score (against the references of the
    prompt's tokens) and text score (against `score_text`)."""
    from difflab.personalize.generate import GenerateConfig, encode_prompt, image_seed, sample

    if not (prompt or "").strip():
        raise DifflabError("write a prompt, e.g. 'the number 3 in the style of <new1>'")
    pipe = models.sd()
    tokens = known_tokens(pipe, prompt)
    count = whole("count", count, 1, 16)
    cfg = GenerateConfig(
        per_prompt=count,
        steps=whole("steps", steps, 1, 200),
        guidance=check_range("guidance", guidance, 0, 100),
        seed=whole("seed", seed, 0, 2**63 - 1),
        batch_size=count,
    )
    seeds = [image_seed(cfg.seed, "app", 0, n) for n in range(count)]
    with tqdm(total=count, desc="images", unit="img") as bar:  # the page shows it
        images = sample(pipe, encode_prompt(pipe, prompt), seeds, cfg, bar)
    scorer = models.scorer()
    made = scorer.image_embeds(images)
    text = (score_text or "").strip() or re.sub(r"<[^<>\s]+>", "", prompt)
    text_s = scorer.text_score(made, scorer.text_embeds([text]))
    refs = [r for r in (models.reference_embeds(t) for t in tokens) if r is not None]
    image_s = scorer.image_score(made, torch.cat(refs)) if refs else None
    captions = [
        (f"image {float(image_s[n]):.1f} · " if image_s is not None else "") + f"text {float(text_s[n]):.1f}"
        for n in range(count)
    ]
    pixels = [enlarge(np.asarray(im.convert("RGB"))) for im in images]
    # Backticks: the page renders Markdown, where a bare <new1> would be taken for an HTML tag.
    where = f"references of {', '.join(f'`{t}`' for t in tokens)}" if refs else "no references known for these tokens"
    return list(zip(pixels, captions)), f"Image score: 100 x cosine to the {where}. Text score against `{text}`."


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise DifflabError(f"box {text!r}: expected left,top,right,bottom as fractions, e.g. 0,0,0.5,1")
    return box


def compose(
    models: Models,
    left: str,
    right: str,
    left_box: str,
    right_box: str,
    steps: float,
    guidance: float,
    seed: float,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The naive prompt "LEFT next to RIGHT" against composition with each half denoised by its own prompt inside
    its box, from the same noise; the boxes drawn on the composed image."""
    from difflab.personalize.compose import ComposeConfig, Region, compose

    if not (left or "").strip() or not (right or "").strip():
        raise DifflabError("write both concepts' prompts")
    pipe = models.sd()
    boxes = (parse_box(left_box), parse_box(right_box))
    height = pipe.vae_scale_factor * pipe.unet.config.sample_size  # the model's native size
    cfg = ComposeConfig(
        steps=whole("steps", steps, 1, 200),
        guidance=check_range("guidance", guidance, 0, 100),
        seed=whole("seed", seed, 0, 2**63 - 1),
        height=height,
        width=2 * height,
        layout="boxes",
    )
    regions = [Region(p, p, box) for p, box in zip((left, right), boxes)]
    result = compose(pipe, f"{left} next to {right}", regions, cfg)
    naive = enlarge(np.asarray(result.naive.convert("RGB")), 6)
    composed = Image.fromarray(enlarge(np.asarray(result.composed.convert("RGB")), 6))
    draw = ImageDraw.Draw(composed)
    for (x0, y0, x1, y1), colour in zip(boxes, ("#e63c3c", "#3c78e6")):
        w, h = composed.size
        draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=colour, width=3)
    return naive, np.asarray(composed), f"naive prompt: `{left} next to {right}`"
