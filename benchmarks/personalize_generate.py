"""Personalized generation and composition throughput on a tiny random Stable Diffusion (timing only).

Generation: 8 images of one two-token prompt, 10 DDIM steps, 64x64. Baseline: diffusers' pipeline called once
per image with the prompt string (the text encoder runs for every image). difflab encodes the prompt once and
batches images, each with its own seed. Composition: one image; the plain pipeline, the same with the
cross-attention recorder installed, and the whole compose (layout pass + region pass with 2 prompts batched).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402

N_IMAGES, STEPS, SIZE = 8, 10, 64
PROMPT = "a <new1> in a city in a style of <new2>"


def main() -> None:
    from difflab.minisd.models import MiniSDConfig, random_pipeline
    from difflab.personalize.compose import AttentionStore, ComposeConfig, Concept, capture_cross_attention, compose
    from difflab.personalize.embeddings import add_tokens
    from difflab.personalize.generate import (
        GenerateConfig,
        encode_prompt,
        image_seed,
        initial_latents,
        sample,
        set_scheduler,
    )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipe = random_pipeline(MiniSDConfig(), seed=0)  # the mini stack, random weights
    width = pipe.text_encoder.config.hidden_size
    add_tokens(pipe.tokenizer, pipe.text_encoder, {"<new1>": torch.randn(1, width), "<new2>": torch.randn(1, width)})
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    seeds = [image_seed(42, "0", 0, n) for n in range(N_IMAGES)]

    def diffusers_per_image():
        for s in seeds:
            pipe(
                PROMPT,
                generator=torch.Generator().manual_seed(s),
                num_inference_steps=STEPS,
                height=SIZE,
                width=SIZE,
                output_type="pil",
            )

    def ours(batch_size):
        cfg = GenerateConfig(steps=STEPS, height=SIZE, width=SIZE, batch_size=batch_size)
        return lambda: sample(pipe, encode_prompt(pipe, PROMPT), seeds, cfg)

    rows = []
    base = best_time(diffusers_per_image, clock=time.process_time)
    rows.append(["generate: diffusers pipeline per image", f"{N_IMAGES} images", base, base / N_IMAGES, 1.0])
    for b in (1, 8):
        t = best_time(ours(b), clock=time.process_time)
        rows.append([f"generate: difflab, batch {b}", f"{N_IMAGES} images", t, t / N_IMAGES, base / t])

    ccfg = ComposeConfig(steps=STEPS, height=SIZE, width=SIZE)
    latents = initial_latents(pipe, [42], SIZE, SIZE)

    def plain():
        pipe(PROMPT, latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pil")

    def recorded():
        with capture_cross_attention(pipe.unet, AttentionStore()):
            plain()

    concepts = [Concept("<new1>", "a photo of a <new1> dog in a style of <new2>")]
    t_plain = best_time(plain, clock=time.process_time)
    rows.append(["compose: naive prompt only", "1 image", t_plain, t_plain, 1.0])
    t_rec = best_time(recorded, clock=time.process_time)
    rows.append(["compose: naive + attention recording", "1 image", t_rec, t_rec, t_plain / t_rec])
    t_comp = best_time(lambda: compose(pipe, PROMPT, concepts, ccfg), clock=time.process_time)
    rows.append(["compose: layout + region pass (2 prompts)", "1 image", t_comp, t_comp, t_plain / t_comp])

    write_results(
        "personalize_generate",
        ["setting", "work", "CPU seconds", "CPU seconds / image", "speed vs first row of its group"],
        rows,
        notes=f"Tiny random SD (tiny_sd), {SIZE}x{SIZE}, {STEPS} DDIM steps, guidance 7.5. The region pass runs "
        "1 unconditional + 2 conditional prompts in one UNet batch (vs 2 in the plain pipeline). "
        "CPU time of one thread (best of 3), measured on a shared machine (1-minute load average at the end: "
        f"{os.getloadavg()[0]:.1f}), where wall times scatter.",
        extra={"load_average_1min": os.getloadavg()[0]},
    )


if __name__ == "__main__":
    main()
