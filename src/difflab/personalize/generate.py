"""Generate images for the prompts of an `input.json` with a (personalized) Stable Diffusion pipeline.

Output layout: `<out>/<key>/<idx>/source{key}_prompt{idx}_{n}.png`, n = 0..per_prompt-1.
Every image has its own seed, derived from (seed, key, idx, n), so any single image can be regenerated
alone and equals the one made inside a batch. Text embeddings are computed once per prompt.
With `best_of`, more candidates are drawn per prompt and the best ones by the CLIP grading rule
(image + 2.5 x text score) are kept, renumbered 0..per_prompt-1.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from difflab.io import image_files, load_rgb, open_run, save_png, write_csv
from difflab.parallel import Processes
from difflab.utils import DifflabError, image_grid

SCHEDULERS = ("ddim", "dpmsolver")
THUMB = 128  # side of the report thumbnails; full-size images stay on disk


@dataclass
class SDSampling:
    """How an SD pipeline samples, for generation and composition alike."""

    steps: int = 50
    guidance: float = 7.5
    seed: int = 42
    scheduler: str = "ddim"
    height: Optional[int] = None  # None: the model's native size (512 for SD v1.x)
    width: Optional[int] = None
    negative_prompt: str = ""

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise DifflabError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")


@dataclass
class GenerateConfig(SDSampling):
    per_prompt: int = 25
    batch_size: int = 8

    def check(self) -> None:
        super().check()
        small = [f"{k} = {getattr(self, k)}" for k in ("per_prompt", "steps", "batch_size") if getattr(self, k) < 1]
        if small:
            raise DifflabError(f"{', '.join(small)}: must be at least 1")


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
    # A PNDM config without the key would give DDIM its default clip_sample=True, wrong for latents.
    unclipped = {} if "clip_sample" in pipe.scheduler.config else {"clip_sample": False}
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config, **unclipped)


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
def sample(
    pipe, embeds: tuple[torch.Tensor, torch.Tensor], seeds: Sequence[int], cfg: GenerateConfig, progress=None
) -> list[Image.Image]:
    """Images for one prompt, one per seed, in batches of `cfg.batch_size`."""
    height, width = image_size(pipe, cfg)
    cond, uncond = embeds
    images: list[Image.Image] = []
    for start in range(0, len(seeds), cfg.batch_size):
        chunk = seeds[start : start + cfg.batch_size]
        b = len(chunk)
        out = pipe(
            prompt_embeds=cond.expand(b, -1, -1),
            negative_prompt_embeds=uncond.expand(b, -1, -1),
            latents=initial_latents(pipe, chunk, height, width),
            height=height,
            width=width,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            output_type="pil",
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
                raise DifflabError(
                    f"prompt {prompt!r} uses {token} but no loaded embedding defines it (pass its file with --embeds)"
                )


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
    """Regenerate image n of prompt (key, idx) alone; equal (up to numerics) to the one written by `generate`."""
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return sample(pipe, encode_prompt(pipe, prompt, cfg.negative_prompt), [image_seed(cfg.seed, key, idx, n)], cfg)[0]


def regenerate_one(pipe, job: PromptJob, n: int, cfg: GenerateConfig, out: str | os.PathLike) -> Path:
    """Rewrite image n of `job` in the layout under `out`; returns its path."""
    check_learned_tokens(pipe, [job.prompt])
    image = generate_one(pipe, job.prompt, job.key, job.idx, n, cfg)
    return save_png(np.asarray(image.convert("RGB")), image_path(out, job.key, job.idx, n))


def reference_images(folder: str | os.PathLike) -> list[Image.Image]:
    """All images of a concept's reference folder, sorted by name."""
    return [load_rgb(p) for p in image_files(folder, "reference image")]


def thumbnails(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.BICUBIC)) for im in images])


def generate(
    pipe,
    spec: dict,
    out: str | os.PathLike,
    cfg: GenerateConfig,
    keys: Sequence[str] | None = None,
    resume: bool = False,
    best_of: int | None = None,
    scorer=None,
    refs: str | os.PathLike | None = None,
    overwrite: bool = False,
    processes: Processes | None = None,
) -> Path:
    """Write the course layout under `out` plus `report.html` (and `best_of_scores.csv` with `best_of`).

    Images already in `out` are kept with `resume` (their seeds do not depend on the others), replaced with
    `overwrite`, and otherwise make this refuse. With `best_of`, `scorer` is a `difflab.clip.score.ClipScorer` and
    `refs` the folder holding `<key>/` reference images. Several `processes` share the batches and write the same
    files as one; the main one writes the report.
    """

    cfg.check()
    if resume and best_of:
        raise DifflabError("--resume keeps earlier images, but best-of-N ranks all candidates together: choose one")
    processes = processes or Processes()
    jobs = prompt_jobs(spec, keys)
    processes.agree("--out and the generation settings", [str(Path(out).resolve()), asdict(cfg), keys, best_of])
    main = processes.is_main
    with open_run(out, "personalize generate", overwrite=overwrite, resume=resume, checkpoint="", main=main):
        processes.wait()  # the others look for earlier images only once the main process has cleared them
        picker = BestOf(best_of, cfg, scorer, refs, jobs) if best_of is not None else None
        write_images(pipe, Path(out), cfg, jobs, picker, processes)
        if main:
            write_report(Path(out), cfg, jobs, picker)
    return Path(out)


def work_batches(jobs: list[PromptJob], cfg: GenerateConfig, best_of: int | None) -> list[tuple[PromptJob, range]]:
    """The batches of the whole layout, (prompt, image numbers), cut the same way for any number of processes;
    with best-of-N one per prompt, since its candidates are ranked together."""
    if best_of is not None:
        return [(job, range(best_of)) for job in jobs]
    step = cfg.batch_size
    return [(job, range(s, min(s + step, cfg.per_prompt))) for job in jobs for s in range(0, cfg.per_prompt, step)]


def write_images(pipe, out: Path, cfg: GenerateConfig, jobs, picker: BestOf | None, processes: Processes) -> None:
    """This process's share of the batches whose images are not all in `out` yet."""
    from tqdm.auto import tqdm

    check_learned_tokens(pipe, [j.prompt for j in jobs])
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    image_size(pipe, cfg)  # fail on a bad size before any work
    batches = work_batches(jobs, cfg, picker and picker.n)
    todo = [(j, ns) for j, ns in batches if picker or not all(image_path(out, j.key, j.idx, n).is_file() for n in ns)]
    mine = processes.share(todo)
    encoded, embeds = None, None  # a prompt's text embeddings, computed once for its consecutive batches
    with tqdm(total=sum(len(ns) for _, ns in mine), desc="images", unit="img", disable=not processes.is_main) as bar:
        for job, numbers in mine:
            if job != encoded:
                encoded, embeds = job, encode_prompt(pipe, job.prompt, cfg.negative_prompt)
            seeds = [image_seed(cfg.seed, job.key, job.idx, n) for n in numbers]
            images = sample(pipe, embeds, seeds, cfg, bar)
            if picker is not None:
                images, numbers = picker.keep(job, images), range(cfg.per_prompt)
            for n, im in zip(numbers, images):
                save_png(np.asarray(im.convert("RGB")), image_path(out, job.key, job.idx, n))
    if picker is not None:
        picker.scores = dict(processes.gather(list(picker.scores.items())))
    processes.wait()


def write_report(out: Path, cfg: GenerateConfig, jobs, picker: BestOf | None) -> None:
    from difflab.report import HtmlReport

    report = HtmlReport("Personalized generation")
    report.pre(
        f"scheduler={cfg.scheduler} steps={cfg.steps} guidance={cfg.guidance} seed={cfg.seed} "
        f"per_prompt={cfg.per_prompt}" + (f" best_of={picker.n}" if picker else "")
    )
    for job in jobs:
        add_prompt_grid(report, out, job, cfg.per_prompt)
    if picker is not None:
        picker.write(out / "best_of_scores.csv", report, jobs)
    report.save(out / "report.html")


def add_prompt_grid(report, out: Path, job: PromptJob, per_prompt: int) -> None:
    """A thumbnail grid of a prompt's images, read back from the layout."""
    shown = [load_rgb(image_path(out, job.key, job.idx, n)) for n in range(per_prompt)]
    cols = min(5, len(shown))
    report.heading(f"{job.key}/{job.idx}: {job.prompt}")
    report.image(image_grid(thumbnails(shown), -(-len(shown) // cols), cols), caption=f"{len(shown)} images")


class BestOf:
    """Best-of-N: per prompt, the candidates the course's grading rule ranks highest, and every score."""

    def __init__(self, n: int, cfg: GenerateConfig, scorer, refs, jobs: list[PromptJob]):
        if n < cfg.per_prompt:
            raise DifflabError(f"--best-of {n} must be at least --per-prompt {cfg.per_prompt}")
        if scorer is None or refs is None:
            raise DifflabError("--best-of needs --clip (a CLIP model folder) and --refs (the reference image root)")
        missing = [f"{j.key}/{j.idx}" for j in jobs if not j.eval_prompt]
        if missing:
            raise DifflabError(f"--best-of needs prompt_4_clip_eval for every prompt; missing for {', '.join(missing)}")
        self.n, self.cfg, self.scorer = n, cfg, scorer
        # (key, idx) -> (one CSV row per candidate, the kept images' mean image and text scores)
        self.scores: dict[tuple[str, int], tuple[list[list], tuple[float, float]]] = {}
        self.refs = {k: scorer.image_embeds(reference_images(Path(refs) / k)) for k in {j.key for j in jobs}}

    def keep(self, job: PromptJob, candidates: list) -> list:
        """The kept images, best first; records the scores of all candidates."""
        from difflab.personalize.grading import TEXT_WEIGHT, select_best

        gen = self.scorer.image_embeds(candidates)
        img_s = self.scorer.image_score(gen, self.refs[job.key])
        txt_s = self.scorer.text_score(gen, self.scorer.text_embeds([job.eval_prompt]))
        keep = [int(i) for i in select_best(img_s, txt_s, self.cfg.per_prompt)]
        rank = {c: n for n, c in enumerate(keep)}
        rows = []
        for c in range(len(candidates)):
            seed = image_seed(self.cfg.seed, job.key, job.idx, c)
            combined = img_s[c] + TEXT_WEIGHT * txt_s[c]
            rows.append(
                [job.key, job.idx, c, seed, f"{img_s[c]:.4f}", f"{txt_s[c]:.4f}", f"{combined:.4f}", rank.get(c, "")]
            )
        self.scores[(job.key, job.idx)] = (rows, (float(img_s[keep].mean()), float(txt_s[keep].mean())))
        return [candidates[c] for c in keep]

    def write(self, csv_path: Path, report, jobs: list[PromptJob]) -> None:
        header = ["key", "prompt_idx", "candidate", "seed", "image_score", "text_score", "combined", "kept_as"]
        write_csv(csv_path, header, [row for j in jobs for row in self.scores[(j.key, j.idx)][0]])
        report.heading("CLIP scores of the kept images (mean)")
        summary = [[f"{j.key}/{j.idx}", j.prompt, *self.scores[(j.key, j.idx)][1]] for j in jobs]
        report.table(["prompt", "text", "image score", "text score"], summary)
