"""The end-to-end digits job: data -> diffusion training -> classifiers -> samples -> evaluation -> report."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflab.digits.classifier import TrainConfig as ClassifierTrainConfig, train_classifiers  # noqa: E402
from difflab.digits.data import DOMAINS, make_dataset  # noqa: E402
from difflab.digits.model import load_digits_model  # noqa: E402
from difflab.digits.sample import SampleConfig, digit_grid, reverse_process_strip, write_course_layout  # noqa: E402
from difflab.digits.train import TrainConfig, train  # noqa: E402
from difflab.report import HtmlReport  # noqa: E402
from difflab.utils import load_json, pick_device, save_png  # noqa: E402


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    n_per_domain: int = 10000
    n_test_per_domain: int = 2000
    train_steps: int = 20000
    # The rest of `make demo` (install, data, classifiers, sampling) takes about 3.5 minutes here, so 15
    # minutes of training keep it under 20. Measured mean accuracy at T = 1000 in 9 minutes (digit guidance
    # 3 / 5): batch 128 + plain loss 0.34; batch 64 + min-SNR(5) 0.59 / 0.70; batch 32 + min-SNR(5) - / 0.785.
    # T = 500 and the narrower CPU preset: 0.988 in 13 minutes, 0.995 in 15. More, smaller steps win.
    train_minutes: float = 15.0
    train_batch_size: int = TrainConfig.batch_size
    min_snr_gamma: float | None = TrainConfig.min_snr_gamma
    classifier_epochs: int = ClassifierTrainConfig.epochs
    sample: SampleConfig = None  # type: ignore[assignment]
    per_digit: int = 50
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.sample is None:
            self.sample = SampleConfig(steps=25)

    @classmethod
    def quick(cls, out_dir: str) -> "DemoConfig":
        """A two-minute smoke run: small data, a few hundred steps, few sampling steps. Accuracy is not the point."""
        return cls(out_dir=out_dir, n_per_domain=1000, n_test_per_domain=200, train_steps=150, train_minutes=1.0,
                   classifier_epochs=2, sample=SampleConfig(steps=10), per_digit=5)


def plot_losses(losses_json: Path, out_png: Path) -> Path:
    data = load_json(losses_json)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(data["steps"], data["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("ε-MSE loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def run_demo(cfg: DemoConfig) -> Path:
    from difflab.digits.evaluate import evaluate_folder, format_summary

    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {timings[name]:.1f} s", flush=True)
        return result

    data_root = out / "data"
    if not (data_root / "digits" / DOMAINS[-1] / "train.csv").is_file():
        timed("make data", make_dataset, data_root, cfg.n_per_domain, cfg.n_test_per_domain, cfg.seed)
    ckpt = out / "model"
    train_cfg = TrainConfig(data_root=str(data_root), out_dir=str(ckpt), steps=cfg.train_steps,
                            max_minutes=cfg.train_minutes, seed=cfg.seed, device=cfg.device,
                            batch_size=cfg.train_batch_size, min_snr_gamma=cfg.min_snr_gamma,
                            save_every=max(100, cfg.train_steps // 4))
    timed("train diffusion", train, train_cfg)
    accs = timed("train classifiers", train_classifiers, data_root, out / "classifiers",
                 epochs=cfg.classifier_epochs, device=cfg.device, seed=cfg.seed)

    device = pick_device(cfg.device)
    net, schedule, model_config = load_digits_model(ckpt, device)
    samples = out / "samples"
    per_domain = timed("sample", write_course_layout, net, schedule, samples, cfg.sample, device, cfg.per_digit)
    figures = out / "figures"
    for domain, images in per_domain.items():
        save_png(digit_grid(images, cfg.per_digit, columns=min(10, cfg.per_digit)), figures / f"grid_{domain}.png")
    strip, strip_ts = reverse_process_strip(net, schedule, cfg.sample, device, per_digit=cfg.per_digit)
    save_png(strip, figures / "reverse_process.png")
    plot_losses(ckpt / "losses.json", figures / "loss.png")
    result = timed("evaluate", evaluate_folder, samples, out / "classifiers", out / "eval")

    report = HtmlReport("difflab — conditional digits (DDPM + classifier-free guidance)")
    report.text(f"Model: {ckpt} ({model_config['steps']} training steps, net {json.dumps(model_config['net'])}). "
                f"Sampler: {json.dumps(asdict(cfg.sample))}.")
    report.heading("Accuracy of the per-domain classifiers on generated digits")
    summary = format_summary(result)
    report.pre(summary)
    report.table(["domain", "classifier held-out accuracy", "accuracy on generated digits"],
                 [[d, accs[d], result["domains"][d]["accuracy"]] for d in DOMAINS])
    report.table(["digit"] + list(DOMAINS),
                 [[k] + [result["domains"][d]["per_digit"][str(k)] for d in DOMAINS] for k in range(10)])
    for d in DOMAINS:
        report.image(out / "eval" / f"confusion_{d}.png", f"confusion matrix, {d}", width=360)
    report.heading("Samples: rows are digits 0-9, columns different noises")
    for d in DOMAINS:
        report.image(figures / f"grid_{d}.png", d, width=360)
    report.heading("Reverse process of the first 0 of each domain")
    report.image(figures / "reverse_process.png", "t = " + ", ".join(map(str, strip_ts)) + " (rows: "
                 + ", ".join(DOMAINS) + ")", width=480)
    report.heading("Training loss")
    report.image(figures / "loss.png", "EMA-free per-step loss, averaged over 20 steps")
    report.heading("Timings (seconds)")
    report.table(["stage", "seconds"], list(timings.items()))
    path = report.save(out / "report.html")
    print(summary)
    print(f"report: {path.resolve()}")
    return path


def quick_or_full(out_dir: str, quick: bool, **overrides) -> DemoConfig:
    cfg = DemoConfig.quick(out_dir) if quick else DemoConfig(out_dir=out_dir)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
