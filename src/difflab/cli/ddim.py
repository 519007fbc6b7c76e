"""`difflab ddim ...`: fixed-noise DDIM sampling, figures, inversion and the HW2 MSE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from difflab.cli.options import (
    MAX_BATCH,
    MAX_GUIDANCE,
    REFERENCE_HELP,
    SEED_MAX,
    App,
    Device,
    Overwrite,
    parse_floats,
    precision_option,
)
from difflab.ddim.pipeline import DDIMConfig
from difflab.digits.sample import SampleConfig
from difflab.io import open_run, refuse_existing_file
from difflab.utils import DifflabError

app = App(
    help="DDIM sampling, eta grids, interpolation, inversion and MSE (face UNet and others).", no_args_is_help=True
)
EpsPrecision = precision_option(f"{REFERENCE_HELP} (`difflab ddim precision-check` measures how far)")

ALPHAS = tuple(i / 10 for i in range(11))  # the course's interpolation strip; one batch denoises it whole
# Options several commands share: written once, defaults from DDIMConfig.
Ckpt = Annotated[
    Path,
    typer.Option(
        "--ckpt",
        help="Face UNet state dict (UNet.pt / .safetensors), a diffusers "
        "UNet2DModel folder, or a difflab digits checkpoint folder.",
    ),
]
NoiseDir = Annotated[
    Optional[Path],
    typer.Option(
        "--noise-dir",
        help="Folder of noise tensors 00.pt, 01.pt, ... "
        "(1,C,H,W) or (C,H,W); without it noises are drawn from --noise-seed.",
    ),
]
NoiseSeed = Annotated[
    int,
    typer.Option(
        "--noise-seed",
        min=0,
        max=SEED_MAX,
        help="Seed of the noises drawn when no noise files are given (saved under <out>/noise/ for reuse).",
    ),
]
Size = Annotated[
    Optional[int],
    typer.Option(
        "--size",
        min=8,
        max=4096,
        help="Image size of drawn noises for nets that do not carry one (default 256, the face UNet's).",
    ),
]
Steps = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Number of DDIM steps (50: 981, 961, ..., 1).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Noises denoised together.")]
StepSeed = Annotated[
    int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the fresh per-step noise when η > 0.")
]
Domain = Annotated[Optional[str], typer.Option("--domain", help="Digits checkpoints: mnistm, svhn or a domain index.")]
Digit = Annotated[Optional[int], typer.Option("--digit", min=0, max=9, help="Digits checkpoints: the digit to draw.")]
Guidance = Annotated[
    Optional[float],
    typer.Option(
        "--guidance",
        min=0.0,
        max=MAX_GUIDANCE,
        help="Digits checkpoints: classifier-free guidance scale of the digit (default: the checkpoint's own, as "
        "`digits sample`).",
    ),
]


def _eps_model(ckpt: Path, device, precision, condition=None):
    from difflab.ddim.models import load_eps_model

    if precision.name in ("bf16", "fp16"):
        typer.echo(f"note: {precision} results may drift from an fp32 reference (see `difflab ddim precision-check`)",
                   err=True)  # fmt: skip
    return load_eps_model(ckpt, device, precision, condition=condition)


def _digits_condition(domain: Optional[str], digit: Optional[int], guidance: Optional[float]):
    from difflab.ddim.models import DigitsCondition
    from difflab.digits.data import DOMAINS

    if domain is None and digit is None:
        return None
    if domain is None or digit is None:
        raise DifflabError("--domain and --digit go together (conditional digits checkpoints only)")
    if domain.isdigit():
        index = int(domain)
    elif domain.lower() in DOMAINS:
        index = DOMAINS.index(domain.lower())
    else:
        raise DifflabError(f"--domain: {domain!r} is not one of {', '.join(DOMAINS)} or an index")
    return DigitsCondition(domain=index, digit=digit, guidance=guidance)


@app.command("sample")
def sample_cmd(
    noise_dir: NoiseDir = None,
    noise_seed: NoiseSeed = 0,
    num_noises: int = typer.Option(
        10, "--num-noises", min=1, max=10_000, help="How many noises to draw without --noise-dir."
    ),
    size: Size = None,
    ckpt: Ckpt = ...,
    out: Path = typer.Option(..., "--out", help="Output folder; writes <stem>.png per noise file."),
    eta: float = typer.Option(
        DDIMConfig.eta, "--eta", min=0.0, max=1.0, help="DDIM η: 0 is deterministic, 1 is DDPM-like."
    ),
    steps: Steps = DDIMConfig.steps,
    batch_size: BatchSize = DDIMConfig.batch_size,
    device: Device = None,
    precision: EpsPrecision = "auto",
    seed: StepSeed = DDIMConfig.seed,
    domain: Domain = None,
    digit: Digit = None,
    guidance: Guidance = SampleConfig.guidance_digit,
    overwrite: Overwrite = False,
):
    """Denoise every noise file (or seeded noises) with DDIM and write one PNG per noise (same stem), min-max
    normalised per image."""
    from difflab.ddim.pipeline import sample_noise_folder, sample_seeded

    model = _eps_model(ckpt, device, precision, _digits_condition(domain, digit, guidance))
    config = DDIMConfig(steps=steps, eta=eta, batch_size=batch_size, seed=seed)
    with open_run(out, "ddim sample", overwrite=overwrite, staged=True) as run:
        if noise_dir is None:
            paths = sample_seeded(model, num_noises, noise_seed, run.dir, config, size)
        else:
            paths = sample_noise_folder(model, noise_dir, run.dir, config)
    typer.echo(f"wrote {len(paths)} image(s) to {out}")


@app.command("eta-grid")
def eta_grid_cmd(
    noise_dir: NoiseDir = None,
    noise_seed: NoiseSeed = 0,
    size: Size = None,
    ckpt: Ckpt = ...,
    out: Path = typer.Option(..., "--out", help="Output folder for eta_grid.png and eta_grid.html."),
    noises: str = typer.Option("00,01,02,03", "--noises", help="Comma-separated noise file stems, one grid row each."),
    etas: str = typer.Option("0,0.25,0.5,0.75,1", "--etas", help="Comma-separated η values, one grid column each."),
    steps: Steps = DDIMConfig.steps,
    batch_size: BatchSize = DDIMConfig.batch_size,
    device: Device = None,
    precision: EpsPrecision = "auto",
    seed: StepSeed = DDIMConfig.seed,
    domain: Domain = None,
    digit: Digit = None,
    guidance: Guidance = SampleConfig.guidance_digit,
    overwrite: Overwrite = False,
):
    """Figure: the same noises sampled with several η values (rows = noises, columns = η)."""
    from difflab.ddim.figures import eta_grid_figure
    from difflab.ddim.noise import load_noises
    from difflab.ddim.pipeline import draw_noises, eta_grid
    from difflab.report import HtmlReport

    names = [n.strip() for n in noises.split(",") if n.strip()]
    eta_values = parse_floats(etas, "--etas", 0.0, 1.0)
    model = _eps_model(ckpt, device, precision, _digits_condition(domain, digit, guidance))
    with open_run(out, "ddim eta-grid", overwrite=overwrite, staged=True) as run:
        if noise_dir is None:
            x = draw_noises(model, names, noise_seed, run.dir / "noise", size)
        else:
            x = load_noises([noise_dir / f"{n}.pt" for n in names])
        images = eta_grid(model, x, eta_values, DDIMConfig(steps=steps, batch_size=batch_size, seed=seed))
        report = HtmlReport("DDIM η grid")
        eta_grid_figure(images, names, eta_values, run.dir, report)
        report.save(run.dir / "eta_grid.html")
    typer.echo(f"wrote {out / 'eta_grid.png'} and {out / 'eta_grid.html'}")


@app.command("interpolate")
def interpolate_cmd(
    a: Optional[Path] = typer.Option(
        None,
        "--a",
        help="First noise file (α = 0), e.g. 00.pt; without --a/--b two noises are drawn from --noise-seed.",
    ),
    b: Optional[Path] = typer.Option(None, "--b", help="Second noise file (α = 1), e.g. 01.pt."),
    noise_seed: NoiseSeed = 0,
    size: Size = None,
    ckpt: Ckpt = ...,
    out: Path = typer.Option(..., "--out", help="Output folder for interp_<method>.png and interpolation.html."),
    method: str = typer.Option("both", "--method", help="lerp, slerp or both."),
    alphas: str = typer.Option(",".join(map(str, ALPHAS)), "--alphas", help="Comma-separated α values in [0, 1]."),
    steps: Steps = DDIMConfig.steps,
    batch_size: BatchSize = len(ALPHAS),
    device: Device = None,
    precision: EpsPrecision = "auto",
    domain: Domain = None,
    digit: Digit = None,
    guidance: Guidance = SampleConfig.guidance_digit,
    overwrite: Overwrite = False,
):
    """Figure: η = 0 images of noises interpolated between two files, by lerp and/or slerp."""
    from difflab.ddim.figures import interpolation_figure
    from difflab.ddim.noise import load_noise
    from difflab.ddim.pipeline import draw_noises, interpolate
    from difflab.report import HtmlReport

    if method not in ("lerp", "slerp", "both"):
        raise DifflabError(f"--method: {method!r} is not lerp, slerp or both")
    if (a is None) != (b is None):
        raise DifflabError("--a and --b go together (or leave both out to draw two noises from --noise-seed)")
    methods = ["lerp", "slerp"] if method == "both" else [method]
    alpha_values = parse_floats(alphas, "--alphas", 0.0, 1.0)
    model = _eps_model(ckpt, device, precision, _digits_condition(domain, digit, guidance))
    with open_run(out, "ddim interpolate", overwrite=overwrite, staged=True) as run:
        if a is None:
            x0, x1 = draw_noises(model, ["00", "01"], noise_seed, run.dir / "noise", size).split(1)
            names = ("00", "01")
        else:
            x0, x1 = load_noise(a), load_noise(b)
            names = (a.stem, b.stem)
            if x0.shape != x1.shape:
                raise DifflabError(f"{b}: shape {tuple(x1.shape)} differs from {a}'s {tuple(x0.shape)}")
        strips = interpolate(model, x0, x1, methods, alpha_values, DDIMConfig(batch_size=batch_size, steps=steps))
        report = HtmlReport("DDIM noise interpolation")
        paths = interpolation_figure(strips, alpha_values, names, run.dir, report)
        report.save(run.dir / "interpolation.html")
    typer.echo(f"wrote {', '.join(str(out / p.name) for p in paths)} and {out / 'interpolation.html'}")


@app.command("mse")
def mse_cmd(
    pred: Path = typer.Option(..., "--pred", help="Folder of generated NN.png images."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth NN.png images (same names)."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write per-image and mean MSE to this JSON file."
    ),
    overwrite: Overwrite = False,
):
    """Per-image MSE over 0-255 RGB values and their mean (the HW2 grading); fails when names differ."""
    from difflab.ddim.metrics import mse_folders
    from difflab.io import save_json

    if json_out is not None:
        refuse_existing_file(json_out, overwrite, "--json")
    result = mse_folders(pred, gt)
    for name, value in result.per_image.items():
        typer.echo(f"{name}\t{value:.4f}")
    typer.echo(f"mean MSE = {result.mean:.4f} over {len(result.per_image)} image(s)")
    if json_out is not None:
        save_json({"per_image": result.per_image, "mean": result.mean}, json_out)


@app.command("invert")
def invert_cmd(
    image: Path = typer.Option(..., "--image", help="RGB image to invert (size divisible by 32 for the face UNet)."),
    ckpt: Ckpt = ...,
    out: Path = typer.Option(..., "--out", help="Where to write the recovered noise tensor (.pt, shape (1,C,H,W))."),
    steps: Steps = DDIMConfig.steps,
    device: Device = None,
    precision: EpsPrecision = "auto",
    overwrite: Overwrite = False,
):
    """DDIM inversion: find the x_T that η = 0 DDIM turns back into the image; reports the reconstruction MSE."""
    from difflab.ddim.pipeline import invert_image

    refuse_existing_file(out, overwrite)
    model = _eps_model(ckpt, device, precision)
    result = invert_image(model, image, out, DDIMConfig(steps=steps))
    typer.echo(
        f"wrote {out}; reconstruction MSE = {result.mse:.4f} "
        f"(as `ddim sample` writes it, min-max normalised: {result.mse_minmax:.4f})"
    )


@app.command("precision-check")
def precision_check_cmd(
    noise_dir: Path = typer.Option(..., "--noise-dir", help="Folder of noise tensors."),
    ckpt: Ckpt = ...,
    precision: str = typer.Option(
        "bf16", "--precision", help="The low precision to check against fp32: bf16, or fp16 on CUDA."
    ),
    limit: int = typer.Option(4, "--limit", min=1, help="Use the first N noise files."),
    steps: Steps = DDIMConfig.steps,
    batch_size: BatchSize = DDIMConfig.batch_size,
    device: Device = None,
    threshold: float = typer.Option(
        1.0, "--threshold", min=0.0, help="Largest acceptable per-image MSE (0-255 scale)."
    ),
):
    """Check that η = 0 images under autocast stay within MSE `threshold` of float32; exit 1 when not."""
    from difflab.ddim.models import load_eps_model
    from difflab.ddim.noise import list_noise_files, load_noises
    from difflab.ddim.pipeline import precision_mse

    files = list_noise_files(noise_dir)[:limit]
    reference = load_eps_model(ckpt, device, "fp32")
    low = load_eps_model(ckpt, device, precision)
    mses = precision_mse(reference, low, load_noises(files), DDIMConfig(steps=steps, batch_size=batch_size))
    for f, v in zip(files, mses):
        typer.echo(f"{f.stem}\t{v:.4f}")
    if max(mses) > threshold:
        raise DifflabError(f"{precision} autocast drifts from fp32: max per-image MSE {max(mses):.4f} > {threshold}")
    typer.echo(f"{precision} autocast OK: max per-image MSE vs fp32 = {max(mses):.4f} <= {threshold}")


@app.command("export-diffusers")
def export_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="Face UNet state dict (UNet.pt / .safetensors)."),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write the diffusers UNet2DModel into (config.json + weights)."
    ),
    overwrite: Overwrite = False,
):
    """Convert a face UNet checkpoint to a diffusers UNet2DModel folder (the same network, renamed)."""
    from difflab.ddim.models import load_face_unet
    from difflab.nets.face_unet import to_diffusers

    unet = to_diffusers(load_face_unet(ckpt))
    with open_run(out, "ddim export-diffusers", overwrite=overwrite, staged=True) as run:
        unet.save_pretrained(run.dir)
    typer.echo(f"wrote {out}")
