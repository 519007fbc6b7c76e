"""Textual inversion: step time with the cached VAE latents vs. a plain loop that encodes every step; generation speed.

The training comparison uses the real SD v1 architecture (UNet 320/640/1280/1280, cross-attention 768, the SD VAE,
CLIP ViT-L/14 text encoder) with random weights, at 256x256 and batch 1 on whatever device is present. Generation is
measured on the tiny random pipeline (same components, ~3 M parameters).

    .venv/bin/python benchmarks/personalize.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import skimage.data
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from difflab.configs import SD_V1_CONFIG  # noqa: E402
from difflab.minisd.models import MiniSDConfig, random_pipeline  # noqa: E402
from difflab.personalize.textual_inversion import Concept, TextualInversion, TextualInversionConfig, load_images  # noqa: E402
from difflab.utils import pick_device  # noqa: E402

RESOLUTION = 256


def sd_v1_random():
    """SD v1 with random weights, built from the shipped configs (no checkpoint needed)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difflab.clip.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_V1_CONFIG / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD_V1_CONFIG / "vae")),
        text_encoder=CLIPTextModel(
            CLIPTextConfig.from_pretrained(SD_V1_CONFIG / "text_encoder", local_files_only=True)
        ),
        tokenizer=load_clip_tokenizer(SD_V1_CONFIG / "tokenizer"),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(SD_V1_CONFIG / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process); CPU time is the steadier figure on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def training_rows(images: Path, out: Path, device: str) -> list[list]:
    t0 = time.perf_counter()
    pipe = sd_v1_random()
    print(f"built SD v1 in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = TextualInversionConfig(
        concepts=[Concept(str(images), "<new1>", "dog")],
        sd="unused",
        out=str(out),
        resolution=RESOLUTION,
        steps=10,
        batch_size=1,
        grad_accum=1,
        device=device,
    )
    w, c = time.perf_counter(), time.process_time()
    ti = TextualInversion(cfg, pipe=pipe)  # encodes the 5 images and their mirrors once
    cache = (time.perf_counter() - w, time.process_time() - c)
    pixels = load_images(images, RESOLUTION).to(ti.device)
    vae = ti.pipe.vae

    def encode():
        # What a loop without the cache does each step: pick an image, maybe mirror it, run the VAE encoder.
        x = pixels[torch.randint(len(pixels), (1,))]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        with torch.no_grad():
            return vae.encode(x.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor

    def cached_step():
        ti.train_step(ti.data.sample_batch())

    def plain_step():
        batch = ti.data.sample_batch()
        batch["latents"] = encode()
        ti.train_step(batch)

    cached_step(), plain_step()  # warm-up
    times = {"cached": [], "plain": [], "encode": []}
    # A-B then B-A order, so drift in the load from other processes hits both loops alike; mean of the rounds.
    for order in [(("cached", cached_step), ("plain", plain_step)), (("plain", plain_step), ("cached", cached_step))]:
        for name, fn in order:
            times[name].append(timed(fn))
        times["encode"].append(timed(encode))
    mean = {k: (sum(w for w, _ in v) / len(v), sum(c for _, c in v) / len(v)) for k, v in times.items()}
    rows = [
        ["SD v1 TI step, cached latents (ours)", 1, *mean["cached"]],
        ["SD v1 TI step, VAE encode every step", 1, *mean["plain"]],
        ["VAE encode alone (saved per step)", 1, *mean["encode"]],
        ["latent cache build, once (10 encodes)", 10, *cache],
    ]
    return [[name, RESOLUTION, b, round(w, 2), round(c, 2)] for name, b, w, c in rows]


@torch.inference_mode()
def generation_row(device: str) -> list:
    pipe = random_pipeline(MiniSDConfig()).to(device)  # the mini stack, random weights
    pipe.set_progress_bar_config(disable=True)
    n, steps, size = 8, 10, 32

    def run():
        pipe(
            ["a photo of a dog"] * n,
            num_inference_steps=steps,
            height=size,
            width=size,
            output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        )

    run()
    w, c = min(timed(run) for _ in range(2))
    return [
        f"tiny SD generation of {n} images, {steps} PNDM steps, CFG 7.5 ({n / w:.2f} images/s)",
        size,
        n,
        round(w, 2),
        round(c, 2),
    ]


def main() -> None:
    device = str(pick_device(None))
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(images / f"{name}.png")
        rows = training_rows(images, Path(tmp) / "out", device)
    rows.append(generation_row(device))
    speedup_wall, speedup_cpu = rows[1][3] / rows[0][3], rows[1][4] / rows[0][4]
    write_results(
        "personalize",
        ["case", "resolution", "batch", "wall s", "CPU s"],
        rows,
        notes=(
            f"Textual-inversion step (UNet forward+backward through the text encoder, batch 1, fp32, {device}): "
            f"caching the VAE latents makes a step {speedup_cpu:.2f}x cheaper in CPU time ({speedup_wall:.2f}x in "
            f"wall time), mean of 2 steps each in A-B/B-A order after a warm-up. The cache costs 10 encodes once. "
            f"Load average at start: {load:.1f} on {os.cpu_count()} cores; wall times on a shared machine are noisy."
        ),
        extra={
            "speedup_cpu": round(speedup_cpu, 3),
            "speedup_wall": round(speedup_wall, 3),
            "device": device,
            "load_average": load,
        },
    )


if __name__ == "__main__":
    main()
