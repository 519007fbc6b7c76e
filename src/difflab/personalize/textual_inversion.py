"""Textual inversion (Gal et al., 2022) on Stable Diffusion v1.x: learn new token embeddings, nothing else.

Only the rows of the new tokens change: after every optimizer step all other rows of the embedding matrix are
copied back, so they stay bit-identical. The VAE runs once: each reference image and its mirror image are encoded
at start-up and every step samples latents from the cached mean/std (what `vae.encode(x).latent_dist.sample()`
would do each step, without the encoder).

The forward process is the SD folder's own diffusers scheduler (`add_noise`, and `get_velocity` for a v-prediction
model), not difflab's `NoiseSchedule`: the embedding must be learned under exactly the noise the model's pipeline
removes, whatever schedule its `scheduler_config.json` names, as diffusers' textual-inversion script does.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflab.io import (
    METADATA,
    atomic_write,
    image_files,
    load_rgb,
    open_run,
    read_metadata,
    read_torch,
    save_json,
    save_png,
    write_model_card,
)
from difflab.parallel import end_training
from difflab.personalize.embeddings import add_tokens, expand_prompt, save_embeddings
from difflab.personalize.prompts import TEMPLATES
from difflab.precision import Precision
from difflab.report.tracking import accelerator_kwargs, flat_config, log_images
from difflab.utils import DifflabError, Interrupted, StopRequest, image_grid, pick_device, stream_seed, to_uint8


@dataclass
class Concept:
    """A folder of reference images, the new token that will stand for them and a one-token initialiser word."""

    images: str
    token: str
    init: str
    kind: str = "object"  # "object" or "style": picks the caption templates

    @classmethod
    def parse(cls, spec: str) -> "Concept":
        """`DIR:TOKEN:INIT[:object|style]` (split from the right, so DIR may contain ':')."""
        parts = spec.split(":")
        kind = parts.pop() if parts[-1] in TEMPLATES else "object"
        if len(parts) < 3 or not all(parts[-2:]):
            raise DifflabError(f"concept {spec!r}: expected DIR:TOKEN:INIT[:object|style]")
        folder = ":".join(parts[:-2])
        if len(parts) >= 4 and not Path(folder).exists() and Path(":".join(parts[:-3])).is_dir():
            # DIR:TOKEN:INIT:KIND with a kind we do not know, not a folder name holding ':'
            raise DifflabError(f"concept {spec!r}: kind {parts[-1]!r} is not one of {', '.join(TEMPLATES)}")
        return cls(folder, parts[-2], parts[-1], kind)


@dataclass
class TextualInversionConfig:
    concepts: list[Concept]
    sd: str  # diffusers folder or sd-v1-4.ckpt
    out: str
    num_vectors: int = 1
    resolution: int = 512
    center_crop: bool = False  # False: squash-resize the whole image, as diffusers and the original code do
    steps: int = 3000  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 5e-4
    scale_lr: bool = True  # lr x grad_accum x batch_size x processes, as in diffusers
    weight_decay: float = 1e-2
    ema_decay: float = 0.0  # > 0 keeps an EMA of the new rows, saved instead of the raw rows
    flip_p: float = 0.5
    # The frozen UNet and VAE in this dtype, under autocast. "auto" is fp32 on a CPU, untimed: the embedding's
    # gradient passes through the whole UNet, and a bf16 UNet on a CPU has not been shown to learn as well.
    precision: Precision = Precision("auto")
    gradient_checkpointing: bool = False
    save_every: int = 500  # embedding snapshots (0: only at the end)
    checkpoint_every: int = 500  # resumable training state (0: only at the end)
    validate_every: int = 0  # validation images (0: never)
    report_to: str = "none"  # difflab.report.tracking.REPORT_TO
    validation_prompts: list[str] = field(default_factory=list)  # default: one object/style prompt per concept
    validation_images: int = 4
    validation_steps: int = 25
    resume: bool = False
    overwrite: bool = False  # delete an earlier run's outputs in `out` first
    seed: int = 0
    device: str | None = None
    vae_batch: int = 8  # images per VAE encoding batch while caching latents


def load_images(folder: str | Path, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: the whole image squashed to R x R (bicubic), or its centre square."""
    from PIL import Image

    out = []
    for path in image_files(folder):
        im = load_rgb(path)
        if center_crop:
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s))
        im = im.resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def reference_captions(folder: str | Path, token: str) -> list[str] | None:
    """Per-image prompts from the folder's `metadata.jsonl` (the `imagefolder` captions), `{}` standing for the
    token: "the number 4 in the style of {}". They say what each image shows besides the concept, so the
    embedding need not learn it; without the file, the object or style templates are used."""
    folder = Path(folder)
    if not (folder / METADATA).is_file():
        return None
    texts = {row["file_name"]: row["text"] for row in read_metadata(folder)}
    captions = []
    for path in image_files(folder, "reference image"):
        text = texts.get(path.name)
        if text is None or "{}" not in text:
            problem = "has no caption" if text is None else f"has a caption without {{}} for the token: {text!r}"
            raise DifflabError(f"{folder / METADATA}: {path.name} {problem}")
        captions.append(text.replace("{}", token))
    return captions


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DifflabError(f"initialiser {word!r} is {len(ids)} tokens {pieces}; choose a word that is one token")
    return ids[0]


def check_config(cfg: TextualInversionConfig) -> None:
    if not cfg.concepts:
        raise DifflabError("give at least one concept (DIR:TOKEN:INIT)")
    small = [
        f"{name} = {getattr(cfg, name)}"
        for name in (
            "num_vectors",
            "steps",
            "batch_size",
            "grad_accum",
            "vae_batch",
            "validation_images",
            "validation_steps",
        )
        if getattr(cfg, name) < 1
    ]
    if small:
        raise DifflabError(f"{', '.join(small)}: must be at least 1")
    if cfg.resolution < 8 or cfg.resolution % 8:
        raise DifflabError(f"resolution = {cfg.resolution}: must be a positive multiple of 8 (the VAE downsamples 8x)")
    if cfg.resume and cfg.overwrite:
        raise DifflabError("--resume continues the run in --out, --overwrite deletes it: choose one")
    for c in cfg.concepts:
        if c.kind not in TEMPLATES:
            raise DifflabError(f"concept {c.token}: kind must be one of {', '.join(TEMPLATES)}, not {c.kind!r}")
    if len({c.token for c in cfg.concepts}) != len(cfg.concepts):
        raise DifflabError("each concept needs its own token")


def make_accelerator(cfg: TextualInversionConfig):
    from accelerate import Accelerator

    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)  # accelerate runs a single process on the current CUDA device
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(Precision.parse(cfg.precision).settle(device).name, "no")
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device.type == "cpu",
        mixed_precision=mixed,
        **accelerator_kwargs(cfg.report_to, cfg.out),
    )


def _file_stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"


TRACKER_PROJECT = "difflab-textual-inversion"  # the run name trackers file the training under, in <out>/logs
CHECKPOINT_KEYS = ("step", "tokens", "num_vectors", "rows", "generator", "losses")


class ReferenceLatents:
    """The training data: the VAE posterior of every reference image and its mirror, cached once, the tokenized
    captions and templates, and the seeded generator that draws each batch."""

    def __init__(self, ti: TextualInversion, images: list[torch.Tensor], captions: list[list[str] | None]):
        cfg = ti.cfg
        self.cfg, self.tokenizer, self.vae, self.device = cfg, ti.tokenizer, ti.pipe.vae, ti.device
        self.num_train_timesteps = ti.noise_scheduler.config.num_train_timesteps
        self.latent_mean, self.latent_std = self._cache_latents(images)
        self.prompt_ids = [
            self.tokenize([expand_prompt(t.format(c.token), ti.tokens) for t in TEMPLATES[c.kind]])
            for c in cfg.concepts
        ]
        self.caption_ids = [
            self.tokenize([expand_prompt(t, ti.tokens) for t in caps]) if caps else None for caps in captions
        ]
        self.gen = torch.Generator().manual_seed(stream_seed(cfg.seed, ti.accelerator.process_index))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.inference_mode()
    def _cache_latents(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per concept, (N, 2, C, h, w) mean and std of the VAE posterior for each image and its mirror."""
        vae, means, stds = self.vae, [], []
        for x in images:
            both = torch.cat([x, x.flip(-1)])
            # In chunks: ~60 images at 512 px in one VAE batch would not fit in memory.
            dists = [
                vae.encode(both[i : i + self.cfg.vae_batch].to(self.device, vae.dtype)).latent_dist
                for i in range(0, len(both), self.cfg.vae_batch)
            ]
            mean = torch.cat([d.mean.float().cpu() for d in dists])
            std = torch.cat([d.std.float().cpu() for d in dists])
            n = len(x)
            means.append(mean.view(2, n, *mean.shape[1:]).transpose(0, 1).contiguous())
            stds.append(std.view(2, n, *std.shape[1:]).transpose(0, 1).contiguous())
        return means, stds

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """Random concept, image, mirror and caption (the image's own, or a random template) per example; latents
        drawn from the cached posterior."""
        b, g = self.cfg.batch_size, self.gen
        concept = torch.randint(len(self.cfg.concepts), (b,), generator=g).tolist()
        latents, ids = [], []
        for c in concept:
            i = torch.randint(len(self.latent_mean[c]), (1,), generator=g).item()
            flip = int(torch.rand((), generator=g).item() < self.cfg.flip_p)
            mean, std = self.latent_mean[c][i, flip], self.latent_std[c][i, flip]
            latents.append(mean + std * torch.randn(mean.shape, generator=g))
            if self.caption_ids[c] is not None:
                ids.append(self.caption_ids[c][i])
            else:
                ids.append(self.prompt_ids[c][torch.randint(len(self.prompt_ids[c]), (1,), generator=g).item()])
        latents = torch.stack(latents) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(self.num_train_timesteps, (b,), generator=g)
        return {"latents": latents, "input_ids": torch.stack(ids), "noise": noise, "timesteps": timesteps}


class TextualInversion:
    """The frozen pipeline with the new tokens, the training data and the optimizer of the embedding rows; the loss,
    one step and `train()`, the loop. Checkpoints, validation grids and the report are the functions below it."""

    def __init__(self, cfg: TextualInversionConfig, pipe=None):
        from diffusers import DDPMScheduler

        check_config(cfg)
        self.cfg, self.out = cfg, Path(cfg.out)
        # Read before loading SD, so that a bad folder fails at once.
        images = [load_images(c.images, cfg.resolution, cfg.center_crop) for c in cfg.concepts]
        captions = [reference_captions(c.images, c.token) for c in cfg.concepts]
        self.accelerator = make_accelerator(cfg)
        self.device = self.accelerator.device

        if pipe is None:
            from difflab.personalize.sd import load_sd

            pipe = load_sd(cfg.sd, device="cpu")
        self.pipe, self.tokenizer, self.text_encoder = pipe, pipe.tokenizer, pipe.text_encoder
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        self._add_tokens()
        self._freeze_all_but_the_embedding()
        self.data = ReferenceLatents(self, images, captions)

        procs = self.accelerator.num_processes
        lr = cfg.lr * cfg.grad_accum * cfg.batch_size * procs if cfg.scale_lr else cfg.lr
        self.lr = lr
        self.adam = torch.optim.AdamW(
            [self.text_encoder.get_input_embeddings().weight], lr=lr, weight_decay=cfg.weight_decay
        )
        self.text_encoder, self.optimizer = self.accelerator.prepare(self.text_encoder, self.adam)
        self.ema = self._rows().clone() if cfg.ema_decay > 0 else None
        self.step, self.grad_norm = 0, 0.0
        self.losses: list[float] = []

    def _add_tokens(self) -> None:
        """New tokens start from their initialiser's embedding (every vector of a multi-vector token alike)."""
        cfg = self.cfg
        weight = self.text_encoder.get_input_embeddings().weight
        init = {
            c.token: weight[single_token_id(self.tokenizer, c.init)].detach().clone().repeat(cfg.num_vectors, 1)
            for c in cfg.concepts
        }
        self.token_ids = add_tokens(self.tokenizer, self.text_encoder, init)
        self.new_ids = torch.tensor(sum(self.token_ids, []))
        self.tokens = {c.token: cfg.num_vectors for c in cfg.concepts}

    def _freeze_all_but_the_embedding(self) -> None:
        """Frozen UNet and VAE in the compute dtype; the embedding matrix trains in fp32, and a copy of its rows
        lets every step restore all but the new ones."""
        pipe = self.pipe
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        for frozen in (pipe.unet, pipe.vae):
            frozen.to(self.device).requires_grad_(False)
            if weight_dtype != torch.float32:
                frozen.to(dtype=weight_dtype)
        self.text_encoder.to(self.device, torch.float32).requires_grad_(False)
        self.text_encoder.get_input_embeddings().weight.requires_grad_(True)
        if self.cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            # transformers 5 renamed gradient_checkpointing_enable; keep working with 4.x too.
            enable = getattr(self.text_encoder, "activation_checkpointing_enable", None)
            (enable or self.text_encoder.gradient_checkpointing_enable)()
            pipe.unet.train()
        self.text_encoder.train()
        self.frozen_rows = self.text_encoder.get_input_embeddings().weight.detach().clone()
        self.frozen_mask = torch.ones(len(self.frozen_rows), dtype=torch.bool, device=self.device)
        self.frozen_mask[self.new_ids] = False

    # ---- model ------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Denoising loss of the frozen UNet conditioned on the prompt with the learned tokens."""
        unet = self.pipe.unet
        latents, noise = batch["latents"].to(self.device), batch["noise"].to(self.device)
        t = batch["timesteps"].to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        with self.accelerator.autocast():
            cond = self.text_encoder(batch["input_ids"].to(self.device))[0]
            pred = unet(noisy.to(unet.dtype), t, cond.to(unet.dtype)).sample
        return F.mse_loss(pred.float(), target.float())

    def _embedding(self):
        return self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight

    def _rows(self) -> torch.Tensor:
        return self._embedding().detach()[self.new_ids.to(self.device)].float()

    @torch.no_grad()
    def _restore_frozen_rows(self) -> None:
        weight = self._embedding()
        weight[self.frozen_mask] = self.frozen_rows[self.frozen_mask]

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One micro-batch; the optimizer steps every `grad_accum` calls. Returns the loss."""
        with self.accelerator.accumulate(self.text_encoder):
            loss = self.loss(batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                grad = self._embedding().grad
                self.grad_norm = float(grad[self.new_ids.to(grad.device)].norm()) if grad is not None else 0.0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_frozen_rows()
        if self.accelerator.sync_gradients:
            self.step += 1
            if self.ema is not None:
                self.ema.lerp_(self._rows(), 1 - self.cfg.ema_decay)
        return loss.item()

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """`{token: (num_vectors, dim)}`, EMA rows when EMA is on."""
        rows = self.ema if self.ema is not None else self._rows()
        return {t: rows[k * n : (k + 1) * n].cpu().clone() for k, (t, n) in enumerate(self.tokens.items())}

    # ---- files ------------------------------------------------------------------------------------------
    def save_embeddings(self, name: str = "learned_embeds.safetensors") -> Path:
        """All tokens in one file, plus one diffusers-loadable file per token under `embeds/`."""
        emb = self.learned_embeddings()
        if name == "learned_embeds.safetensors":
            for token, vecs in emb.items():
                save_embeddings(self.out / "embeds" / f"{_file_stem(token)}.safetensors", {token: vecs})
        return save_embeddings(self.out / name, emb)

    # ---- loop -------------------------------------------------------------------------------------------
    def train(self, stop: StopRequest | None = None) -> Path:
        """The loop; on a stop request (first Ctrl-C or SIGTERM) it saves a checkpoint and raises `Interrupted`."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.resume:
            load_checkpoint(self)
        if acc.is_main_process:
            save_json({**asdict(self.cfg), "lr_effective": self.lr}, self.out / "config.json")
        acc.init_trackers(TRACKER_PROJECT, flat_config({**asdict(cfg), "precision": acc.mixed_precision}))
        try:
            return self._train_loop(stop)
        finally:
            self.text_encoder, self.optimizer = end_training(acc, [self.text_encoder, self.optimizer])

    def _train_loop(self, stop: StopRequest | None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.steps, initial=self.step, desc="textual inversion", disable=not acc.is_local_main_process)
        t0 = last_log = time.perf_counter()
        while self.step < cfg.steps:
            before = self.step
            self.losses.append(self.train_step(self.data.sample_batch()))
            if self.step == before:
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-cfg.grad_accum * 10 :]):.4f}")
            seconds, last_log = time.perf_counter() - last_log, time.perf_counter()
            values = {"loss": float(np.mean(self.losses[-cfg.grad_accum :])), "lr": self.lr, "step_time_s": seconds}
            acc.log({**values, "grad_norm": self.grad_norm}, step=self.step)
            if acc.is_main_process:
                last = self.step == cfg.steps
                if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                    self.save_embeddings(f"snapshots/learned_embeds-step{self.step:06d}.safetensors")
                # A tracked run logs a last grid even without --validate-every, as diffusers' examples do.
                if (cfg.validate_every and self.step % cfg.validate_every == 0) or (
                    last and (cfg.validate_every or acc.trackers)
                ):
                    log_images(acc, "validation", validation_grid(self), self.step)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                    save_checkpoint(self)
            if stop is not None and self._stop_requested(stop):
                if acc.is_main_process:
                    save_checkpoint(self)
                acc.wait_for_everyone()
                raise Interrupted(
                    f"stopped at step {self.step} of {cfg.steps}; checkpoint saved in {self.out}; "
                    "continue with --resume"
                )
        bar.close()
        acc.wait_for_everyone()
        path = self.out / "learned_embeds.safetensors"
        if acc.is_main_process:
            path = self.save_embeddings()
            save_json(
                {
                    "tokens": self.tokens,
                    "steps": self.step,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "losses": self.losses,
                },
                self.out / "train_log.json",
            )
            write_report(self)
            write_card(self, time.perf_counter() - t0)
        return path

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=self.device)
        return float(self.accelerator.reduce(flag, "max")) > 0


def save_checkpoint(ti: TextualInversion) -> Path:
    """Step, rows, EMA, data RNG and the Adam moments of the new rows only (the rest never matter)."""
    ids = ti.new_ids.to(ti.device)
    adam = ti.adam.state.get(ti.adam.param_groups[0]["params"][0], {})
    state = {
        "step": ti.step,
        "tokens": list(ti.tokens),
        "num_vectors": ti.cfg.num_vectors,
        "rows": ti._rows().cpu(),
        "generator": ti.data.gen.get_state(),
        "losses": torch.tensor(ti.losses),
    }
    if ti.ema is not None:
        state["ema"] = ti.ema.cpu()
    if adam:
        state["adam"] = {
            "step": adam["step"].cpu(),
            "exp_avg": adam["exp_avg"][ids].cpu(),
            "exp_avg_sq": adam["exp_avg_sq"][ids].cpu(),
        }
    return atomic_write(ti.out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(ti: TextualInversion) -> None:
    path = ti.out / "checkpoint.pt"
    state = read_torch(path, "textual-inversion checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DifflabError(f"{path}: not a difflab textual-inversion checkpoint (missing {', '.join(missing)})")
    if state["tokens"] != list(ti.tokens) or state["num_vectors"] != ti.cfg.num_vectors:
        raise DifflabError(
            f"{path}: checkpoint is for tokens {state['tokens']} x {state['num_vectors']} vectors, "
            f"not {list(ti.tokens)} x {ti.cfg.num_vectors}"
        )
    ids = ti.new_ids.to(ti.device)
    weight = ti._embedding()
    with torch.no_grad():
        weight[ids] = state["rows"].to(weight.device, weight.dtype)
    if "adam" in state:
        p = ti.adam.param_groups[0]["params"][0]
        exp_avg, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
        exp_avg[ids], exp_avg_sq[ids] = (
            state["adam"]["exp_avg"].to(p.device),
            state["adam"]["exp_avg_sq"].to(p.device),
        )
        ti.adam.state[p] = {"step": state["adam"]["step"], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if ti.ema is not None:
        ti.ema = state.get("ema", state["rows"]).to(ti.device)
    ti.data.gen.set_state(state["generator"])
    ti.step, ti.losses = state["step"], state["losses"].tolist()


@torch.inference_mode()
def validation_grid(ti: TextualInversion) -> np.ndarray:
    """A grid of images per validation prompt, sampled with the current embeddings (fixed seed)."""
    cfg = ti.cfg
    prompts = cfg.validation_prompts or [(TEMPLATES[c.kind][0]).format(c.token) for c in cfg.concepts]
    ti.pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        g = torch.Generator(ti.device).manual_seed(cfg.seed)
        with ti.accelerator.autocast():
            images = ti.pipe(
                prompt,
                num_images_per_prompt=cfg.validation_images,
                generator=g,
                num_inference_steps=cfg.validation_steps,
                height=cfg.resolution,
                width=cfg.resolution,
                output_type="pt",
            ).images
        rows.append(to_uint8(images, (0.0, 1.0)))
    grid = image_grid(np.concatenate(rows), rows=len(prompts), cols=cfg.validation_images)
    save_png(grid, ti.out / "validation" / f"step{ti.step:06d}.png")
    return grid


def write_report(ti: TextualInversion) -> Path:
    from difflab.report import HtmlReport
    from difflab.report.plots import plot_loss_curve

    smooth = max(len(ti.losses) // 50, 5) if len(ti.losses) >= 10 else 0
    loss_png = plot_loss_curve(range(len(ti.losses)), ti.losses, ti.out / "loss.png", "micro-batch", smooth)
    report = HtmlReport("Textual inversion")
    report.table(["setting", "value"], [[k, str(v)] for k, v in asdict(ti.cfg).items()])
    report.text(
        f"Learned tokens: {', '.join(ti.tokens)} ({ti.cfg.num_vectors} vector(s) each); "
        f"{ti.step} optimizer steps, effective lr {ti.lr:g}."
    )
    report.image(str(loss_png), caption="training loss (MSE)")
    for path in sorted((ti.out / "validation").glob("*.png")):
        report.image(str(path), caption=f"validation, {path.stem}")
    return report.save(ti.out / "report.html")


def write_card(ti: TextualInversion, seconds: float) -> None:
    """The model card of the learned embeddings, loadable by diffusers' `load_textual_inversion`."""
    from difflab.precision import cpu_name

    cfg = ti.cfg
    first = next(iter(ti.tokens))
    made = {
        "command": "`difflab personalize train "
        + " ".join(f"--concept {c.images}:{c.token}:{c.init}:{c.kind}" for c in cfg.concepts)
        + f" --sd {cfg.sd} --out {cfg.out} --steps {cfg.steps} --seed {cfg.seed}`",
        "tokens": ", ".join(f"`{t}` ({n} vector(s))" for t, n in ti.tokens.items()),
        "steps": f"{ti.step} optimizer steps of {cfg.batch_size} x {cfg.grad_accum}, effective lr {ti.lr:g}",
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads" if ti.device.type == "cpu" else str(ti.device),
        "training time": f"{seconds:.0f} s",
    }
    validation = sorted((ti.out / "validation").glob("*.png"))
    usage = f"""from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{cfg.sd}")
pipe.load_textual_inversion("{ti.out}/embeds/{_file_stem(first)}.safetensors", token="{first}")
image = pipe("a photo of {first}").images[0]"""
    summary = (
        f"Textual-inversion embeddings for {', '.join(ti.tokens)}: new token vectors learned on reference images, "
        "with the Stable Diffusion model itself unchanged."
    )
    image = str(validation[-1].relative_to(ti.out)) if validation else None
    tags = ["stable-diffusion", "textual-inversion", "text-to-image"]
    write_model_card(ti.out, "difflab textual inversion", summary, made, usage, tags, "text-to-image",
                     base_model=_base_model(cfg.sd), image=image)  # fmt: skip


def _base_model(sd: str) -> str:
    """The base model's name for the card: a hub-style id as given, else the local folder's name."""
    return sd if re.fullmatch(r"[\w.-]+/[\w.-]+", sd) and not Path(sd).exists() else Path(sd).name


def train_textual_inversion(cfg: TextualInversionConfig, pipe=None) -> Path:
    """Train and return the path of `learned_embeds.safetensors`. `cfg.out` follows the run-folder policy:
    `--resume` continues its checkpoint.pt, `--overwrite` deletes what the earlier run wrote."""
    check_config(cfg)
    for c in cfg.concepts:  # a bad folder fails before the run folder is claimed
        image_files(c.images)
    main = os.environ.get("RANK", "0") == "0"  # accelerate / torchrun set RANK; the main process owns the folder
    folder = open_run(
        cfg.out, "personalize train", overwrite=cfg.overwrite, resume=cfg.resume, checkpoint="checkpoint.pt", main=main
    )
    with folder, StopRequest() as stop:
        return TextualInversion(cfg, pipe).train(stop)
