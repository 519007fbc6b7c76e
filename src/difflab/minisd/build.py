"""Build the miniature SD v1 stack in one folder, stage by stage:

<out>/data/train/   captioned digits (imagefolder + metadata.jsonl)
<out>/clip_joint/   CLIP trained contrastively, both towers (an intermediate): its text tower is SD's text encoder
<out>/vae/          the trained AutoencoderKL (an intermediate; the pipeline holds a copy)
<out>/sd/           diffusers StableDiffusionPipeline folder (`load_sd`, `from_pretrained`)
<out>/clip/         that CLIP with its image side trained further against the frozen text tower: transformers
                    CLIPModel + tokenizer + image processor (`load_clip`, zero-shot pipeline)
<out>/judges/       digit judges per domain + a domain judge (difflab digit classifiers)
<out>/build.json    settings, timings, losses and the precision of each stage
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from difflab.io import load_json, open_run, save_json, write_metadata, write_model_card
from difflab.minisd import data as mdata
from difflab.minisd.models import (
    MiniSDConfig,
    assemble_pipeline,
    build_clip,
    build_unet,
    build_vae,
    text_tower,
)
from difflab.minisd.train import Log, StageConfig, TrainSettings
from difflab.precision import Precision, cpu_name, settle_training
from difflab.report.tracking import accelerator_kwargs, tracked
from difflab.utils import DifflabError, pick_device

STAGES = ("data", "clip_joint", "vae", "sd", "clip", "judges")
BUILD_LOG = "build.json"
# "auto" may train a stage in a lower precision whose gradient of one step is this close to fp32's (relative error).
TOLERANCE = 0.05


def default_settings() -> TrainSettings:
    """The settings of the stack difflab ships (more work than the demo's budget allows: it is built once and
    packed, see `difflab.minisd.prebuilt`)."""
    return TrainSettings(
        clip=StageConfig(steps=3000, batch_size=128, lr=1e-3, warmup=100),
        clip_vision=StageConfig(steps=4000, batch_size=128, lr=2e-3, warmup=100),
        vae=StageConfig(steps=1600, batch_size=64, lr=2e-3),
        unet=StageConfig(steps=3000, batch_size=64, lr=2e-3, warmup=100),
    )


@dataclass
class BuildConfig:
    out: str
    model: MiniSDConfig = field(default_factory=MiniSDConfig)
    train: TrainSettings = field(default_factory=default_settings)
    n_per_domain: int = 8000  # single digits of each style
    n_pairs: int = 8000  # two-digit canvases
    judge_epochs: int = 8  # as the digits job's judges (docs/minisd.md)
    judge_images: int = 8000  # per style
    # Random blur while training the judges: without it the style judge read sharpness as style and called 39 %
    # of the UNet's MNIST-M-like digits SVHN-like (VAE round trips of held-out MNIST-M digits: 94.4 % right,
    # with it 98.7 %; held-out real digits 99.2 % / 99.7 %).
    judge_blur: float = 1.0
    seed: int = 0
    device: str | None = None
    precision: Precision = Precision("auto")
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"  # trackers for each training stage's loss, learning rate, gradient norm, step time


def stage_dir(out: Path, stage: str) -> Path:
    return out / ("data/train" if stage == "data" else stage)


def done(out: Path, stage: str) -> bool:
    return stage_dir(out, stage).is_dir()


def write_dir(final: Path, write) -> Path:
    """`write(tmp_dir)` into a hidden sibling folder, then rename it onto `final`: a cut-off stage leaves only a
    hidden folder, which the next run deletes."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def build(cfg: BuildConfig) -> Path:
    """Build every missing stage into `cfg.out` and return it (`--resume` finishes or reuses an earlier build
    there, `--overwrite` builds it again)."""
    accelerator_kwargs(cfg.report_to, cfg.out)  # the trackers are checked before any work
    device = pick_device(cfg.device)
    with open_run(cfg.out, "minisd build", overwrite=cfg.overwrite, resume=cfg.resume, checkpoint=BUILD_LOG):
        with tracked(cfg.report_to, cfg.out, "difflab-minisd", asdict(cfg), device.type == "cpu") as log:
            return build_stages(cfg, Path(cfg.out), device, log)


def build_stages(cfg: BuildConfig, out: Path, device: torch.device, track: Log | None = None) -> Path:
    """Every missing stage, in order; `track` (tracked values, step) gets each training stage's values under its
    name, e.g. `vae/loss`."""
    log = load_json(out / BUILD_LOG) if cfg.resume and (out / BUILD_LOG).is_file() else {}
    log["config"] = asdict(cfg)  # this run's settings; each stage records those it was built with
    log.setdefault("stages", {})
    for stage in STAGES:
        if done(out, stage):
            continue
        start = time.perf_counter()
        stage_log = None if track is None else partial(_log_stage, track, stage)
        info = STAGE_FUNCS[stage](cfg, out, device, stage_log) or {}
        info["seconds"] = round(time.perf_counter() - start, 1)
        where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
        info["machine"] = f"{where}, {torch.get_num_threads()} threads"
        info["config"] = asdict(cfg)  # a resumed build may finish with other settings than it started with
        log["stages"][stage] = info
        print(f"mini-SD {stage}: {info['seconds']:.0f} s" + (f" ({info['summary']})" if "summary" in info else ""))
        save_json(log, out / BUILD_LOG)
    return out


def _log_stage(log: Log, stage: str, values: dict, step: int) -> None:
    log({f"{stage}/{k}": v for k, v in values.items()}, step)


# ---- stages ---------------------------------------------------------------------------------------------------
def build_data(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    singles = mdata.single_digits(cfg.n_per_domain, cfg.seed)
    pairs = mdata.digit_pairs(singles, cfg.n_pairs, cfg.seed)

    def write(tmp: Path) -> None:
        rows = mdata.write_imagefolder(singles, tmp) + mdata.write_imagefolder(pairs, tmp, prefix="pair_")
        write_metadata(rows, tmp)

    write_dir(stage_dir(out, "data"), write)
    return {"summary": f"{len(singles.texts)} digits, {len(pairs.texts)} pairs"}


def _trial_input(device, *shape: int) -> torch.Tensor:
    """Seeded inputs of a precision trial, drawn from their own generator so the build's random streams stay put."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)


def training_sets(cfg: BuildConfig, out: Path) -> tuple[mdata.CaptionedDigits, mdata.CaptionedDigits | None]:
    groups = mdata.load_imagefolder(stage_dir(out, "data"))
    size = cfg.model.image_size
    if (size, size) not in groups:
        raise DifflabError(f"{stage_dir(out, 'data')}: no {size}x{size} captioned images")
    return groups[(size, size)], groups.get((size, 2 * size))


def build_clip_joint_stage(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    from difflab.clip.tokenizer import load_clip_tokenizer
    from difflab.minisd.train import clip_loss, train_clip

    singles, _ = training_sets(cfg, out)
    tokenizer = load_clip_tokenizer()
    b = cfg.train.clip.batch_size
    ids = tokenizer(["a photo of the number 7"] * b, return_tensors="pt", padding=True).to(device)
    px = _trial_input(device, b, 3, cfg.model.image_size, cfg.model.image_size)
    same = torch.eye(b, dtype=torch.bool, device=device)

    def clip_step(model, p: Precision) -> torch.Tensor:
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=px)
        return clip_loss(out.logits_per_image, same)

    precision = settle_training(
        cfg.precision, device, f"mini-SD CLIP batch {b}", lambda: build_clip(cfg.model), clip_step, tolerance=TOLERANCE
    )
    model, losses = train_clip(singles, tokenizer, cfg.model, cfg.train.clip, precision, device, cfg.seed, log)

    write_dir(out / "clip_joint", lambda tmp: save_clip(model, tokenizer, tmp))
    return {"precision": precision.describe(), "losses": losses[:: max(1, len(losses) // 200)]}


def load_joint_clip(out: Path):
    """The joint stage's CLIP and tokenizer: the text tower that SD and the vision tuning both start from."""
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(out / "clip_joint", local_files_only=True)
    return clip, CLIPTokenizer.from_pretrained(out / "clip_joint", local_files_only=True, model_max_length=77)


def build_clip_stage(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    from difflab.minisd.train import tune_vision

    singles, _ = training_sets(cfg, out)
    clip, tokenizer = load_joint_clip(out)
    stage = cfg.train.clip_vision
    px = _trial_input(device, stage.batch_size, 3, cfg.model.image_size, cfg.model.image_size)
    precision = settle_training(
        cfg.precision,
        device,
        f"mini-SD CLIP vision batch {stage.batch_size}",
        lambda: build_clip(cfg.model),
        lambda m, p: m.visual_projection(m.vision_model(pixel_values=px)[1]),
        tolerance=TOLERANCE,
    )
    model, losses = tune_vision(clip, singles, tokenizer, stage, precision, device, cfg.seed, log)
    made = stage_made(cfg, out, "CLIP vision tuning", stage.steps)
    write_dir(out / "clip", lambda tmp: save_clip(model, tokenizer, tmp, made))
    return {"precision": precision.describe(), "losses": losses[:: max(1, len(losses) // 200)]}


def save_clip(model, tokenizer, folder: Path, made: dict | None = None) -> None:
    """A transformers CLIP folder: model, tokenizer and the image processor of the model's input size; with
    `made` (how it was made) also its model card."""
    from difflab.clip.model import default_processor

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    default_processor(model.config.vision_config.image_size).save_pretrained(folder)
    if made is not None:
        usage = f"""from transformers import CLIPModel, CLIPProcessor

model = CLIPModel.from_pretrained("{folder.parent / "clip"}")
processor = CLIPProcessor.from_pretrained("{folder.parent / "clip"}")"""
        summary = (
            "The mini stack's CLIP: trained contrastively on captioned digits, then its vision tower tuned; the text "
            "tower is the mini Stable Diffusion's text encoder. For zero-shot classification and image/text scores."
        )
        write_model_card(folder, "difflab mini CLIP", summary, made, usage, ["clip", "digits"],
                         "zero-shot-image-classification")  # fmt: skip


def build_vae_stage(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    from difflab.minisd.train import train_vae

    singles, _ = training_sets(cfg, out)
    x = _trial_input(device, cfg.train.vae.batch_size, 3, cfg.model.image_size, cfg.model.image_size)
    precision = settle_training(
        cfg.precision,
        device,
        f"mini-SD VAE batch {len(x)}",
        lambda: build_vae(cfg.model),
        lambda m, p: m(p.input(x)).sample,
        tolerance=TOLERANCE,
    )
    model, losses = train_vae(singles, cfg.model, cfg.train, precision, device, cfg.seed, log)
    write_dir(out / "vae", model.save_pretrained)
    return {"precision": precision.describe(), "losses": losses[:: max(1, len(losses) // 200)]}


def build_sd_stage(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    from diffusers import AutoencoderKL

    from difflab.minisd.train import LatentSet, encode_captions, encode_latents, train_unet

    singles, pairs = training_sets(cfg, out)
    clip, tokenizer = load_joint_clip(out)
    text_encoder = text_tower(clip).to(device).eval()
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).to(device).eval()

    groups = [g for g in (singles, pairs) if g is not None]
    texts = sorted({t for g in groups for t in g.texts} | {""})
    row = {t: i for i, t in enumerate(texts)}
    captions = encode_captions(text_encoder, tokenizer, texts, device)
    sets = []
    for g in groups:
        mean, std = encode_latents(vae, g.images, device)
        sets.append(LatentSet(mean, std, torch.tensor([row[t] for t in g.texts])))
    # As SD's 0.18215: latents scaled to unit variance, so the noise schedule means the same as in SD.
    scaling = float(1 / sets[0].mean.std())
    vae.register_to_config(scaling_factor=scaling)

    b, size = cfg.train.unet.batch_size, cfg.model.latent_size
    z, t = _trial_input(device, b, cfg.model.latent_channels, size, size), torch.linspace(0, 999, b).long()
    c = captions[:1].expand(b, -1, -1).to(device)
    precision = settle_training(
        cfg.precision,
        device,
        f"mini-SD UNet batch {b}",
        lambda: build_unet(cfg.model),
        lambda m, p: m(p.input(z), t.to(device), c).sample,
        tolerance=TOLERANCE,
    )
    unet, losses = train_unet(sets, captions, row[""], scaling, cfg.model, cfg.train, precision, device, cfg.seed, log)
    made = stage_made(cfg, out, "UNet", cfg.train.unet.steps)
    write_dir(out / "sd", lambda tmp: save_pipeline(vae, text_encoder, tokenizer, unet, tmp, made))
    return {
        "precision": precision.describe(),
        "vae_scaling_factor": scaling,
        "unique_captions": len(texts),
        "losses": losses[:: max(1, len(losses) // 200)],
    }


def save_pipeline(vae, text_encoder, tokenizer, unet, folder: Path, made: dict | None = None) -> None:
    """A diffusers `StableDiffusionPipeline` folder with SD v1's scheduler and no safety checker; with `made` (how
    it was made) also its model card."""
    assemble_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(folder, safe_serialization=True)
    if made is not None:
        usage = f"""from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{folder.parent / "sd"}")
image = pipe("the number 7 in the style of a photo", height=32, width=32).images[0]"""
        summary = (
            "A miniature Stable Diffusion v1 (same component classes: CLIP text encoder, AutoencoderKL, "
            "UNet2DConditionModel) trained from scratch on captioned digits, 32x32 pixels, for CPU exercises."
        )
        write_model_card(folder, "difflab mini Stable Diffusion", summary, made, usage,
                         ["stable-diffusion", "text-to-image", "digits"], "text-to-image")  # fmt: skip


def stage_made(cfg: BuildConfig, out: Path, stage: str, steps: int) -> dict:
    """How a stage of the stack was made, for its model card."""
    return {
        "command": f"`difflab minisd build --out {out} --seed {cfg.seed}`",
        "stage": f"{stage}: {steps} steps",
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
    }


def build_judges_stage(cfg: BuildConfig, out: Path, device, log: Log | None = None) -> dict:
    from difflab.digits.classifier import (
        ClassifierTrainConfig,
        accuracy,
        classifier_path,
        save_classifier,
        train_classifier,
    )
    from difflab.digits.data import DOMAINS, generate_split

    tc = ClassifierTrainConfig(epochs=cfg.judge_epochs, precision=cfg.precision, blur=cfg.judge_blur)
    n = min(cfg.judge_images, cfg.n_per_domain)
    data = {d: generate_split(d, n, cfg.seed) for d in DOMAINS}
    held = {d: generate_split(d, 1000, cfg.seed, "val") for d in DOMAINS}
    both = np.concatenate([data[d][0] for d in DOMAINS])
    which = np.repeat(np.arange(len(DOMAINS)), n)
    held_both = np.concatenate([held[d][0] for d in DOMAINS])
    held_which = np.repeat(np.arange(len(DOMAINS)), 1000)

    def write(tmp: Path) -> None:
        for d in DOMAINS:
            model = train_classifier(*data[d], d, tc, device=device, seed=cfg.seed, log=log)
            save_classifier(model, classifier_path(tmp, d), {"held_out_accuracy": accuracy(model, *held[d])})
        model = train_classifier(
            both, which, "domain", tc, device=device, seed=cfg.seed, num_classes=len(DOMAINS), log=log
        )
        save_classifier(
            model,
            tmp / "domain.safetensors",
            {"held_out_accuracy": accuracy(model, held_both, held_which), "classes": list(DOMAINS)},
        )

    write_dir(out / "judges", write)
    accs = {p.stem: load_json(p)["held_out_accuracy"] for p in sorted((out / "judges").glob("*.json"))}
    return {"held_out_accuracy": accs, "summary": ", ".join(f"{k} {v:.3f}" for k, v in accs.items())}


STAGE_FUNCS = {
    "data": build_data,
    "clip_joint": build_clip_joint_stage,
    "vae": build_vae_stage,
    "sd": build_sd_stage,
    "clip": build_clip_stage,
    "judges": build_judges_stage,
}
