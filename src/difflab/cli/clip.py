"""`difflab clip ...`: zero-shot classification of a labelled image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from difflab.cli.options import App, Device, Overwrite, Seed, checked, precision_option
from difflab.clip.evaluate import TOLERANCE, ZeroShotConfig

app = App(help="CLIP zero-shot classification and image/text scoring.", no_args_is_help=True)
ClipPrecision = precision_option(checked("a batch of image embeddings", TOLERANCE, "fp32 or bf16"))


Images = Annotated[Path, typer.Option("--images", help="Folder of <classid>_<idx>.png files, or of class sub-folders.")]
Model = Annotated[
    Path, typer.Option("--model", help="Local CLIP folder in transformers format (config.json + weights).")
]
Out = Annotated[Path, typer.Option("--out", help="Output folder for predictions, metrics, figures and report.html.")]
Labels = Annotated[
    Optional[Path],
    typer.Option("--labels", help="id2label.json (class id -> class name); required for the flat layout."),
]
Template = Annotated[str, typer.Option("--template", help="Prompt template with one {} for the class name.")]
Templates = Annotated[
    Optional[str],
    typer.Option(
        "--templates",
        help=(
            "'ensemble' for the built-in 18 templates, or a text file with one template per "
            "line (overrides --template)."
        ),
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Images per forward pass.")]
NumWorkers = Annotated[
    int, typer.Option("--num-workers", min=0, max=64, help="DataLoader worker processes decoding images.")
]
CacheDir = Annotated[
    Optional[Path], typer.Option("--cache-dir", help="Where class text embeddings are cached (default: <out>/.cache).")
]
Gallery = Annotated[
    int, typer.Option("--gallery", min=0, max=1000, help="Number of successful and of failed cases to show.")
]
SkipBad = Annotated[
    bool,
    typer.Option("--skip-bad", help="Skip unlabelled or unreadable images (listed in the report) instead of failing."),
]


@app.command("zeroshot")
def zeroshot(
    images: Images = ...,
    model: Model = ...,
    out: Out = ...,
    labels: Labels = None,
    template: Template = ZeroShotConfig.templates,
    templates: Templates = None,
    batch_size: BatchSize = ZeroShotConfig.batch_size,
    num_workers: NumWorkers = ZeroShotConfig.num_workers,
    device: Device = None,
    cache_dir: CacheDir = None,
    gallery: Gallery = ZeroShotConfig.gallery_size,
    skip_bad: SkipBad = False,
    precision: ClipPrecision = ZeroShotConfig.precision,
    seed: Seed = ZeroShotConfig.seed,
    overwrite: Overwrite = False,
):
    """Classify images with CLIP against text prompts of every class; write a report a person can read."""
    from difflab.clip.evaluate import run_zeroshot

    cfg = ZeroShotConfig(
        images=images,
        model=model,
        out=out,
        labels=labels,
        templates=templates or template,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        cache_dir=cache_dir,
        gallery_size=gallery,
        skip_bad=skip_bad,
        precision=precision,
        overwrite=overwrite,
        seed=seed,
    )
    result = run_zeroshot(cfg)
    if result.skipped:
        typer.echo(f"skipped {len(result.skipped)} file(s):")
        for f, reason in result.skipped:
            typer.echo(f"  {f}: {reason}")
    typer.echo(f"top-1 acc = {result.top1:.4f}  top-5 acc = {result.top5:.4f}  ({result.n_images} images)")
    typer.echo(f"report: {result.report}")
