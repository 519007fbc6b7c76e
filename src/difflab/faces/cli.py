import typer

app = typer.Typer(help="DDIM sampling, eta grids, interpolation, inversion and MSE (face UNet and others).", no_args_is_help=True)
