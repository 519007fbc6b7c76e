import typer

app = typer.Typer(help="Conditional digits (domain x digit) with DDPM/DDIM and classifier-free guidance.", no_args_is_help=True)
