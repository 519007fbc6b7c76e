"""Multi-concept composition by region-wise denoising (in the spirit of OMG).

Prompting "a <new1> in a city in a style of <new2>" directly tends to drop or blend one learned concept.
Here the image is made in two passes from the same initial latent:
  1. layout: the plain prompt is denoised while the cross-attention probabilities are recorded; each
     concept's region is where the attention of its words dominates (normalise, smooth, threshold/argmax).
     Or the regions are given as boxes, as in regional prompting: a UNet whose cross-attention does not
     localise words (the mini SD's) still draws each concept where it is told;
  2. composition: at every step each region is denoised with its own concept prompt and the background
     with the background prompt; the classifier-free-guided noise predictions are blended by the masks.
     All prompts (plus one shared unconditional) go through the UNet in one batch.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

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
from difflab.utils import DifflabError, image_grid, stream_seed

REGION_COLOURS = np.array(
    [[128, 128, 128], [230, 60, 60], [60, 120, 230], [60, 190, 90], [230, 180, 40], [170, 80, 200]], dtype=np.float32
)


@dataclass
class ComposeConfig(SDSampling):
    threshold: float = 0.4  # a concept owns a latent pixel where its normalised map wins and exceeds this
    smooth: float = 1.0  # Gaussian sigma, in attention-map pixels, applied before thresholding (0: none)
    map_factor: int = 4  # attention maps from the layers at latent size / map_factor (16x16 for SD at 512)
    capture_fraction: float = 1.0  # maps are averaged over this first fraction of the steps
    num_images: int = 1  # images composed with seeds seed, seed + 1, ...; scores are averaged over them

    def check(self) -> None:
        super().check()
        if self.steps < 1 or self.num_images < 1:
            raise DifflabError(f"steps = {self.steps}, num_images = {self.num_images}: must be at least 1")
        if not 0 < self.capture_fraction <= 1 or not 0 <= self.threshold < 1:
            raise DifflabError(
                f"capture fraction must be in (0, 1] and threshold in [0, 1), got "
                f"{self.capture_fraction} and {self.threshold}"
            )
        check_size(self.height, self.width, 8)  # a multiple of 8 for any SD; the model's own multiple in compose()


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
    words: str  # text of the main prompt whose cross-attention locates the concept, e.g. "<new1>" or "<new1> dog"
    prompt: str  # prompt that denoises the concept's region, e.g. "a photo of a <new1> dog"
    box: Optional[Box] = None  # where the concept goes, instead of where the attention of `words` puts it


@dataclass
class Composition:
    naive: Image.Image
    composed: Image.Image
    masks: torch.Tensor  # (1 + concepts, h, w) one-hot over regions at latent size; region 0 is the background
    maps: torch.Tensor  # (concepts, h, w) normalised attention maps at latent size
    prompts: list[str] = field(default_factory=list)  # region prompts, background first


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

    def maps(self, height: int, width: int, factor: int) -> torch.Tensor:
        """(B, h, w, tokens) mean attention of the layers at latent size / factor, or the nearest size recorded."""
        if not self.sums:
            raise DifflabError("no cross-attention was recorded: the UNet has no cross-attention layers")
        factors = {round(math.sqrt(height * width / q)): q for q in self.sums}
        best = min(factors, key=lambda f: abs(math.log(f / factor)))
        q = factors[best]
        mean = self.sums[q] / self.counts[q]
        return mean.reshape(mean.shape[0], height // best, width // best, mean.shape[-1])


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


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C,h,w) -> blurred (C,h,w) with a separable Gaussian, edges replicated."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps.device)
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    return F.conv2d(out, k.view(1, 1, -1, 1))[:, 0]


def concept_maps(
    attention: torch.Tensor, token_groups: Sequence[Sequence[int]], latent_hw: tuple[int, int], smooth: float
) -> torch.Tensor:
    """(h,w,tokens) attention of one image -> (concepts, H, W) maps in [0,1] at latent size."""
    maps = torch.stack([attention[..., list(g)].mean(-1) for g in token_groups])
    if smooth > 0:
        maps = _gaussian_blur(maps, smooth)
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    maps = (maps - lo) / (hi - lo).clamp_min(1e-8)
    return F.interpolate(maps[:, None], size=latent_hw, mode="bilinear", align_corners=False)[:, 0]


def region_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """(C,H,W) concept maps -> (1+C,H,W) one-hot masks: a pixel goes to the winning concept above `threshold`,
    otherwise to the background (region 0). The masks partition the latent."""
    score, winner = maps.max(0)
    region = torch.where(score > threshold, winner + 1, torch.zeros_like(winner))
    return F.one_hot(region, maps.shape[0] + 1).permute(2, 0, 1).float()


def box_masks(concepts: Sequence[Region], latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1+C,H,W) one-hot masks from the concepts' boxes: a later box wins where boxes overlap, the rest is the
    background (region 0)."""
    h, w = latent_hw
    region = torch.zeros(h, w, dtype=torch.long)
    for r, c in enumerate(concepts, start=1):
        left, top, right, bottom = c.box
        region[round(top * h) : round(bottom * h), round(left * w) : round(right * w)] = r
    masks = F.one_hot(region, len(concepts) + 1).permute(2, 0, 1).float()
    empty = [c.words for c, m in zip(concepts, masks[1:]) if not m.any()]
    if empty:
        raise DifflabError(f"the boxes of {', '.join(empty)} cover no latent pixel ({h}x{w}) that a later box leaves")
    return masks


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
    pipe, latents: torch.Tensor, prompts: Sequence[str], masks: torch.Tensor, cfg: ComposeConfig
) -> Image.Image:
    """Denoise one latent (1,C,H,W) where region r follows prompts[r]; the guided noise predictions are blended
    by `masks` (R,H,W). All prompts and one shared unconditional embedding go through the UNet in one batch."""
    conds, unconds = zip(*(encode_prompt(pipe, p, cfg.negative_prompt) for p in prompts))
    context = torch.cat([unconds[0], *conds])
    weights = masks.to(latents.device, latents.dtype)[:, None]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(cfg.steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents.expand(len(context), -1, -1, -1), t)
        eps = pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        guided = eps[:1] + cfg.guidance * (eps[1:] - eps[:1])
        latents = scheduler.step((weights * guided).sum(0, keepdim=True), t, latents, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


@torch.inference_mode()
def compose(
    pipe,
    prompt: str,
    concepts: Sequence[Region],
    cfg: ComposeConfig,
    background: str | None = None,
    seed: int | None = None,
) -> Composition:
    """Naive image of `prompt`, concept regions (their boxes, or from its cross-attention), and the region-wise
    composed image."""
    if not concepts:
        raise DifflabError("compose needs at least one concept (--concepts WORDS=PROMPT)")
    cfg.check()
    boxed = check_boxes(concepts)
    prompts = [background or prompt] + [c.prompt for c in concepts]
    check_learned_tokens(pipe, [prompt, *prompts])
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    height, width = image_size(pipe, cfg)
    check_size(height, width, size_multiple(pipe))
    latents = initial_latents(pipe, [cfg.seed if seed is None else seed], height, width)
    latent_hw = tuple(latents.shape[-2:])
    if boxed:
        naive = naive_image(pipe, prompt, latents, cfg)
        masks = box_masks(concepts, latent_hw)
        maps = masks[1:]
    else:
        groups = [token_indices(pipe, prompt, c.words) for c in concepts]
        store = AttentionStore()
        naive = naive_image(pipe, prompt, latents, cfg, store)
        attention = store.maps(*latent_hw, cfg.map_factor)[-1]  # the conditional half of the guidance batch
        maps = concept_maps(attention, groups, latent_hw, cfg.smooth)
        masks = region_masks(maps, cfg.threshold)
    composed = denoise_regions(pipe, latents, prompts, masks, cfg)
    return Composition(naive, composed, masks.cpu(), maps.cpu(), prompts)


def naive_image(pipe, prompt: str, latents: torch.Tensor, cfg: ComposeConfig, store: AttentionStore | None = None):
    """The plain prompt's image from `latents`; with `store`, the cross-attention of the first
    `cfg.capture_fraction` of the steps is recorded into it."""
    cond, uncond = encode_prompt(pipe, prompt, cfg.negative_prompt)
    n_capture = max(1, round(cfg.capture_fraction * cfg.steps))

    def stop_capturing(_pipe, i, _t, kwargs):
        store.active = i + 1 < n_capture
        return kwargs

    def run():
        return pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            latents=latents,
            height=latents.shape[-2] * pipe.vae_scale_factor,
            width=latents.shape[-1] * pipe.vae_scale_factor,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            output_type="pil",
            callback_on_step_end=None if store is None else stop_capturing,
        ).images[0]

    if store is None:
        return run()
    with capture_cross_attention(pipe.unet, store):
        return run()


def masks_figure(result: Composition) -> np.ndarray:
    """Naive image, each concept's attention heatmap, and the regions over the naive image, side by side."""
    from matplotlib import colormaps

    size = result.naive.size
    naive = np.asarray(result.naive.convert("RGB"), dtype=np.float32)

    def upsample(x: torch.Tensor) -> np.ndarray:
        return F.interpolate(x[None, None].float(), size=size[::-1], mode="nearest")[0, 0].numpy()

    heat = [(colormaps["viridis"](upsample(m))[..., :3] * 255) for m in result.maps]
    region = upsample(result.masks.argmax(0).float()).astype(int)
    overlay = 0.5 * naive + 0.5 * REGION_COLOURS[region % len(REGION_COLOURS)]
    panels = np.stack([naive, *heat, overlay]).round().astype(np.uint8)
    return image_grid(panels, 1, len(panels))


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
) -> Path:
    """Compose `cfg.num_images` images (seeds seed, seed+1, ...); write PNGs, figures, scores and `report.html`
    into `out`, moved in once all are made."""
    cfg.check()
    with open_run(out, "personalize compose", overwrite=overwrite, staged=True) as run:
        _compose_images(pipe, prompt, concepts, cfg, run.dir, background, scorer, refs)
    return Path(out)


def _compose_images(pipe, prompt, concepts, cfg: ComposeConfig, out: Path, background, scorer, refs) -> None:
    from tqdm.auto import tqdm

    # The references are read first: a bad folder fails before minutes of sampling.
    ref_embeds = {words: scorer.image_embeds(reference_images(folder)) for words, folder in refs} if scorer else {}
    seeds = [stream_seed(cfg.seed, i) for i in range(cfg.num_images)]
    results = [
        compose(pipe, prompt, concepts, cfg, background=background, seed=seed)
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
    """`naive_<i>.png`, `composed_<i>.png` and the mask figure `masks_<i>.png` of each result; returns the figures."""
    figures = []
    for i, result in enumerate(results):
        save_png(np.asarray(result.naive), out / f"naive_{i}.png")
        save_png(np.asarray(result.composed), out / f"composed_{i}.png")
        figures.append(masks_figure(result))
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
        f"scheduler={cfg.scheduler} threshold={cfg.threshold} smooth={cfg.smooth}"
    )
    source = "box" if concepts[0].box else "attention"
    for seed, result, figure in zip(seeds, results, figures, strict=True):
        report.heading(f"seed {seed}")
        report.image(np.asarray(result.naive), caption="naive prompt")
        report.image(np.asarray(result.composed), caption="composed")
        report.image(figure, caption=f"naive | {source} of " + " | ".join(c.words for c in concepts) + " | regions")
    if len(results) > 1:
        report.heading("All images (top: naive, bottom: composed)")
        naive, composed = [r.naive for r in results], [r.composed for r in results]
        report.image(image_grid(thumbnails(naive + composed), 2, len(results)))
    return report
