"""Options every area shares, written once: device, precision, and the replace-or-continue pair."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from difflab.precision import PRECISION_HELP
from difflab.utils import DifflabError

Device = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
]
Precision = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the results of an earlier run in --out (without it the command refuses to)."
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same result.")]


def parse_floats(text: str, option: str) -> list[float]:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0]; anything else is a one-line error naming the option."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflabError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise DifflabError(f"{option}: no values given")
    return values
