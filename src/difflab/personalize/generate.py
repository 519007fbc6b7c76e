"""Generate images for the prompts of an `input.json` with a (personalized) Stable Diffusion pipeline.

Output layout: `<out>/<key>/<idx>/source{key}_prompt{idx}_{n}.png`, n = 0..per_prompt-1.
Every image has its own seed, derived from (seed, key, idx, n), so any single image can be regenerated
alone and equals the one made inside a batch. Text embeddings are computed once per prompt.
With `best_of`, more candidates are drawn per prompt and the best ones by the CLIP grading rule
(image + 2.5 x text score) are kept, renumbered 0..per_prompt-1.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import typer
from PIL import Image

from difflab.io import atomic_write, image_files, load_rgb, save_png
from difflab.utils import DifflabError, image_grid

SCHEDULERS = ("ddim", "dpmsolver")
THUMB = 128  # side of the report thumbnails; full-size images stay on disk


@dataclass
class GenerateConfig:
    per_prompt: int = 25
    scheduler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    seed: int = 42
    batch_size: int = 8
    height: Optional[int] = None  # None: the model's native size (512 for SD v1.x)
    width: Optional[int] = None
    negative_prompt: str = ""


@dataclass
class PromptJob:
    key: str
    idx: int
    prompt: str
    eval_prompt: Optional[str] = None  # `prompt_4_clip_eval`, used for the text score


def image_seed(seed: int, key: str, idx: int, n: int) -> int:
    """A stable per-image seed: a hash, so neighbouring images do not get correlated seeds."""
    digest = hashlib.sha256(f"{seed}/{key}/{idx}/{n}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_path(out: str | os.PathLike, key: str, idx: int, n: int) -> Path:
    return Path(out) / str(key) / str(idx) / f"source{key}_prompt{idx}_{n}.png"


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule (betas, offsets) from its scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
    if name not in classes:
        raise DifflabError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def image_size(pipe, cfg: GenerateConfig) -> tuple[int, int]:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = cfg.height or native, cfg.width or native
    if height % 8 or width % 8:
        raise DifflabError(f"image size {height}x{width}: height and width must be multiples of 8")
    return height, width


def initial_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """One CPU generator per image, so an image's noise depends only on its own seed (and not on the device)."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(pipe.device, pipe.unet.dtype)


@torch.inference_mode()
def encode_prompt(pipe, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(1,77,D) conditional and unconditional text embeddings."""
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True, negative_prompt=negative_prompt)
    return cond, uncond


@torch.inference_mode()
def sample(pipe, embeds: tuple[torch.Tensor, torch.Tensor], seeds: Sequence[int], cfg: GenerateConfig,
           progress=None) -> list[Image.Image]:
    """Images for one prompt, one per seed, in batches of `cfg.batch_size`."""
    height, width = image_size(pipe, cfg)
    cond, uncond = embeds
    images: list[Image.Image] = []
    for start in range(0, len(seeds), cfg.batch_size):
        chunk = seeds[start : start + cfg.batch_size]
        b = len(chunk)
        out = pipe(
            prompt_embeds=cond.expand(b, -1, -1), negative_prompt_embeds=uncond.expand(b, -1, -1),
            latents=initial_latents(pipe, chunk, height, width), height=height, width=width,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, output_type="pil",
        )
        images.extend(out.images)
        if progress is not None:
            progress.update(b)
    return images


def check_learned_tokens(pipe, prompts: Sequence[str]) -> None:
    """Fail on `<token>`s the tokenizer lacks: it would silently split them into pieces like "<", "new", "1", ">"."""
    vocab = pipe.tokenizer.get_vocab()
    for prompt in prompts:
        for token in re.findall(r"<[^<>\s]+>", prompt):
            if token not in vocab:
                raise DifflabError(f"prompt {prompt!r} uses {token} but no loaded embedding defines it "
                                   "(pass its file with --embeds)")


def prompt_jobs(spec: dict, keys: Sequence[str] | None = None) -> list[PromptJob]:
    """Flatten `input.json` into (key, prompt index, prompt) jobs, optionally only for some keys."""
    if keys:
        unknown = [k for k in keys if k not in spec]
        if unknown:
            raise DifflabError(f"keys {', '.join(unknown)} not in the prompts file (it has {', '.join(spec)})")
    jobs = []
    for key, entry in spec.items():
        if keys and key not in keys:
            continue
        evals = entry.get("prompt_4_clip_eval") or []
        for idx, prompt in enumerate(entry["prompt"]):
            jobs.append(PromptJob(str(key), idx, prompt, evals[idx] if idx < len(evals) else None))
    return jobs


def generate_one(pipe, prompt: str, key: str, idx: int, n: int, cfg: GenerateConfig) -> Image.Image:
    """Regenerate image n of prompt (key, idx) alone; equal to the one written by `generate`."""
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return sample(pipe, encode_prompt(pipe, prompt, cfg.negative_prompt), [image_seed(cfg.seed, key, idx, n)], cfg)[0]


def reference_images(folder: str | os.PathLike) -> list[Image.Image]:
    """All images of a concept's reference folder, sorted by name."""
    return [load_rgb(p) for p in image_files(folder, "reference image")]


def thumbnails(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.BICUBIC)) for im in images])


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    return atomic_write(path, write)


def generate(pipe, spec: dict, out: str | os.PathLike, cfg: GenerateConfig, keys: Sequence[str] | None = None,
             resume: bool = False, best_of: int | None = None, scorer=None,
             refs: str | os.PathLike | None = None) -> Path:
    """Write the course layout under `out` plus `report.html` (and `best_of_scores.csv` with `best_of`).

    `resume` skips images already on disk (their seeds do not depend on the others). With `best_of`,
    `scorer` is a `difflab.clip.score.ClipScorer` and `refs` the folder holding `<key>/` reference images.
    """
    from tqdm.auto import tqdm

    from difflab.report import HtmlReport

    out = Path(out)
    jobs = prompt_jobs(spec, keys)
    if cfg.per_prompt < 1:
        raise DifflabError(f"--per-prompt must be at least 1, got {cfg.per_prompt}")
    if best_of is not None:
        from difflab.personalize.grading import TEXT_WEIGHT, select_best

        if best_of < cfg.per_prompt:
            raise DifflabError(f"--best-of {best_of} must be at least --per-prompt {cfg.per_prompt}")
        if scorer is None or refs is None:
            raise DifflabError("--best-of needs --clip (a CLIP model folder) and --refs (the reference image root)")
        missing = [f"{j.key}/{j.idx}" for j in jobs if not j.eval_prompt]
        if missing:
            raise DifflabError(f"--best-of needs prompt_4_clip_eval for every prompt; missing for {', '.join(missing)}")
        ref_embeds = {k: scorer.image_embeds(reference_images(Path(refs) / k)) for k in {j.key for j in jobs}}
    check_learned_tokens(pipe, [j.prompt for j in jobs])
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    image_size(pipe, cfg)  # fail on a bad size before any work

    report = HtmlReport("Personalized generation")
    report.pre(f"scheduler={cfg.scheduler} steps={cfg.steps} guidance={cfg.guidance} seed={cfg.seed} "
               f"per_prompt={cfg.per_prompt}" + (f" best_of={best_of}" if best_of else ""))
    score_rows, summary = [], []
    n_candidates = best_of or cfg.per_prompt
    progress = tqdm(total=len(jobs) * n_candidates, desc="images", unit="img")
    for job in jobs:
        embeds = encode_prompt(pipe, job.prompt, cfg.negative_prompt)
        skip_existing = resume and not best_of
        todo = [n for n in range(n_candidates) if not (skip_existing and image_path(out, job.key, job.idx, n).is_file())]
        progress.update(n_candidates - len(todo))
        images = sample(pipe, embeds, [image_seed(cfg.seed, job.key, job.idx, n) for n in todo], cfg, progress)
        if best_of:
            gen = scorer.image_embeds(images)
            img_s = scorer.image_score(gen, ref_embeds[job.key])
            txt_s = scorer.text_score(gen, scorer.text_embeds([job.eval_prompt]))
            keep = [int(i) for i in select_best(img_s, txt_s, cfg.per_prompt)]
            rank = {c: n for n, c in enumerate(keep)}
            for c in range(n_candidates):
                score_rows.append([job.key, job.idx, c, image_seed(cfg.seed, job.key, job.idx, c), f"{img_s[c]:.4f}",
                                   f"{txt_s[c]:.4f}", f"{img_s[c] + TEXT_WEIGHT * txt_s[c]:.4f}", rank.get(c, "")])
            summary.append([f"{job.key}/{job.idx}", job.prompt, float(img_s[keep].mean()), float(txt_s[keep].mean())])
            images, todo = [images[c] for c in keep], list(range(cfg.per_prompt))
        for n, im in zip(todo, images):
            save_png(np.asarray(im.convert("RGB")), image_path(out, job.key, job.idx, n))
        shown = [load_rgb(image_path(out, job.key, job.idx, n)) for n in range(cfg.per_prompt)]
        cols = min(5, len(shown))
        report.heading(f"{job.key}/{job.idx}: {job.prompt}")
        report.image(image_grid(thumbnails(shown), -(-len(shown) // cols), cols), caption=f"{len(shown)} images")
    progress.close()
    if best_of:
        write_csv(out / "best_of_scores.csv",
                  ["key", "prompt_idx", "candidate", "seed", "image_score", "text_score", "combined", "kept_as"],
                  score_rows)
        report.heading("CLIP scores of the kept images (mean)")
        report.table(["prompt", "text", "image score", "text score"], summary)
    report.save(out / "report.html")
    return out


def parse_only(only: str) -> tuple[str, int, int]:
    parts = only.split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise DifflabError(f"--only {only!r}: expected KEY/IDX/N, e.g. 0/1/7")
    return parts[0], int(parts[1]), int(parts[2])


def generate_command(
    prompts: Path = typer.Option(..., "--prompts", help="input.json with the concepts and their prompts (course schema)."),
    sd: Path = typer.Option(..., "--sd", help="Stable Diffusion v1.x: a diffusers folder or a single-file .ckpt/.safetensors."),
    embeds: list[Path] = typer.Option([], "--embeds", help="Learned embedding file(s) adding the concept tokens; repeat for several."),
    out: Path = typer.Option(..., "--out", help="Output folder; images go to <out>/<key>/<idx>/source{key}_prompt{idx}_{n}.png."),
    per_prompt: int = typer.Option(25, "--per-prompt", help="Images written per prompt."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="Sampler: ddim or dpmsolver (noise schedule kept from the model)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(42, "--seed", help="Base seed; each image's seed is derived from it and the image's key/idx/n."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images denoised together in one batch."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels (default: the model's native size)."),
    keys: Optional[str] = typer.Option(None, "--keys", help="Comma-separated concept keys to generate (default: all), e.g. 0,1."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt for classifier-free guidance."),
    only: Optional[str] = typer.Option(None, "--only", help="Regenerate one image KEY/IDX/N (its file is rewritten in place)."),
    resume: bool = typer.Option(False, "--resume", help="Skip images that already exist in the output folder."),
    best_of: Optional[int] = typer.Option(None, "--best-of", help="Draw this many candidates per prompt and keep the best --per-prompt by CLIP score."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP model folder (transformers format) for --best-of scoring."),
    refs: Optional[Path] = typer.Option(None, "--refs", help="Reference image root with one <key>/ folder per concept, for --best-of."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep float32 weights on CUDA (default there: float16)."),
) -> None:
    """Generate the course output layout for every prompt of input.json with learned concept tokens."""
    from difflab.clip.score import ClipScorer
    from difflab.personalize.embeddings import load_embeddings
    from difflab.personalize.prompts import load_input_json
    from difflab.personalize.sd import load_sd
    from difflab.utils import pick_device

    spec = load_input_json(prompts)
    cfg = GenerateConfig(per_prompt=per_prompt, scheduler=scheduler, steps=steps, guidance=guidance, seed=seed,
                         batch_size=batch_size, height=height, width=width, negative_prompt=negative_prompt)
    if scheduler not in SCHEDULERS:
        raise DifflabError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if only is not None:  # checked before the (slow) model load
        if best_of is not None:
            raise DifflabError("--only regenerates one image of the plain layout; it cannot be combined with --best-of")
        key, idx, n = parse_only(only)
        jobs = [j for j in prompt_jobs(spec, [key]) if j.idx == idx]
        if not jobs:
            raise DifflabError(f"--only {only}: concept {key} has no prompt {idx}")
    dev = pick_device(device)
    pipe = load_sd(sd, device=dev, dtype=torch.float16 if dev.type == "cuda" and not fp32 else torch.float32)
    if embeds:
        load_embeddings(pipe, embeds)
    if only is not None:
        path = image_path(out, key, idx, n)
        save_png(np.asarray(generate_one(pipe, jobs[0].prompt, key, idx, n, cfg).convert("RGB")), path)
        typer.echo(f"wrote {path}")
        return
    scorer = ClipScorer.from_pretrained(clip, dev) if best_of is not None and clip is not None else None
    key_list = [k.strip() for k in keys.split(",") if k.strip()] if keys else None
    generate(pipe, spec, out, cfg, keys=key_list, resume=resume, best_of=best_of, scorer=scorer, refs=refs)
    typer.echo(f"wrote images and {out / 'report.html'}")
