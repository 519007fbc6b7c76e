"""Does the mini-SD VAE keep the style? VAE variants trained on a stack's captioned digits, their reconstructions of
held-out digits judged by the stack's judges (style and digit), against the real images.

    python benchmarks/minisd_vae.py --stack runs/minisd                   # the default variants, one after another
    python benchmarks/minisd_vae.py --stack runs/minisd --variant 16,32:4:1:1600 --name minisd_vae_one

A variant is CHANNELS:NORM_GROUPS:EDGE_WEIGHT:STEPS (latent size = 32 / 2 ** (levels - 1)).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine, write_results
from difflab.digits.data import DOMAINS
from difflab.minisd import data as mdata
from difflab.minisd.build import STAGE_FUNCS, BuildConfig, done, training_sets
from difflab.minisd.judges import Judges
from difflab.minisd.models import MiniSDConfig
from difflab.minisd.train import StageConfig, TrainSettings, pixels, train_vae
from difflab.precision import Precision

VARIANTS = ("16,32,64:16:0:800", "16,32:16:0:800", "16,32:16:3:800", "16,32:16:1:1600", "16,32:4:1:1600")


def judged(judges: Judges, images: np.ndarray, held: mdata.CaptionedDigits) -> dict:
    v = judges(images)
    digits = np.array([d[0] for d in held.digits])
    out = {}
    for k, domain in enumerate(DOMAINS):
        mine = np.array([d == (domain,) for d in held.domains])
        out[f"{domain} style"] = float((v.domain[mine] == k).mean())
        out[f"{domain} digit"] = float((v.digit[mine] == digits[mine]).mean())
    return out


@torch.inference_mode()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    x = vae.decode(vae.encode(pixels(images, "cpu")).latent_dist.mean).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stack",
        type=Path,
        default=Path("runs/bench-minisd-vae"),
        help="A mini-SD build; its data and judges stages are built there when missing.",
    )
    parser.add_argument("--variant", action="append", help="CHANNELS:NORM_GROUPS:EDGE_WEIGHT:STEPS (repeatable).")
    parser.add_argument("--held-out", type=int, default=100, help="Held-out digits per style.")
    parser.add_argument("--name", default="minisd_vae")
    args = parser.parse_args()
    cfg = BuildConfig(out=str(args.stack))
    for stage in ("data", "judges"):
        if not done(args.stack, stage):
            STAGE_FUNCS[stage](cfg, args.stack, torch.device("cpu"))
    singles, _ = training_sets(cfg, args.stack)
    judges = Judges(args.stack / "judges")
    held = mdata.single_digits(args.held_out, 0, split="val")
    real = judged(judges, held.images, held)
    header = ["VAE (channels, norm groups, edge weight, steps)", "latent", "seconds"] + [
        f"{k}, recon (real)" for k in real
    ]
    rows = []
    for variant in args.variant or VARIANTS:
        channels, groups, edge, steps = variant.split(":")
        model = MiniSDConfig(vae_channels=tuple(int(c) for c in channels.split(",")), vae_norm_groups=int(groups))
        settings = TrainSettings(clip=None, vae=StageConfig(int(steps), 64, 2e-3), unet=None, edge_weight=float(edge))
        start = time.perf_counter()
        vae, _ = train_vae(singles, model, settings, Precision(), torch.device("cpu"), 0)
        seconds = time.perf_counter() - start
        rec = judged(judges, reconstruct(vae, held.images), held)
        size = model.latent_size
        rows.append(
            [variant, f"{size}x{size}x{model.latent_channels}", f"{seconds:.0f}"]
            + [f"{rec[k]:.2f} ({real[k]:.2f})" for k in real]
        )
    notes = f"{machine()['cpu']}, {torch.get_num_threads()} threads, fp32; {args.held_out} held-out digits per style."
    write_results(args.name, header, rows, notes)


if __name__ == "__main__":
    main()
