"""The `difflab` command line. Each area has its own sub-app; the commands parse their options and call the
Python API.

Heavy libraries (diffusers, transformers) are imported inside commands so that `--help` stays instant.
"""

from __future__ import annotations

import errno
import sys

import typer

from difflab.cli.app import app_command
from difflab.cli.clip import app as clip_app
from difflab.cli.ddim import app as ddim_app
from difflab.cli.digits import app as digits_app
from difflab.cli.minisd import app as minisd_app
from difflab.cli.personalize import app as personalize_app
from difflab.utils import DifflabError

app = typer.Typer(
    name="difflab",
    help="Train, sample, evaluate and personalize diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from difflab import __version__

        typer.echo(f"difflab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, sample, evaluate and personalize diffusion models."""


app.add_typer(digits_app, name="digits")
app.add_typer(ddim_app, name="ddim")
app.add_typer(clip_app, name="clip")
app.add_typer(personalize_app, name="personalize")
app.add_typer(minisd_app, name="minisd")
app.command("app")(app_command)


def os_error_message(e: OSError) -> str:
    """One line for a file-system failure nothing more specific caught: a full disk, a read-only place."""
    where = e.filename or "the output folder"
    if e.errno == errno.ENOSPC:
        return f"no space left on {where}; free some space or choose another --out"
    return f"{where}: {e.strerror or e.__class__.__name__}"


def close_progress_bars() -> None:
    """Close the progress bars still drawn, so that what is printed next starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def fail(message: str, code: int) -> None:
    close_progress_bars()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: user errors become one line on stderr, the last one, and their exit status (1, 130 when
    stopped)."""
    try:
        app()
    except DifflabError as e:
        fail(str(e), e.exit_code)
    except OSError as e:
        fail(os_error_message(e), 1)


if __name__ == "__main__":
    main()
