"""Per-domain digit classifiers: the judge that scores generated digits, like the course graders.

One small CNN per domain (three conv stages with BatchNorm, inputs normalised with mean 0.5 and
std 0.5 as the course judge does), trained with AdamW, a one-cycle schedule and optional light augmentation.
Saved as `<dir>/<domain>.safetensors` + `<dir>/<domain>.json`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from difflab.digits.data import DOMAINS, JUDGE_MNIST, SPLITS, dataset_info, generate_split, load_split, split_csv
from difflab.io import (
    atomic_write,
    check_state_dict,
    load_json,
    open_run,
    read_safetensors,
    save_json,
    write_model_card,
)
from difflab.precision import Precision, cpu_name, settle_training
from difflab.report.tracking import accelerator_kwargs, tracked
from difflab.utils import DifflabError, count_flops, pick_device, seed_everything

FORMAT = "difflab-digit-classifier"


@dataclass
class ClassifierConfig:
    domain: str
    width: int = 32  # channels of the first stage; doubled at each of the next two
    num_classes: int = 10
    mean: float = 0.5
    std: float = 0.5
    # "vgg": the judges' BatchNorm + max-pooling stack, features of 36 x width. "gap": the independent feature
    # network, another architecture (GroupNorm, GELU, strided convolutions, global average pooling, 4 x width).
    arch: str = "vgg"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")


@dataclass
class ClassifierTrainConfig:
    # Passes over the judges' training images. How their settings were chosen, with the measurements: docs,
    # "Judges and quality measures".
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    precision: Precision = Precision("auto")
    augment: bool = True
    # Largest sigma (pixels) of a random Gaussian blur per training image, 0: none. A style judge trained on
    # sharp images alone reads sharpness as style and calls any softly rendered digit SVHN-like.
    blur: float = 0.0
    val_fraction: float = 0.1  # held out from train.csv when the data has no val.csv
    # On difflab's embedded dataset the judges and the feature network train on their own pool instead of train.csv
    # (`data.generate_split(..., "judge")`), so that the training digits, the floor of every quality measure, are
    # as unseen by them as the held-out and the generated ones. MNIST-M-style: this many, drawn from the full MNIST's
    # digits that are neither held-out nor training source digits; SVHN-style: as many as train.csv. 0: train.csv.
    judge_pool: int = 50000


# Every judges folder of this format has the independent feature network and the CAS references beside the judges.
JUDGES_VERSION = 2
FEATURES_FILE = "features"  # <judges>/features.safetensors: the independent feature network
CAS_IMAGES = 2000  # per domain: the classification accuracy score trains on this many images, generated or real
CAS_EPOCHS = 20
FEATURE_NET = {"arch": "gap", "width": 32, "epochs": 4, "per_domain": 10000}  # seed + 1


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _conv_gn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2), nn.GroupNorm(8, c_out), nn.GELU())


def vgg_features(c: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn(3, c),
        nn.MaxPool2d(2),  # 14x14
        _conv_bn(c, 2 * c),
        nn.MaxPool2d(2),  # 7x7
        _conv_bn(2 * c, 4 * c),
        _conv_bn(4 * c, 4 * c),
        nn.MaxPool2d(2),  # 3x3
    )


def gap_features(c: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_gn(3, c, kernel=5),
        _conv_gn(c, 2 * c, stride=2),  # 14x14
        _conv_gn(2 * c, 2 * c),
        _conv_gn(2 * c, 4 * c, stride=2),  # 7x7
        _conv_gn(4 * c, 4 * c),
        nn.AdaptiveAvgPool2d(1),
    )


ARCHS = {"vgg": (vgg_features, 36), "gap": (gap_features, 4)}  # builder, features per unit of width


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        build, per_width = ARCHS[config.arch]
        self.num_features = per_width * config.width
        self.features = build(config.width)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(self.num_features, config.num_classes))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,28,28,3) -> normalised float (B,3,28,28) on the model's device."""
        x = images.to(self.head[-1].weight.device).permute(0, 3, 1, 2).float() / 255
        return (x - self.config.mean) / self.config.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.inference_mode()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Digit predicted for every uint8 (N,28,28,3) image, as an int64 array."""
        self.eval()
        images = torch.as_tensor(images)
        out = [
            self(self.preprocess(images[i : i + batch_size])).argmax(1).cpu() for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Penultimate-layer features (what the linear head sees) of uint8 (N,28,28,3) images, float64 (N, D)."""
        self.eval()
        images = torch.as_tensor(images)
        out = [
            self.features(self.preprocess(images[i : i + batch_size])).flatten(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).double().numpy()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shift/scale/rotation, brightness/contrast jitter and channel order, per sample."""
    b = len(x)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=generator)  # noqa: E731
    angle, scale = r(-0.15, 0.15), r(0.92, 1.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, r(-0.14, 0.14)], 1), torch.stack([sin, cos, r(-0.14, 0.14)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid.to(x.device), padding_mode="border", align_corners=False)
    perm = torch.argsort(torch.rand(b, 3, generator=generator), dim=1).to(x.device)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    contrast, brightness = r(0.7, 1.3).to(x.device), r(-0.25, 0.25).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]


def random_blur(x: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Each image blurred by a Gaussian of sigma uniform in [0, max_sigma] (separable, edges replicated)."""
    b, c, h, w = x.shape
    sigma = (max_sigma * torch.rand(b, generator=generator)).clamp_min(1e-3)
    radius = max(1, math.ceil(3 * max_sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x)  # (b * c, taps)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=b * c), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((model.predict(images) == labels).mean())


# "auto" may train a judge in a lower precision whose gradient of one step is this close to fp32's (relative error).
# At initialisation a cross-entropy gradient is mostly cancellation, which bf16 rounds coarsely: the tolerance
# is set from judges trained both ways, which read the real held-out digits alike (README, Precision).
JUDGE_TOLERANCE = 0.15
LOG_EVERY = 20  # steps between the loss, learning rate, gradient norm and step time sent to `log`


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    domain: str,
    train_config: ClassifierTrainConfig | None = None,
    width: int = ClassifierConfig.width,
    device: str | torch.device | None = None,
    seed: int = 0,
    precision: Precision | None = None,
    num_classes: int = ClassifierConfig.num_classes,
    log: Callable[[dict, int], None] | None = None,
    arch: str = ClassifierConfig.arch,
) -> DigitClassifier:
    """Train one classifier on uint8 (N,28,28,3) images and int labels (0 .. num_classes-1: digits, or domains for
    a style judge); returns it in eval mode. `precision` defaults to resolving `train_config.precision` here."""
    tc = train_config or ClassifierTrainConfig()
    device = pick_device(device) if not isinstance(device, torch.device) else device
    precision = precision or classifier_precision(tc, width, device, arch)
    gen = seed_everything(seed)
    model = precision.prepare(DigitClassifier(ClassifierConfig(domain, width, num_classes, arch=arch)).to(device))
    # The whole uint8 set is small (the MNIST-M judge's 50,000 images: 118 MB): keep it on the device, index there.
    images = torch.as_tensor(train_images).to(device)
    labels = torch.as_tensor(train_labels, dtype=torch.long).to(device)
    steps_per_epoch = max(1, math.ceil(len(images) / tc.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tc.lr, total_steps=tc.epochs * steps_per_epoch, pct_start=0.2
    )
    model.train()
    bar = tqdm(total=tc.epochs * steps_per_epoch, desc=f"classifier {domain}", unit="step", leave=False)
    tick = time.perf_counter()
    for _ in range(tc.epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * tc.batch_size : (i + 1) * tc.batch_size]
            x = model.preprocess(images[idx])
            if tc.augment:
                x = augment(x, gen)
            if tc.blur > 0:
                x = random_blur(x, tc.blur, gen)
            with precision.autocast(device):
                x = precision.input(x)
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            logging = bar.n + 1 == bar.total or (bar.n + 1) % LOG_EVERY == 0  # a read synchronises with the device
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf) if logging and log else None
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            bar.update()
            if logging:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if log is not None:
                    seconds, tick = time.perf_counter() - tick, time.perf_counter()
                    done = bar.n % LOG_EVERY or LOG_EVERY
                    values = {
                        "loss": loss.item(),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "step_time_s": seconds / done,
                    }
                    log({f"{domain}/{k}": v for k, v in values.items()}, bar.n)
    bar.close()
    return model.eval()


def classifier_precision(tc: ClassifierTrainConfig, width: int, device: torch.device, arch: str = "vgg") -> Precision:
    """Settle `tc.precision` on training steps of a throw-away classifier of the same shape, within
    JUDGE_TOLERANCE of fp32's gradient."""
    x = torch.randn(tc.batch_size, 3, 28, 28, device=device)
    y = torch.arange(tc.batch_size, device=device) % 10
    return settle_training(
        tc.precision,
        device,
        f"digit-classifier width {width} batch {tc.batch_size}" + ("" if arch == "vgg" else f" {arch}"),
        lambda: DigitClassifier(ClassifierConfig("trial", width, arch=arch)),
        lambda model, p: F.cross_entropy(model(p.input(x)), y),
        tolerance=JUDGE_TOLERANCE,
    )


def classifier_path(classifier_dir: str | os.PathLike, domain: str) -> Path:
    return Path(classifier_dir) / f"{domain}.safetensors"


def save_classifier(model: DigitClassifier, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Weights as safetensors and the config as JSON next to it (same stem), both written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "config": asdict(model.config), **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    save_json(meta, path.with_suffix(".json"))
    return path


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> DigitClassifier:
    """Load a classifier from its .safetensors (or .json) file; anything else is a one-line error."""
    path = Path(path).with_suffix(".safetensors")
    json_path = path.with_suffix(".json")
    if not path.is_file():
        raise DifflabError(f"{path}: classifier weights not found")
    meta = load_json(json_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise DifflabError(f"{json_path}: not a difflab digit classifier config")
    try:
        config = ClassifierConfig(**meta["config"])
        model = DigitClassifier(config)
    except (TypeError, ValueError) as e:
        raise DifflabError(f"{json_path}: invalid classifier config ({e})") from None
    check_state_dict(model, read_safetensors(path, "classifier weights"), path)
    return model.to(pick_device(device) if not isinstance(device, torch.device) else device).eval()


def _heldout(data_root: Path, domain: str, val_fraction: float, seed: int):
    """Training and held-out arrays: val.csv when the data has one, else a seeded slice of train.csv."""
    images, labels = load_split(data_root, domain, "train")
    if split_csv(data_root, domain, "val").is_file():
        val_images, val_labels = load_split(data_root, domain, "val")
        return images, labels, val_images, val_labels, SPLITS["val"]
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = max(1, int(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val], f"{n_val} images held out of train.csv"


def judge_pool(data_root: Path, domain: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The judges' own training images of `domain` (see `ClassifierTrainConfig.judge_pool`), or None where the data
    is not difflab's embedded dataset or the pool is off."""
    info = dataset_info(data_root)
    if n == 0 or info is None or info["mnist_source"] == JUDGE_MNIST:  # the full MNIST leaves no unseen digits
        return None
    if domain != "mnistm":
        n = int(info["train_per_domain"])
    return generate_split(domain, n, int(info["seed"]) + seed, "judge", info["mnist_source"])


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray | None:
    """Indices of the first n // 10 images of each digit, or None when a digit has fewer."""
    picks = [np.nonzero(labels == d)[0][: n // 10] for d in range(10)]
    return np.concatenate(picks) if all(len(p) == n // 10 for p in picks) else None


def cas_accuracy(images, labels, heldout, heldout_labels, domain: str, width: int, device, seed: int) -> float | None:
    """Classification accuracy score: a judge-shaped classifier trained on CAS_IMAGES of `images` (balanced),
    read on the held-out ones; None when a digit has too few images."""
    pick = balanced_subset(labels, CAS_IMAGES)
    if pick is None:
        return None
    tc = ClassifierTrainConfig(epochs=CAS_EPOCHS, judge_pool=0)
    model = train_classifier(images[pick], labels[pick], f"{domain} CAS", tc, width, device, seed)
    return accuracy(model, heldout, heldout_labels)


def train_classifiers(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    epochs: int = ClassifierTrainConfig.epochs,
    device: str | None = None,
    seed: int = 0,
    width: int = ClassifierConfig.width,
    domains: tuple[str, ...] = DOMAINS,
    precision: Precision = ClassifierTrainConfig.precision,
    augment: bool = ClassifierTrainConfig.augment,
    judge_pool: int = ClassifierTrainConfig.judge_pool,
    overwrite: bool = False,
    report_to: str = "none",
) -> dict[str, float]:
    """Train and save one classifier per domain, the independent feature network and the real CAS references;
    returns the held-out accuracy of each judge. The judges land in `out_dir` together, once all are trained: a
    failure leaves earlier judges there whole. `report_to` names trackers (difflab.report.tracking) for the loss,
    learning rate and held-out accuracy."""
    accelerator_kwargs(report_to, out_dir)  # the trackers are checked before any work
    with open_run(out_dir, "digits train-classifier", overwrite=overwrite, staged=True) as run:
        tc = ClassifierTrainConfig(epochs=epochs, precision=precision, augment=augment, judge_pool=judge_pool)
        config = {**asdict(tc), "seed": seed, "width": width}
        with tracked(report_to, run.dir, "difflab-judges", config, device == "cpu") as log:
            results, rows, chosen = _train_classifiers(Path(data_root), run.dir, tc, device, seed, width, domains, log)
        write_judges_card(run.dir, Path(out_dir), Path(data_root), tc, width, seed, chosen, rows)
        return results


def _train_classifiers(
    data_root: Path, out_dir: Path, tc: ClassifierTrainConfig, device, seed, width, domains, log=None
):
    from difflab.report import HtmlReport

    dev = pick_device(device)
    chosen = classifier_precision(tc, width, dev)
    print(f"classifier precision: {chosen.describe()}", flush=True)
    results, rows, seen = {}, [], []
    for domain in domains:
        images, labels, val_images, val_labels, heldout = _heldout(data_root, domain, tc.val_fraction, seed)
        start = time.perf_counter()
        cas_real = cas_accuracy(images, labels, val_images, val_labels, domain, width, dev, seed)
        pool = judge_pool(data_root, domain, tc.judge_pool, seed)
        if pool is not None:
            images, labels = pool
        seen.append((images, labels, val_images, val_labels))
        model = train_classifier(images, labels, domain, tc, width, dev, seed, chosen, log=log)
        seconds = time.perf_counter() - start
        acc = accuracy(model, val_images, val_labels)
        if log is not None:
            log({f"{domain}/held_out_accuracy": acc}, tc.epochs * math.ceil(len(labels) / tc.batch_size))
        save_classifier(
            model,
            classifier_path(out_dir, domain),
            {
                "held_out_accuracy": acc,
                "held_out": heldout,
                "n_train": int(len(labels)),
                "n_judge_pool": 0 if pool is None else int(len(pool[1])),
                "n_held_out": int(len(val_labels)),
                "cas_real": {"images": CAS_IMAGES, "epochs": CAS_EPOCHS, "accuracy": cas_real},
                "train_seconds": round(seconds, 1),
                "train_tflop": round(classifier_tflop(tc, width, len(labels)), 2),
                "data_root": str(data_root),
                "train": asdict(tc),
                "seed": seed,
                "precision": chosen.describe(),
                "judges_version": JUDGES_VERSION,
            },
        )
        print(
            f"{domain}: held-out acc = {acc:.4f} ({len(val_labels)} images, {heldout}); trained on {len(labels)} "
            f"images in {seconds:.1f} s; a classifier trained on {CAS_IMAGES} real images reads {cas_real}"
        )
        results[domain] = acc
        rows.append([domain, len(labels), len(val_labels), f"{acc:.4f}", f"{seconds:.1f}"])
    rows.append(train_feature_net(seen, out_dir, dev, seed, tc.precision))
    report = HtmlReport("Digit classifiers")
    report.text(f"Data: {data_root}. One CNN per domain, and the independent feature network, on {dev}.")
    report.settings("training", {**asdict(tc), "precision": chosen.describe(), "width": width})
    report.table(["network", "train images", "held-out images", "held-out accuracy", "train seconds"], rows)
    report.save(out_dir / "report.html")
    return results, rows, chosen


def train_feature_net(seen: list, out_dir: Path, device, seed: int, precision: Precision) -> list:
    """The independent feature network: another architecture and seed, on real digits of every domain (what the
    judges trained on, at most FEATURE_NET["per_domain"] of each); never a judge and never used for guidance.
    Returns its report row."""
    per_domain = FEATURE_NET["per_domain"]
    images, labels = (np.concatenate([s[i][:per_domain] for s in seen]) for i in (0, 1))
    val_images, val_labels = (np.concatenate([s[i] for s in seen]) for i in (2, 3))
    tc = ClassifierTrainConfig(epochs=FEATURE_NET["epochs"], judge_pool=0, precision=precision)
    start = time.perf_counter()
    model = train_classifier(
        images, labels, "features", tc, FEATURE_NET["width"], device, seed + 1, arch=FEATURE_NET["arch"]
    )
    seconds = time.perf_counter() - start
    acc = accuracy(model, val_images, val_labels)
    save_classifier(
        model,
        classifier_path(out_dir, FEATURES_FILE),
        {
            "held_out_accuracy": acc,
            "n_train": int(len(labels)),
            "train_seconds": round(seconds, 1),
            "train_tflop": round(classifier_tflop(tc, FEATURE_NET["width"], len(labels), FEATURE_NET["arch"]), 2),
            "seed": seed + 1,
        },
    )
    print(f"independent feature network: held-out acc = {acc:.4f}; trained on {len(labels)} images in {seconds:.1f} s")
    return ["features (independent)", len(labels), len(val_labels), f"{acc:.4f}", f"{seconds:.1f}"]


def classifier_tflop(tc: ClassifierTrainConfig, width: int, n_images: int, arch: str = "vgg") -> float:
    """Training compute of a classifier by torch's FLOP counter: one step's forward and backward, times the steps."""
    model = DigitClassifier(ClassifierConfig("count", width, arch=arch))
    x = torch.randn(tc.batch_size, 3, 28, 28)
    step = count_flops(lambda: F.cross_entropy(model(x), torch.zeros(tc.batch_size, dtype=torch.long)).backward())
    return step * tc.epochs * math.ceil(n_images / tc.batch_size) / 1e12


def judges_tflop(classifier_dir: str | os.PathLike) -> float:
    """The judges' and the feature network's training compute, from their JSON files."""
    names = (*DOMAINS, FEATURES_FILE)
    return sum(load_json(classifier_path(classifier_dir, n).with_suffix(".json")).get("train_tflop", 0) for n in names)


def check_judges(classifier_dir: str | os.PathLike) -> None:
    """A one-line error for a judges folder made before the independent feature network and CAS references."""
    meta = load_json(classifier_path(classifier_dir, DOMAINS[0]).with_suffix(".json"))
    if not classifier_path(classifier_dir, FEATURES_FILE).is_file() or meta.get("judges_version") != JUDGES_VERSION:
        data = meta.get("data_root", "DATA") if isinstance(meta, dict) else "DATA"
        raise DifflabError(
            f"{classifier_dir}: judges from an earlier difflab (no independent feature network or CAS reference); "
            f"retrain them: difflab digits train-classifier --data-root {data} --out {classifier_dir} --overwrite"
        )


def write_judges_card(
    folder: Path, out_dir: Path, data_root: Path, tc: ClassifierTrainConfig, width, seed, precision, rows
) -> None:
    """The judges' model card in `folder` (the run's staging folder), naming `out_dir`, where they will be."""
    made = {
        "command": f"`difflab digits train-classifier --data-root {data_root} --out {out_dir} --seed {seed}`",
        "models": ", ".join(f"`{row[0]}.safetensors` (held-out accuracy {row[3]}, {row[1]} images)" for row in rows),
        "training": f"{tc.epochs} epochs, width {width}, seed {seed}",
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads; precision {precision.describe()}",
        "training time": " + ".join(f"{row[4]} s" for row in rows),
    }
    usage = f"""from difflab.digits.classifier import load_classifier

judge = load_classifier("{out_dir}/svhn.safetensors")
digits = judge.predict(images)  # uint8 (N, 28, 28, 3) -> (N,) digit per image"""
    summary = (
        "One small CNN per domain that reads the digit of a 28x28 image: the judges of the digits job, which "
        "score generated digits (accuracy) and give one feature space of its quality measures; and the independent "
        "feature network (`features.safetensors`) that gives the other."
    )
    write_model_card(folder, "difflab digit judges", summary, made, usage, ["image-classification", "digits"],
                     "image-classification")  # fmt: skip
