"""Training the miniature SD v1 stack from scratch, in fixed work and seeded: CLIP contrastively on image-caption
pairs, the VAE on pixels, then the UNet on VAE latents conditioned on the frozen CLIP text encoder.

Each stage's model is written as a standard folder (transformers / diffusers `save_pretrained`) into a hidden
temporary folder and renamed into place when complete, so an interrupted build leaves no half-written model:
`build(..., resume=True)` skips the stages whose folder exists and redoes the one that was cut off (the same
seeded work, hence the same weights on the same machine).

The UNet's forward process (`add_noise`, `get_velocity`) is diffusers' scheduler built from the stack's own
scheduler config, not difflab's `NoiseSchedule`, on purpose: the stack is sampled by diffusers pipelines whose
schedulers read that config, and training through the same object keeps the noise it learns to remove identical to
the noise those samplers assume for any config (scaled-linear betas, v-prediction). difflab's own models (digits,
DDIM) use `difflab.schedule`, which the tests hold step for step against these diffusers schedulers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflab.clip.tokenizer import MAX_LENGTH
from difflab.minisd.data import CaptionedDigits, attribute_bits, stated
from difflab.minisd.models import MiniSDConfig, build_clip, build_unet, build_vae, sd_scheduler_config
from difflab.precision import Precision
from difflab.schedule import NoiseSchedule

# CLIP's image normalisation (the default of transformers' CLIP image processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50


@dataclass
class TrainSettings:
    clip: StageConfig  # both towers, contrastively
    vae: StageConfig
    unet: StageConfig
    clip_vision: StageConfig  # then the image side alone, against the frozen text tower (see `tune_vision`)
    # L1 on image gradients, on top of the MSE, which alone blurs photo texture away; 3 kept more texture but
    # lost the colours (the gradient term outweighed the MSE tenfold).
    edge_weight: float = 1.0
    kl_weight: float = 1e-6  # on the KL summed over a latent, against a per-pixel MSE (1e-5 washes colours out)
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    pair_every: int = 3  # every n-th UNet step trains on two-digit canvases
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al., 2023)
    ema_decay: float = 0.995  # the UNet saved is this EMA of the trained weights


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


Log = Callable[[dict, int], None]  # `accelerator.log`: values, step


def optimize(
    model,
    params,
    stage: StageConfig,
    loss_fn,
    precision: Precision,
    device,
    desc: str,
    after_step=None,
    log: Log | None = None,
    log_every: int = 20,
) -> list[float]:
    """`stage.steps` AdamW steps of `loss_fn(step)` (then `after_step()`, e.g. an EMA update); returns the losses.
    With `log`, every `log_every` steps: the mean loss, learning rate, gradient norm and seconds per step."""
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, stage))
    model.train()
    losses = []
    if log is not None:
        log({"precision": precision.describe()}, 0)
    tick = time.perf_counter()
    bar = tqdm(range(stage.steps), desc=desc, unit="step", leave=False)
    for step in bar:
        with precision.autocast(device):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == stage.steps):
            seconds, tick = time.perf_counter() - tick, time.perf_counter()
            done = (step + 1) % log_every or log_every
            values = {"loss": float(np.mean(losses[-done:])), "lr": lr, "grad_norm": float(grad_norm)}
            log({**values, "step_time_s": seconds / done}, step + 1)
    model.eval()
    return losses


def pixels(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1], the VAE's input range."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def clip_pixels(images: torch.Tensor, device) -> torch.Tensor:
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device)
    return (x - mean[:, None, None]) / std[:, None, None]


# ---- CLIP ---------------------------------------------------------------------------------------------------
def clip_loss(logits_per_image: torch.Tensor, true_of: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where every caption true of an image is a positive (`true_of[i, j]`: caption j
    describes image i): a batch of 128 holds ~13 images of each digit, and the one-positive loss would push
    those true matches apart."""
    positives = true_of.float()
    per_image = positives / positives.sum(1, keepdim=True)
    per_text = positives.T / positives.T.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-per_image * F.log_softmax(logits_per_image.float(), 1), 1).mean()
        + torch.sum(-per_text * F.log_softmax(logits_per_image.float().T, 1), 1).mean()
    )


def caption_truth(data: CaptionedDigits) -> Callable[[torch.Tensor], torch.Tensor]:
    """`truth(idx)[i, j]`: caption idx[j] is true of image idx[i]: the same digit and, where the caption describes
    the image's appearance (and the images' looks are known), only what the image shows. Without the second
    condition the text tower learns to ignore every word but the digit, and so would a UNet reading it."""
    labels = torch.tensor([d[0] for d in data.digits])
    said = torch.tensor([attribute_bits(stated(t)) for t in data.texts])
    seen = torch.tensor([attribute_bits(w) for w in data.looks]) if data.looks else None

    def truth(idx: torch.Tensor) -> torch.Tensor:
        same = labels[idx, None] == labels[None, idx]
        if seen is None:
            return same
        return same & ((said[None, idx] & ~seen[idx, None]) == 0)

    return truth


def train_clip(
    data: CaptionedDigits, tokenizer, cfg: MiniSDConfig, stage: StageConfig, precision, device, seed, log=None
):
    model = build_clip(cfg).to(device)
    tok = tokenizer(data.texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    truth = caption_truth(data)
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(data.texts), (stage.batch_size,), generator=g)
        out = model(
            input_ids=tok.input_ids[idx].to(device),
            attention_mask=tok.attention_mask[idx].to(device),
            pixel_values=clip_pixels(data.images[idx.numpy()], device),
        )
        return clip_loss(out.logits_per_image, truth(idx).to(device))

    torch.manual_seed(seed)
    losses = optimize(model, list(model.parameters()), stage, loss_fn, precision, device, "CLIP", log=log)
    return model, losses


def tune_vision(clip, data: CaptionedDigits, tokenizer, stage: StageConfig, precision, device, seed, log=None):
    """Train CLIP's image side (vision tower, both projections, temperature) against its frozen text tower: the
    joint training leaves the small vision tower under-fitted (its training accuracy is as low as its held-out
    one), and the text tower, SD's text encoder, must stay exactly as the UNet learned to read it."""
    clip = clip.to(device)
    clip.text_model.requires_grad_(False).eval()
    unique = sorted(set(data.texts))
    row = {t: i for i, t in enumerate(unique)}
    caption_row = torch.tensor([row[t] for t in data.texts])
    pooled = []
    with torch.inference_mode():
        for i in range(0, len(unique), 512):
            tok = tokenizer(unique[i : i + 512], padding=True, truncation=True, max_length=MAX_LENGTH)
            ids, mask = (torch.tensor(tok[k], device=device) for k in ("input_ids", "attention_mask"))
            pooled.append(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output.float())
    pooled = torch.cat(pooled)
    truth = caption_truth(data)
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(data.texts), (stage.batch_size,), generator=g)
        image = clip.visual_projection(clip.vision_model(pixel_values=clip_pixels(data.images[idx.numpy()], device))[1])
        text = clip.text_projection(pooled[caption_row[idx]].to(device))
        logits = clip.logit_scale.exp() * F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        return clip_loss(logits, truth(idx).to(device))

    params = [p for n, p in clip.named_parameters() if not n.startswith("text_model.")]
    torch.manual_seed(seed)
    losses = optimize(clip, params, stage, loss_fn, precision, device, "CLIP vision", log=log)
    return clip, losses


# ---- VAE ----------------------------------------------------------------------------------------------------
def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical pixel differences (texture and stroke edges)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


def train_vae(data: CaptionedDigits, cfg: MiniSDConfig, settings: TrainSettings, precision, device, seed, log=None):
    torch.manual_seed(seed)
    model = precision.prepare(build_vae(cfg).to(device))
    stage, g = settings.vae, torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(data.images), (stage.batch_size,), generator=g)
        x = pixels(data.images[idx.numpy()], device)
        posterior = model.encode(precision.input(x)).latent_dist
        recon = model.decode(posterior.sample()).sample.float()
        loss = F.mse_loss(recon, x) + settings.kl_weight * posterior.kl().mean()
        if settings.edge_weight:
            loss = loss + settings.edge_weight * edge_loss(recon, x)
        return loss

    losses = optimize(model, list(model.parameters()), stage, loss_fn, precision, device, "VAE", log=log)
    return model, losses


@torch.inference_mode()
def encode_latents(vae, images: np.ndarray, device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, on the CPU."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(pixels(images[i : i + batch_size], device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


# ---- UNet ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def encode_captions(text_encoder, tokenizer, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """Last hidden states (N, 77, D) of the texts, padded to 77 tokens exactly as the SD pipeline pads prompts."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(
            texts[i : i + batch_size], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        out.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


@dataclass
class LatentSet:
    """Cached VAE posteriors of one image size and, per image, the row of its caption's hidden states."""

    mean: torch.Tensor
    std: torch.Tensor
    caption: torch.Tensor  # (N,) index into the caption table


def train_unet(
    sets: list[LatentSet],
    captions: torch.Tensor,
    empty: int,
    scaling: float,
    cfg: MiniSDConfig,
    settings: TrainSettings,
    precision,
    device,
    seed,
    log=None,
):
    """v-prediction (as SD 2) with min-SNR weighting on cached latents, and an EMA of the weights; set 0 every step
    but every `pair_every`-th, which trains on set 1 (two-digit canvases, half the batch: twice the pixels)."""
    import copy

    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    model = precision.prepare(build_unet(cfg).to(device))
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    schedule = NoiseSchedule(scheduler.betas, scheduler.config.prediction_type)  # the same, in difflab's math
    weight = schedule.min_snr_weight(torch.arange(schedule.num_steps), settings.snr_gamma).float()
    stage, g = settings.unet, torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        pairs = len(sets) > 1 and settings.pair_every and step % settings.pair_every == settings.pair_every - 1
        s = sets[1] if pairs else sets[0]
        b = stage.batch_size // 2 if pairs else stage.batch_size
        idx = torch.randint(len(s.mean), (b,), generator=g)
        latents = (s.mean[idx] + s.std[idx] * torch.randn(s.mean[idx].shape, generator=g)) * scaling
        cap = torch.where(torch.rand(b, generator=g) < settings.caption_dropout, empty, s.caption[idx])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(schedule.num_steps, (b,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        pred = model(precision.input(noisy.to(device)), t.to(device), captions[cap].to(device)).sample.float()
        per_image = F.mse_loss(pred, target.to(device), reduction="none").mean((1, 2, 3))
        return (weight[t].to(device) * per_image).mean()

    @torch.no_grad()
    def ema_update() -> None:
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - settings.ema_decay)

    losses = optimize(model, list(model.parameters()), stage, loss_fn, precision, device, "UNet", ema_update, log)
    return ema.eval(), losses
