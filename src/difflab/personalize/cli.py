import typer

app = typer.Typer(help="Textual inversion on Stable Diffusion v1.x: train, generate, compose, score.", no_args_is_help=True)
