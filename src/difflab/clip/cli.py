import typer

app = typer.Typer(help="CLIP zero-shot classification and image/text scoring.", no_args_is_help=True)
