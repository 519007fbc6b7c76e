"""Options every area shares, written once (device, precision, seed, the replace-or-continue pair), and the
sub-app class that checks every number before a command runs."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Annotated, Optional

import typer

from difflab.precision import Precision, precision_help
from difflab.utils import DifflabError

Device = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
]


def _precision(value: str | Precision) -> Precision:
    try:
        return Precision.parse(value)
    except DifflabError as e:
        raise typer.BadParameter(str(e)) from None


def precision_option(auto: str):
    """The --precision option of one command; `auto` says what "auto" does on a CPU there."""
    return Annotated[
        Precision,
        typer.Option(
            "--precision",
            parser=_precision,
            help=precision_help(auto),
            metavar="[auto|fp32|bf16|fp16]",
            show_default=True,
        ),
    ]


def checked(what: str, tolerance: float, formats: str = "fp32 or bf16, contiguous or channels-last") -> str:
    """What "auto" does for a job that may run in a lower precision: the words of its --help."""
    return (
        f"the fastest of {formats} whose output on {what} stays within {tolerance:.0%} of fp32's, timed on a CPU and "
        f"cached; on CUDA bf16 when within it"
    )


# For a job whose output a user checks against a computation made elsewhere (`difflab.precision.REFERENCE`).
REFERENCE_HELP = (
    "fp32 on every device, untimed: the result is checked against references computed in fp32; "
    "bf16 runs faster but may drift from them"
)
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the results of an earlier run in --out (without it the command refuses to)."
    ),
]
SEED_MAX = 2**63 - 1  # what torch's generators take
# One range per kind of number in every command: a batch beyond this does not fit a 24 GiB machine's memory with
# any difflab net, and guidance beyond this only saturates the images.
MAX_BATCH = 4096
MAX_GUIDANCE = 100.0
Seed = Annotated[
    int,
    typer.Option(
        "--seed", min=0, max=SEED_MAX, help="Seed of every random draw of the command: the same seed, the same result."
    ),
]


def parse_floats(text: str, option: str, low: float | None = None, high: float | None = None) -> list[float]:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0], each finite and within [low, high]; anything else is a one-line error
    naming the option."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflabError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise DifflabError(f"{option}: no values given")
    for v in values:
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = f" in [{low}, {high}]" if low is not None and high is not None else ""
            raise DifflabError(f"{option}: {v} is not a finite number{span}")
    return values


def _option_name(param: inspect.Parameter) -> str:
    """How the user spells a parameter: its first --option declaration, else --its-name."""
    found = [param.default] + list(getattr(param.annotation, "__metadata__", ()))
    for info in found:
        decls = [d for d in getattr(info, "param_decls", None) or () if d.startswith("--")]
        if decls:
            return decls[0]
    return "--" + param.name.replace("_", "-")


class App(typer.Typer):
    """A typer app whose commands refuse NaN and infinite floats in any option before they run: typer's float
    type accepts "nan" and "inf", which would only make garbage (all-black images) further down."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            names = {p.name: _option_name(p) for p in inspect.signature(fn).parameters.values()}

            @functools.wraps(fn)
            def checked(**values):
                for name, value in values.items():
                    if isinstance(value, float) and not math.isfinite(value):
                        raise DifflabError(f"{names[name]}: {value} is not a finite number")
                return fn(**values)

            register(checked)
            return fn

        return decorator
