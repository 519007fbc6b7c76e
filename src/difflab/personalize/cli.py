import typer

app = typer.Typer(help="Textual inversion on Stable Diffusion v1.x: train, generate, compose, score.", no_args_is_help=True)

from difflab.personalize.compose import compose_command  # noqa: E402
from difflab.personalize.generate import generate_command  # noqa: E402

app.command("generate")(generate_command)
app.command("compose")(compose_command)
