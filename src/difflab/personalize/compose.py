"""Multi-concept composition by region-wise denoising, in two stages as OMG (Kong et al. 2024) does.

Prompting "a <new1> in a city in a style of <new2>" directly tends to drop or blend one learned concept. Here:
  1. layout: the regions are given as boxes (regional prompting), or found (`difflab.personalize.layout`) in a
     layout image that a plain prompt of the concepts' class words makes ("a dog next to a cat"): from its
     cross-attention, or by CLIP on its windows;
  2. composition: each region is denoised with its own concept prompt and the background with the background
     prompt; the classifier-free-guided noise predictions are blended by the masks, all prompts (plus one shared
     unconditional) in one UNet batch. With a layout image, stage 2 starts from its latents after `layout_steps`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.io import open_run, save_png, write_csv
from difflab.personalize.generate import (
    SDSampling,
    check_learned_tokens,
    encode_prompt,
    image_size,
    initial_latents,
    reference_images,
    set_scheduler,
    thumbnails,
)
from difflab.personalize.layout import (
    FINDERS,
    Layout,
    SmallRegion,
    attention_regions,
    box_masks,
    check_regions,
    clip_regions,
)
from difflab.utils import DifflabError, image_grid, stream_seed

REGION_NAMES = ("red", "blue", "green", "yellow", "purple")  # the colours below, after the background's grey
REGION_COLOURS = np.array(
    [[128, 128, 128], [230, 60, 60], [60, 120, 230], [60, 190, 90], [230, 180, 40], [170, 80, 200]], dtype=np.float32
)


LAYOUTS = ("auto", *FINDERS, "boxes")
# What `--layout auto` uses: the finder that measured best on the miniature stack (benchmarks/personalize_layout.py).
AUTO_FINDER = "clip"
# Stage-1 images each finder tries by default: for CLIP, the number that measured best on the same benchmark's
# development set; the attention finder has no sureness to choose between images by.
FINDER_LAYOUTS = {"clip": 4, "attention": 1}


@dataclass
class ComposeConfig(SDSampling):
    layout: str = "auto"  # one of LAYOUTS: "boxes" needs every concept's box, the others none
    layout_steps: int = 0  # stage 2 starts from the layout image's latents after this many of its steps
    # Stage-1 images tried (seeds seed, then its stream); the finder keeps the one it reads surest. None: the
    # finder's FINDER_LAYOUTS.
    layouts: int | None = None
    smooth: float = 1.0  # Gaussian sigma, in latent pixels, applied to the attention maps (0: none)
    capture_fraction: float = 0.5  # the attention finder averages this first fraction of stage 1's steps
    clip_template: str = "a photo of {}"  # what the CLIP finder scores each class word as
    min_region: float = 0.05  # a found region under this share of the latent is an error
    num_images: int = 1  # images composed with seeds seed, seed + 1, ...; scores are averaged over them

    def check(self) -> None:
        super().check()
        if self.steps < 1 or self.num_images < 1:
            raise DifflabError(f"steps = {self.steps}, num_images = {self.num_images}: must be at least 1")
        if self.layout not in LAYOUTS:
            raise DifflabError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.layouts is not None and not 1 <= self.layouts <= 64:
            raise DifflabError(f"layouts {self.layouts}: try between 1 and 64 stage-1 images")
        if not 0 <= self.layout_steps < self.steps:
            raise DifflabError(f"layout steps {self.layout_steps} must be in [0, {self.steps - 1}] (of --steps)")
        if not 0 < self.capture_fraction <= 1 or not 0 <= self.min_region < 1:
            raise DifflabError(
                f"capture fraction must be in (0, 1] and the smallest region in [0, 1), got "
                f"{self.capture_fraction} and {self.min_region}"
            )
        if "{}" not in self.clip_template:
            raise DifflabError(f"CLIP template {self.clip_template!r} has no {{}} for the class word")
        check_size(self.height, self.width, 8)  # a multiple of 8 for any SD; the model's own multiple in compose()

    def layouts_for(self, finder: str) -> int:
        """The stage-1 images `finder` tries: `layouts`, or where that is None the finder's own default."""
        return self.layouts or FINDER_LAYOUTS[finder]


def size_multiple(pipe) -> int:
    """Image sides whose UNet levels halve exactly: VAE factor x 2^(levels - 1) (64 for SD v1, 8 for the mini SD)."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def check_size(height: int | None, width: int | None, multiple: int) -> None:
    """The attention maps are reshaped to the UNet's level sizes, which halve exactly only for multiples of
    `multiple` (in SD v1 a 600-px image has latent levels 75, 38, 19: rounded up, not down)."""
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v is not None and v % multiple]
    if bad:
        raise DifflabError(f"{', '.join(bad)}: compose needs image sides that are multiples of {multiple}")


Box = tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the image's width and height


@dataclass
class Region:
    words: str  # the concept's class word in the layout prompt, e.g. "dog" or "3": what a finder locates
    prompt: str  # prompt that denoises the concept's region, e.g. "a photo of a <new1> dog"
    box: Optional[Box] = None  # where the concept goes (`--layout boxes`)


@dataclass
class Composition:
    naive: Image.Image
    composed: Image.Image
    masks: torch.Tensor  # (1 + concepts, h, w) one-hot over regions at latent size; region 0 is the background
    prompts: list[str] = field(default_factory=list)  # region prompts, background first
    layout: Optional[Image.Image] = None  # stage 1's image, when the regions were found in it
    layout_prompt: str = ""
    finder: str = "boxes"


class AttentionStore:
    """Running sums of cross-attention probabilities (averaged over heads), grouped by number of query pixels."""

    def __init__(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.active = True

    def add(self, probs: torch.Tensor) -> None:
        if not self.active:
            return
        q = probs.shape[1]
        probs = probs.detach().float()
        self.sums[q] = self.sums[q] + probs if q in self.sums else probs.clone()
        self.counts[q] = self.counts.get(q, 0) + 1


class StoringCrossAttnProcessor:
    """Plain attention that also hands its softmaxed cross-attention probabilities to an `AttentionStore`."""

    def __init__(self, store: AttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        batch, pixels, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, pixels, tokens)
        self.store.add(probs.reshape(batch, attn.heads, pixels, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(unet, store: AttentionStore):
    """Record every cross-attention layer (`attn2`) of the UNet into `store` while inside the block."""
    original = unet.attn_processors
    recording = StoringCrossAttnProcessor(store)
    unet.set_attn_processor(
        {name: recording if name.endswith("attn2.processor") else proc for name, proc in original.items()}
    )
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def token_indices(pipe, prompt: str, words: str) -> list[int]:
    """Positions of `words` inside the tokenized `prompt` (position 0 is the start token).

    Multi-vector learned tokens are widened first, exactly as the pipeline's prompt encoding does."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        pipe.maybe_convert_prompt(prompt, tokenizer), truncation=True, max_length=tokenizer.model_max_length
    ).input_ids
    sub = tokenizer(pipe.maybe_convert_prompt(words, tokenizer), add_special_tokens=False).input_ids
    if not sub:
        raise DifflabError(f"concept words {words!r} are empty after tokenization")
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise DifflabError(f"concept words {words!r} do not occur in the prompt {prompt!r}")


def check_boxes(concepts: Sequence[Region]) -> bool:
    """True when every concept has a valid box, False when none has one."""
    boxed = [c for c in concepts if c.box is not None]
    if boxed and len(boxed) != len(concepts):
        raise DifflabError("give a box to every concept or to none (the others would have no place)")
    for c in boxed:
        left, top, right, bottom = c.box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise DifflabError(
                f"box of {c.words!r} {c.box}: want left < right and top < bottom, fractions of the image in [0, 1]"
            )
    return bool(boxed)


@torch.inference_mode()
def denoise_regions(
    pipe,
    latents: torch.Tensor,
    prompts: Sequence[str],
    masks: torch.Tensor,
    cfg: ComposeConfig,
    start: int = 0,
    stop: int | None = None,
    each_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise one latent (1,C,H,W) through the scheduler's steps start..stop, where region r follows prompts[r];
    the guided noise predictions are blended by `masks` (R,H,W). All prompts and one shared unconditional embedding
    go through the UNet in one batch. Starting at 0 scales the pure noise first; `each_step(i, latents)` is called
    before step i. Returns the latents."""
    conds, unconds = zip(*(encode_prompt(pipe, p, cfg.negative_prompt) for p in prompts))
    context = torch.cat([unconds[0], *conds])
    weights = masks.to(latents.device, latents.dtype)[:, None]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(cfg.steps, device=latents.device)
    if start == 0:
        latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[start:stop], start=start):
        if each_step is not None:
            each_step(i, latents)
        x = scheduler.scale_model_input(latents.expand(len(context), -1, -1, -1), t)
        eps = pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        guided = eps[:1] + cfg.guidance * (eps[1:] - eps[:1])
        latents = scheduler.step((weights * guided).sum(0, keepdim=True), t, latents, return_dict=False)[0]
    return latents


@torch.inference_mode()
def decode(pipe, latents: torch.Tensor) -> Image.Image:
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def plain(prompt: str, latents: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """One prompt over the whole latent, as `denoise_regions` takes it."""
    return [prompt], torch.ones(1, *latents.shape[-2:])


@torch.inference_mode()
def layout_stage(pipe, layout_prompt: str, latents: torch.Tensor, cfg: ComposeConfig) -> tuple[Layout, torch.Tensor]:
    """Stage 1: the layout prompt's image from `latents`, the cross-attention of its first `capture_fraction` of
    steps, and its latents after `layout_steps` steps (where stage 2 starts)."""
    store = AttentionStore()
    capture = max(1, round(cfg.capture_fraction * cfg.steps))
    snapshot = {0: latents}  # before any step: the noise itself, unscaled, as stage 2 takes it

    def each_step(i: int, x: torch.Tensor) -> None:
        store.active = i < capture
        if i == cfg.layout_steps and i > 0:
            snapshot[i] = x

    with capture_cross_attention(pipe.unet, store):
        x = denoise_regions(pipe, latents, *plain(layout_prompt, latents), cfg, each_step=each_step)
    at_k = snapshot[cfg.layout_steps]
    tokens = len(pipe.tokenizer(pipe.maybe_convert_prompt(layout_prompt, pipe.tokenizer)).input_ids)
    attention = {q: (total / store.counts[q])[-1] for q, total in store.sums.items()}  # the prompt's row
    return Layout(decode(pipe, x), attention, tokens, tuple(latents.shape[-2:])), at_k


def layout_prompt_for(concepts: Sequence[Region]) -> str:
    """The layout prompt derived from the regions: their class words, left to right, "a dog next to a cat"."""
    return " next to ".join(f"a {c.words}" for c in concepts)


def find_regions(pipe, layout: Layout, layout_prompt: str, concepts, cfg: ComposeConfig, finder: str, scorer):
    """(1+C,H,W) masks from stage 1 by `finder`, each region checked to be at least `cfg.min_region`, and how
    surely the finder reads them (the CLIP finder's mean log-odds; 0 for the attention finder)."""
    words = [c.words for c in concepts]
    if len(set(words)) < len(words):
        raise DifflabError(f"class words {words} repeat: each concept needs its own word in the layout prompt")
    groups = [token_indices(pipe, layout_prompt, w) for w in words]  # every word must be in the layout prompt
    if finder == "clip":
        if scorer is None:
            raise DifflabError("--layout clip needs a CLIP model (--clip)")
        masks, _, sureness = clip_regions(layout, [cfg.clip_template.format(w) for w in words], scorer)
    else:
        masks, sureness = attention_regions(layout, groups, cfg.smooth), 0.0
    check_regions(masks, words, cfg.min_region)
    return masks, sureness


def layout_noises(pipe, seed: int, height: int, width: int, count: int) -> list[torch.Tensor]:
    """The noises stage 1 starts from: the composition's own (`seed`), then `count - 1` more from its stream."""
    seeds = [seed] + [stream_seed(seed, j) for j in range(1, count)]
    return [initial_latents(pipe, [s], height, width) for s in seeds]


@dataclass
class LayoutRead:
    """One stage-1 image as a finder read it."""

    layout: Layout
    at_k: torch.Tensor  # its latents after `layout_steps`, where stage 2 starts
    masks: Optional[torch.Tensor] = None  # None: the finder refused the image
    sureness: float = -float("inf")
    refusal: Optional[SmallRegion] = None


def read_layouts(pipe, layout_prompt: str, noises: Sequence[torch.Tensor], concepts, cfg, finder: str, scorer):
    """Stage 1 from each of `noises`, each image read by the finder."""
    read = []
    for noise in noises:
        layout, at_k = layout_stage(pipe, layout_prompt, noise, cfg)
        try:
            masks, sureness = find_regions(pipe, layout, layout_prompt, concepts, cfg, finder, scorer)
            read.append(LayoutRead(layout, at_k, masks, sureness))
        except SmallRegion as error:  # a fault of this image; any other error is the request's, raised at once
            read.append(LayoutRead(layout, at_k, refusal=error))
    return read


def surest(read: Sequence[LayoutRead]) -> LayoutRead:
    """The image the finder reads most surely; an image it refused is passed over, and if it refused all, the
    first refusal is raised."""
    kept = [r for r in read if r.masks is not None]
    if not kept:
        raise read[0].refusal
    return max(kept, key=lambda r: r.sureness)


@torch.inference_mode()
def compose(
    pipe,
    prompt: str,
    concepts: Sequence[Region],
    cfg: ComposeConfig,
    background: str | None = None,
    seed: int | None = None,
    layout_prompt: str | None = None,
    scorer=None,
) -> Composition:
    """The naive image of `prompt` and the region-wise composed image, the regions given as boxes
    (`cfg.layout` "boxes") or found in a layout image of `layout_prompt` (default: derived from the class words)
    by a finder: "attention", "clip" (needs `scorer`, a `ClipScorer`) or "auto"."""
    if not concepts:
        raise DifflabError("compose needs at least one concept (--concepts WORDS=PROMPT)")
    cfg.check()
    boxed = check_boxes(concepts)
    if boxed != (cfg.layout == "boxes"):
        raise DifflabError(
            "--layout boxes needs a box for every concept"
            if not boxed
            else f"boxes go with --layout boxes, not --layout {cfg.layout}"
        )
    prompts = [background or prompt] + [c.prompt for c in concepts]
    check_learned_tokens(pipe, [prompt, *prompts])
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    height, width = image_size(pipe, cfg)
    check_size(height, width, size_multiple(pipe))
    latents = initial_latents(pipe, [cfg.seed if seed is None else seed], height, width)
    naive = decode(pipe, denoise_regions(pipe, latents, *plain(prompt, latents), cfg))
    if boxed:
        masks = box_masks([c.box for c in concepts], latents.shape[-2:], [c.words for c in concepts])
        composed = denoise_regions(pipe, latents, prompts, masks, cfg)
        return Composition(naive, decode(pipe, composed), masks.cpu(), prompts)
    finder = cfg.layout if cfg.layout != "auto" else (AUTO_FINDER if scorer is not None else "attention")
    layout_prompt = layout_prompt or layout_prompt_for(concepts)
    seed = cfg.seed if seed is None else seed
    noises = layout_noises(pipe, seed, height, width, cfg.layouts_for(finder))
    chosen = surest(read_layouts(pipe, layout_prompt, noises, concepts, cfg, finder, scorer))
    layout, at_k, masks = chosen.layout, chosen.at_k, chosen.masks
    composed = denoise_regions(pipe, at_k, prompts, masks, cfg, start=cfg.layout_steps)
    return Composition(naive, decode(pipe, composed), masks.cpu(), prompts, layout.image, layout_prompt, finder)


def masks_figure(base: Image.Image, masks: torch.Tensor) -> np.ndarray:
    """An image (stage 1's layout image, or with boxes the naive one) and the regions `masks` over it."""
    image = np.asarray(base.convert("RGB"), dtype=np.float32)
    region = F.interpolate(masks.argmax(0)[None, None].float(), size=base.size[::-1], mode="nearest")
    overlay = 0.5 * image + 0.5 * REGION_COLOURS[region[0, 0].numpy().astype(int) % len(REGION_COLOURS)]
    return image_grid(np.stack([image, overlay]).round().astype(np.uint8), 1, 2)


def compose_images(
    pipe,
    prompt: str,
    concepts: Sequence[Region],
    cfg: ComposeConfig,
    out: str | os.PathLike,
    background: str | None = None,
    scorer=None,
    refs: Sequence[tuple[str, str | os.PathLike]] = (),
    overwrite: bool = False,
    layout_prompt: str | None = None,
) -> Path:
    """Compose `cfg.num_images` images (seeds seed, seed+1, ...); write PNGs, figures, scores and `report.html`
    into `out`, moved in once all are made. `scorer` (a `ClipScorer`) scores against `refs` and finds regions
    for `--layout clip`."""
    cfg.check()
    with open_run(out, "personalize compose", overwrite=overwrite, staged=True) as run:
        _compose_images(pipe, prompt, concepts, cfg, run.dir, background, scorer, refs, layout_prompt)
    return Path(out)


def _compose_images(pipe, prompt, concepts, cfg, out: Path, background, scorer, refs, layout_prompt) -> None:
    from tqdm.auto import tqdm

    # The references are read first: a bad folder fails before minutes of sampling.
    ref_embeds = {words: scorer.image_embeds(reference_images(folder)) for words, folder in refs} if scorer else {}
    seeds = [stream_seed(cfg.seed, i) for i in range(cfg.num_images)]
    results = [
        compose(pipe, prompt, concepts, cfg, background, seed, layout_prompt, scorer)
        for seed in tqdm(seeds, desc="compose", unit="img")
    ]
    figures = write_compositions(results, out)
    header = ["concept", "naive image score", "composed image score", "difference"]
    rows = composition_scores(scorer, ref_embeds, results) if ref_embeds else []
    if rows:
        write_csv(out / "scores.csv", header, [[w, f"{a:.4f}", f"{b:.4f}", f"{d:.4f}"] for w, a, b, d in rows])
    report = composition_report(prompt, concepts, cfg, background, seeds, results, figures)
    if rows:
        report.heading(f"CLIP image score against each concept's references (mean of {cfg.num_images} images)")
        report.table(header, rows)
    report.save(out / "report.html")


def write_compositions(results: list[Composition], out: Path) -> list[np.ndarray]:
    """`naive_<i>.png`, `composed_<i>.png`, stage 1's `layout_<i>.png` and the mask figure `masks_<i>.png` of each
    result; returns the figures."""
    figures = []
    for i, result in enumerate(results):
        save_png(np.asarray(result.naive), out / f"naive_{i}.png")
        save_png(np.asarray(result.composed), out / f"composed_{i}.png")
        if result.layout is not None:
            save_png(np.asarray(result.layout.convert("RGB")), out / f"layout_{i}.png")
        figures.append(masks_figure(result.layout or result.naive, result.masks))
        save_png(figures[-1], out / f"masks_{i}.png")
    return figures


def composition_scores(scorer, ref_embeds: dict, results: list[Composition]) -> list[list]:
    """Per concept: the mean CLIP image score of the naive and of the composed images against its references."""
    naive_emb = scorer.image_embeds([r.naive for r in results])
    composed_emb = scorer.image_embeds([r.composed for r in results])
    rows = []
    for words, refs_emb in ref_embeds.items():
        naive_s = float(scorer.image_score(naive_emb, refs_emb).mean())
        composed_s = float(scorer.image_score(composed_emb, refs_emb).mean())
        rows.append([words, naive_s, composed_s, composed_s - naive_s])
    return rows


def composition_report(prompt, concepts, cfg: ComposeConfig, background, seeds, results, figures):
    from difflab.report import HtmlReport

    report = HtmlReport("Multi-concept composition: naive prompt vs region-wise denoising")
    report.pre(
        f"prompt: {prompt}\n"
        + "\n".join(f"region {c.words}: {c.prompt}" + (f" in box {c.box}" if c.box else "") for c in concepts)
        + f"\nbackground: {background or prompt}\nsteps={cfg.steps} guidance={cfg.guidance} "
        f"scheduler={cfg.scheduler} layout={results[0].finder} layout steps={cfg.layout_steps}"
        + (f"\nlayout prompt: {results[0].layout_prompt}" if results[0].layout_prompt else "")
    )
    for seed, result, figure in zip(seeds, results, figures, strict=True):
        report.heading(f"seed {seed}")
        report.image(np.asarray(result.naive), caption="naive prompt")
        report.image(np.asarray(result.composed), caption="composed")
        stage = "stage 1's layout image" if result.layout is not None else "naive image"
        regions = ", ".join(f"{c.words} {name}" for c, name in zip(concepts, REGION_NAMES))
        report.image(figure, caption=f"{stage} | regions found by {result.finder}: {regions}")
    if len(results) > 1:
        report.heading("All images (top: naive, bottom: composed)")
        naive, composed = [r.naive for r in results], [r.composed for r in results]
        report.image(image_grid(thumbnails(naive + composed), 2, len(results)))
    return report
