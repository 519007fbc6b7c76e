"""`difflab minisd`: build the miniature Stable Diffusion + CLIP stack from the embedded digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difflab.cli.options import App, Device, Overwrite, Seed, checked, precision_option
from difflab.minisd.build import TOLERANCE, BuildConfig
from difflab.minisd.prebuilt import PREBUILT
from difflab.report.tracking import REPORT_TO_HELP
from difflab.utils import DifflabError

app = App(help="A miniature Stable Diffusion v1 + CLIP, trained here on the CPU.", no_args_is_help=True)
BuildPrecision = precision_option(checked("a training step's gradient of each stage", TOLERANCE))
DEFAULTS = BuildConfig(out="")


@app.command("build")
def build_command(
    out: Annotated[str, typer.Option("--out", help="Folder for the stack (sd/, clip/, judges/, data/).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the finished stages in --out and build only what is missing.")
    ] = False,
    clip_steps: Annotated[int, typer.Option(help="CLIP training steps, both towers.")] = DEFAULTS.train.clip.steps,
    clip_vision_steps: Annotated[
        int, typer.Option(help="Further CLIP steps on the image side alone (the text tower frozen).")
    ] = DEFAULTS.train.clip_vision.steps,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps.")] = DEFAULTS.train.vae.steps,
    unet_steps: Annotated[int, typer.Option(help="UNet training steps.")] = DEFAULTS.train.unet.steps,
    vae_edge_weight: Annotated[
        float, typer.Option(help="Weight of the VAE's L1 loss on image gradients (keeps photo texture; 0: off).")
    ] = DEFAULTS.train.edge_weight,
    per_domain: Annotated[int, typer.Option(help="Captioned single digits per style.")] = DEFAULTS.n_per_domain,
    pairs: Annotated[int, typer.Option(help="Captioned two-digit canvases.")] = DEFAULTS.n_pairs,
    seed: Seed = DEFAULTS.seed,
    device: Device = None,
    precision: BuildPrecision = DEFAULTS.precision,
    overwrite: Overwrite = False,
    report_to: Annotated[str, typer.Option("--report-to", help=REPORT_TO_HELP)] = DEFAULTS.report_to,
) -> None:
    """Train CLIP, the VAE, the UNet, CLIP's image side and the judges in fixed work; write standard
    diffusers/transformers folders."""
    from difflab.minisd.build import build

    for name, value, low in (
        ("--clip-steps", clip_steps, 1),
        ("--clip-vision-steps", clip_vision_steps, 1),
        ("--vae-steps", vae_steps, 1),
        ("--unet-steps", unet_steps, 1),
        ("--per-domain", per_domain, 10),
        ("--pairs", pairs, 0),
    ):
        if value < low:
            raise DifflabError(f"{name} = {value}: must be at least {low}")
    if not 0 <= vae_edge_weight <= 100:
        raise DifflabError(f"--vae-edge-weight = {vae_edge_weight}: must be in [0, 100]")
    cfg = BuildConfig(
        out=out,
        n_per_domain=per_domain,
        n_pairs=pairs,
        seed=seed,
        device=device,
        precision=precision,
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
    )
    cfg.train.clip.steps, cfg.train.vae.steps, cfg.train.unet.steps = clip_steps, vae_steps, unet_steps
    cfg.train.clip_vision.steps = clip_vision_steps
    cfg.train.edge_weight = vae_edge_weight
    path = build(cfg)
    typer.echo(f"mini-SD stack: {path} (pipeline {path / 'sd'}, CLIP {path / 'clip'})")


@app.command("pack")
def pack_command(
    stack: Annotated[Path, typer.Argument(help="A finished build (difflab minisd build --out STACK).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for stack.safetensors + stack.json.")] = PREBUILT,
    overwrite: Overwrite = False,
) -> None:
    """Pack a build into one fp16 file + configs: what difflab ships and `personalize demo` unpacks."""
    from difflab.io import open_run
    from difflab.minisd.prebuilt import pack

    with open_run(out, "minisd pack", overwrite=overwrite, staged=True) as run:
        pack(stack, run.dir)
    path = out
    size = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    typer.echo(f"packed {stack} into {path} ({size:.1f} MiB)")
