"""`difflab app`: the local web app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from difflab.cli.options import Device, checked, precision_option
from difflab.digits.sample import SAMPLE_TOLERANCE, SampleConfig

ModelPath = Optional[Path]
DigitsPrecision = precision_option(checked("a guided ε of the digits model", SAMPLE_TOLERANCE))


def app_command(
    digits_model: Annotated[
        ModelPath, typer.Option("--digits-model", help="A `difflab digits train` folder (default: runs/demo/model).")
    ] = None,
    judges: Annotated[
        ModelPath, typer.Option("--judges", help="Digit classifiers (default: classifiers/ beside the model).")
    ] = None,
    sd: Annotated[ModelPath, typer.Option("--sd", help="A diffusers SD folder (default: the mini stack's).")] = None,
    clip: Annotated[ModelPath, typer.Option("--clip", help="A CLIP folder (default: the mini stack's).")] = None,
    embeds: Annotated[
        List[Path],
        typer.Option("--embeds", help="Learned embeddings (default: those `personalize demo` trained); repeatable."),
    ] = [],
    references: Annotated[
        ModelPath, typer.Option("--references", help="<key>/ reference image folders, for the CLIP image score.")
    ] = None,
    port: Annotated[int, typer.Option("--port", min=1024, max=65535, help="Port on 127.0.0.1.")] = 7860,
    precision: DigitsPrecision = SampleConfig.precision,
    device: Device = None,
) -> None:
    """Serve a local web app (127.0.0.1, no share link, no analytics) with a tab per job: digits, DDIM, CLIP
    zero-shot, personalization."""
    from difflab.app import require_gradio

    require_gradio()
    from difflab.app.models import AppConfig
    from difflab.app.ui import serve

    cfg = AppConfig(digits_model, judges, sd, clip, None, list(embeds), references, device, precision)
    serve(cfg, port)
