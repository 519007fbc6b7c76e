"""The end-to-end digits job: data -> diffusion training -> classifiers -> samples -> evaluation -> report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from difflab.digits.classifier import (
    FEATURES_FILE,
    ClassifierTrainConfig,
    classifier_path,
    judges_tflop,
    load_classifier,
    train_classifiers,
)
from difflab.digits.data import DOMAINS, load_split, make_dataset
from difflab.digits.evaluate import (
    DOMAIN_NAMES,
    add_quality_section,
    card_metrics,
    evaluate_folder,
    format_quality,
    format_summary,
)
from difflab.digits.model import load_digits_model
from difflab.digits.sample import PER_DIGIT, SampleConfig, course_images, write_course_layout, write_sample_figures
from difflab.digits.train import OPTIMIZERS, TRACKER_PROJECT, TrainConfig, read_losses, train
from difflab.io import load_json, open_run
from difflab.precision import Precision, cpu_name
from difflab.report import HtmlReport
from difflab.report.plots import plot_frontier, plot_loss_curve
from difflab.report.tracking import log_final_metrics
from difflab.utils import Stages, pick_device


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    n_per_domain: int = 10000
    n_test_per_domain: int = 2000
    # Fixed work, so that a seed gives the same model on a machine whatever its speed or load; sized from
    # per-step times on the slower of the two CPUs seen (see README: "What to expect").
    train_steps: int = TrainConfig.steps
    train_minutes: float | None = None  # an explicit wall-clock budget instead (the report then says so)
    classifier_epochs: int = ClassifierTrainConfig.epochs
    judge_pool: int = ClassifierTrainConfig.judge_pool
    sample: SampleConfig = field(default_factory=SampleConfig)
    # 2,000 digits per domain: what the distribution measures need (QualityConfig.min_images); the first 50 of
    # each digit are the course layout's, the same images whatever this number.
    per_digit: int = 4 * PER_DIGIT
    # The report's trade-off curve: digit guidance scales, CURVE_PER_DIGIT digits of each per domain.
    curve_guidance: tuple[float, ...] = (1.0, 2.0, 3.5, 5.5)
    seed: int = 0
    precision: Precision = TrainConfig.precision
    device: str | None = None
    report_to: str = TrainConfig.report_to

    def sample_config(self) -> SampleConfig:
        """The sampler of the demo: its own settings, with the demo's seed and precision."""
        return replace(self.sample, precision=self.precision, seed=self.seed)

    @classmethod
    def quick(cls, out_dir: str) -> "DemoConfig":
        """A two-minute smoke run: small data, a few hundred steps, few sampling steps. Accuracy is not the point."""
        return cls(
            out_dir=out_dir,
            n_per_domain=1000,
            n_test_per_domain=200,
            train_steps=300,
            classifier_epochs=2,
            judge_pool=1000,
            sample=SampleConfig(steps=10),
            per_digit=5,
            curve_guidance=(1.0, 5.5),
        )


def ddim_figures(ckpt: Path, figures: Path, cfg: DemoConfig, guidance: float, report: HtmlReport) -> None:
    """The DDIM exercise on the trained digits model: an η grid and lerp/slerp strips from seeded noises."""
    from difflab.ddim.figures import eta_grid_figure, interpolation_figure
    from difflab.ddim.models import DigitsCondition, load_eps_model
    from difflab.ddim.pipeline import DDIMConfig, draw_noises, eta_grid, interpolate

    condition = DigitsCondition(domain=0, digit=3, guidance=guidance)
    model = load_eps_model(ckpt, cfg.device, cfg.precision, condition=condition)
    ddim = DDIMConfig(steps=cfg.sample.steps, batch_size=64, seed=cfg.seed)
    names = ["00", "01", "02", "03"]
    noises = draw_noises(model, names, cfg.seed, figures / "noise")
    etas = [0.0, 0.25, 0.5, 0.75, 1.0]
    eta_grid_figure(eta_grid(model, noises, etas, ddim, progress=False), names, etas, figures, report)
    alphas = [i / 10 for i in range(11)]
    strips = interpolate(model, noises[:1], noises[1:2], ["lerp", "slerp"], alphas, ddim, progress=False)
    interpolation_figure(strips, alphas, ("00", "01"), figures, report)


CURVE_PER_DIGIT = 50


def guidance_curve(net, schedule, cfg: DemoConfig, device, judges: Path, data_root: Path, out: Path) -> Path:
    """Accuracy against Fréchet distance in the independent features, over digit guidance, per domain; the real
    held-out digits as the reference point (the judge's accuracy on them, and the distance of as many real training
    digits)."""
    from difflab.digits.quality import frechet_distance

    per_digit = min(CURVE_PER_DIGIT, cfg.per_digit)
    features = load_classifier(classifier_path(judges, FEATURES_FILE), device)
    judge = {d: load_classifier(classifier_path(judges, d), device) for d in DOMAINS}
    real = {d: load_split(data_root, d, "val") for d in DOMAINS}
    labels = np.arange(10).repeat(per_digit)
    curves = {DOMAIN_NAMES[d]: [] for d in DOMAINS}
    for g in cfg.curve_guidance:
        images = course_images(net, schedule, replace(cfg.sample_config(), guidance_digit=g), device, per_digit)
        for d in DOMAINS:
            acc = float((judge[d].predict(images[d]) == labels).mean())
            curves[DOMAIN_NAMES[d]].append((frechet_distance(features, images[d], real[d][0]), acc, f"g={g:g}"))
    reference = {}
    for d in DOMAINS:
        train, _ = load_split(data_root, d, "train")
        sample = train[np.random.default_rng(cfg.seed).choice(len(train), len(labels), replace=False)]
        real_acc = float((judge[d].predict(real[d][0]) == real[d][1]).mean())
        reference[DOMAIN_NAMES[d]] = (frechet_distance(features, sample, real[d][0]), real_acc)
    return plot_frontier(
        curves,
        reference,
        out,
        "Fréchet distance to real held-out digits (independent features)",
        "judge accuracy",
        f"Over digit guidance, {len(labels)} digits per domain",
    )


def run_demo(cfg: DemoConfig, overwrite: bool = False) -> Path:
    """The whole job into `cfg.out_dir` (an earlier demo there is replaced only with `overwrite`)."""
    with open_run(cfg.out_dir, "digits demo", overwrite=overwrite):
        return _run_demo(cfg, Path(cfg.out_dir))


def _run_demo(cfg: DemoConfig, out: Path) -> Path:
    stages = Stages()
    data_root, ckpt, judges = out / "data", out / "model", out / "classifiers"
    stages.run("make data", make_dataset, data_root, cfg.n_per_domain, cfg.n_test_per_domain, cfg.seed)
    train_cfg = TrainConfig(
        data_root=str(data_root),
        out_dir=str(ckpt),
        steps=cfg.train_steps,
        max_minutes=cfg.train_minutes,
        seed=cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
        save_every=max(100, cfg.train_steps // 4),
        report_to=cfg.report_to,
    )
    stages.run("train diffusion", train, train_cfg)
    accs = stages.run(
        "train classifiers",
        train_classifiers,
        data_root,
        judges,
        epochs=cfg.classifier_epochs,
        device=cfg.device,
        seed=cfg.seed,
        precision=cfg.precision,
        judge_pool=cfg.judge_pool,
    )
    device = pick_device(cfg.device)
    net, schedule, model_config = load_digits_model(ckpt, device)
    samples, figures = out / "samples", out / "figures"
    sample_cfg = cfg.sample_config().for_model(model_config)
    per_domain = stages.run("sample", write_course_layout, net, schedule, samples, sample_cfg, device, cfg.per_digit)
    result = stages.run("evaluate", evaluate_folder, samples, judges, out / "eval", cfg.device, data_root, False, ckpt)
    metrics = {f"eval/{k}": v for k, v in card_metrics(result).items()}
    log_final_metrics(cfg.report_to, ckpt, TRACKER_PROJECT, metrics, model_config["steps"], cfg.device == "cpu")
    report = HtmlReport("difflab — conditional digits (DDPM + classifier-free guidance)")
    describe_run(report, cfg, model_config, load_json(judges / f"{DOMAINS[0]}.json"))
    add_accuracy(report, result, accs, out / "eval")
    add_quality_section(report, result, out / "eval")
    report.heading("Accuracy against Fréchet distance over guidance")
    frontier = figures / "frontier.png"
    curve = stages.run("guidance curve", guidance_curve, net, schedule, cfg, device, judges, data_root, frontier)
    report.image(
        curve,
        "each point samples the model at one digit guidance scale; a star is the real data: a generator as good as "
        "the data sits on it",
        width=560,
    )
    add_samples(report, net, schedule, per_domain, sample_cfg, device, cfg.per_digit, figures)
    report.heading("DDIM on the digits model")
    stages.run("ddim figures", ddim_figures, ckpt, figures, cfg, sample_cfg.guidance_digit, report)
    report.heading("Training loss")
    steps, losses = read_losses(ckpt)
    report.image(
        plot_loss_curve(steps, losses, figures / "loss.png", log=True), "per-step loss, averaged over 20 steps"
    )
    report.heading("Timings (seconds, wall clock)")
    report.table(["stage", "seconds"], list(stages.seconds.items()))
    path = report.save(out / "report.html")
    print(format_summary(result))
    print(format_quality(result))
    print(f"training compute: {model_config['training_tflop']:.1f} TFLOP ({model_config['steps']} steps)")
    print(f"judges' compute (the instrument, not counted above): {judges_tflop(judges):.1f} TFLOP")
    print(f"report: {path.resolve()}")
    return path


def describe_run(report: HtmlReport, cfg: DemoConfig, model_config: dict, judge_meta: dict) -> None:
    work = (
        f"a wall-clock budget of {cfg.train_minutes} min (--train-minutes): the step count followed this "
        f"machine's speed, so another machine trains another model"
        if cfg.train_minutes is not None
        else "fixed work (same seed, same model on this machine whatever its load)"
    )
    report.text(
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads. Diffusion training: "
        f"{model_config['steps']} {OPTIMIZERS[model_config.get('train', {}).get('optimizer', 'adamw')]} steps "
        f"({model_config.get('training_tflop', '?')} TFLOP by torch's FLOP counter), "
        f"{work}; precision {model_config.get('precision', '?')}. "
        f"Judges: precision {judge_meta.get('precision', '?')}."
    )
    sampler = {k: v for k, v in asdict(cfg.sample_config().for_model(model_config)).items() if k != "precision"}
    report.settings("network", model_config["net"]).settings("noise schedule", model_config["schedule"])
    report.settings("sampler", sampler)


def add_accuracy(report: HtmlReport, result: dict, accs: dict, eval_dir: Path) -> None:
    report.heading("Accuracy of the per-domain classifiers on generated digits")
    report.pre(format_summary(result))
    report.table(
        ["domain", "classifier held-out accuracy", "accuracy on generated digits"],
        [[d, accs[d], result["domains"][d]["accuracy"]] for d in DOMAINS],
    )
    report.table(
        ["digit"] + list(DOMAINS),
        [[k] + [result["domains"][d]["per_digit"][str(k)] for d in DOMAINS] for k in range(10)],
    )
    for d in DOMAINS:
        report.image(str(eval_dir / result["domains"][d]["confusion_png"]), f"confusion matrix, {d}", width=360)


def add_samples(
    report: HtmlReport, net, schedule, per_domain: dict, sample_cfg: SampleConfig, device, per_digit: int, figures: Path
) -> None:
    grids, strip, strip_ts = write_sample_figures(net, schedule, per_domain, sample_cfg, device, per_digit, figures)
    report.heading("Samples: rows are digits 0-9, columns different noises")
    for domain, grid in grids.items():
        report.image(grid, domain, width=360)
    report.heading("Reverse process of the first 0 of each domain")
    caption = "t = " + ", ".join(map(str, strip_ts)) + " (rows: " + ", ".join(DOMAINS) + ")"
    report.image(strip, caption, width=480)


def quick_or_full(out_dir: str, quick: bool, **overrides) -> DemoConfig:
    cfg = DemoConfig.quick(out_dir) if quick else DemoConfig(out_dir=out_dir)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
