"""The digits job over seeds: recipe x seed x sampler, each seed with its own data, judges, training and sampling
noise, as `difflab digits demo --seed N` runs them.

For each row: accuracy per domain of the 1,000 digits of the course layout by that seed's judges, each domain's
Fréchet distance over its floor (an equally large training sample against the held-out split), memorisation,
network evaluations per image, training TFLOP (torch's FLOP counter) and training seconds. Data, judges and
checkpoints are kept in benchmarks/.work/digits_seeds/, so a new sampler on old checkpoints costs only sampling.

    python benchmarks/digits_seeds.py --recipes default 45-tflop --seeds 0 1 2 --samplers default ddim-25
    python benchmarks/digits_seeds.py --seeds 1 --threads 1 --name .part1   # one seed per process, side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from difflab.demos.digits import DemoConfig  # noqa: E402
from difflab.digits.classifier import (  # noqa: E402
    FEATURES_FILE,
    cas_accuracy,
    classifier_path,
    load_classifier,
    train_classifiers,
)
from difflab.digits.data import DOMAINS, SPLITS, load_split, make_dataset  # noqa: E402
from difflab.digits.model import load_digits_model  # noqa: E402
from difflab.digits.quality import SPACES, domain_quality  # noqa: E402
from difflab.digits.sample import SampleConfig, course_images  # noqa: E402
from difflab.digits.train import PRESETS, TrainConfig, forward_flops, step_flops, train  # noqa: E402
from difflab.samplers import ddim_timesteps  # noqa: E402
from difflab.schedule import NoiseSchedule  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work" / "digits_seeds"
QUALITY_PER_DIGIT = 200  # 2,000 digits per domain: what the distribution measures need (QualityConfig.min_images)
# Training recipes: the default, the old default (102.5 TFLOP until the seed table) and its cut to 45 TFLOP (2,190
# steps, 200 warm-up steps) with variants of batch size and peak learning rate, and round 3
# (results/digits_45tflop*.md): batch 16 at LR 2e-3, 200 warm-up steps, EMA 0.995, timesteps drawn with γ = 0.5, the
# upsampling conv before the upsample ("b16-convfirst-snr0.5"), and its variants; "tflop": the most steps that fit
# that budget by the FLOP counter. Round 5 (results/digits_45tflop_round5.md): the digit dropped at p = 0.1 and
# longer EMAs; "60-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999" is the default since.
OLD_DEFAULT = dict(steps=5000, batch_size=32, lr=4e-3, warmup_steps=500, ema_decay=0.999, min_snr_gamma=5.0,
                   p_drop_digit=0.15, optimizer="adamw", net=dict(conv_before_upsample=False))  # fmt: skip
ROUND3 = dict(batch_size=16, lr=2e-3, warmup_steps=200, ema_decay=0.995, min_snr_gamma=0.5, p_drop_digit=0.15,
              optimizer="adamw", net=dict(conv_before_upsample=True))  # fmt: skip
B8 = dict(ROUND3, batch_size=8, lr=1e-3, warmup_steps=400)  # round 3 at batch 8: the default of the first seed table
RECIPES: dict[str, dict] = {
    "default": {},
    "old-default": OLD_DEFAULT,
    "45-tflop": dict(OLD_DEFAULT, steps=2190, warmup_steps=200),
    "45-tflop-lr2e-3": dict(OLD_DEFAULT, steps=2190, warmup_steps=200, lr=2e-3),
    "45-tflop-b16": dict(OLD_DEFAULT, steps=4380, batch_size=16, warmup_steps=200),
    "45-tflop-b16-lr2e-3": dict(OLD_DEFAULT, steps=4380, batch_size=16, warmup_steps=200, lr=2e-3),
    "45-tflop-b16-lr1e-3": dict(OLD_DEFAULT, steps=4380, batch_size=16, warmup_steps=200, lr=1e-3),
    "45-tflop-b16-lr2e-3-warmup800": dict(OLD_DEFAULT, steps=4380, batch_size=16, warmup_steps=800, lr=2e-3),
    "45-tflop-b16-lr2e-3-ema995": dict(
        OLD_DEFAULT, steps=4380, batch_size=16, warmup_steps=200, lr=2e-3, ema_decay=0.995
    ),  # fmt: skip
    "45-tflop-b8-lr1e-3": dict(OLD_DEFAULT, steps=8760, batch_size=8, warmup_steps=400, lr=1e-3),
    "45-tflop-b8-lr2e-3": dict(OLD_DEFAULT, steps=8760, batch_size=8, warmup_steps=400, lr=2e-3),
    "45-tflop-b16-convfirst": dict(ROUND3, tflop=45, min_snr_gamma=5.0),
    "45-tflop-b16-convfirst-snr1": dict(ROUND3, tflop=45, min_snr_gamma=1.0),
    "45-tflop-b16-convfirst-snr0.5": dict(ROUND3, tflop=45),
    "45-tflop-b16-convfirst-snr0.2": dict(ROUND3, tflop=45, min_snr_gamma=0.2),
    "45-tflop-b16-convfirst-snr0.5-lr3e-3": dict(ROUND3, tflop=45, lr=3e-3),
    "45-tflop-b16-convfirst-snr0.5-beta2-0.95": dict(ROUND3, tflop=45, adam_beta2=0.95),
    "45-tflop-b16-snr0.5": dict(ROUND3, tflop=45, net=dict(conv_before_upsample=False)),
    "45-tflop-b32-lr4e-3-convfirst-snr0.5": dict(ROUND3, tflop=45, batch_size=32, lr=4e-3),
    "45-tflop-b12-lr1.5e-3-convfirst-snr0.5": dict(ROUND3, tflop=45, batch_size=12, lr=1.5e-3),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5": dict(B8, tflop=45),
    "45-tflop-b8-lr1.5e-3-convfirst-snr0.5": dict(B8, tflop=45, lr=1.5e-3),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1": dict(B8, tflop=45, p_drop_digit=0.1),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.05": dict(B8, tflop=45, p_drop_digit=0.05),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1-pdomain0.05": dict(
        B8, tflop=45, p_drop_digit=0.1, p_drop_domain=0.05
    ),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1-ema998": dict(B8, tflop=45, p_drop_digit=0.1, ema_decay=0.998),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1-ema999": dict(B8, tflop=45, p_drop_digit=0.1, ema_decay=0.999),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1-ema9995": dict(B8, tflop=45, p_drop_digit=0.1, ema_decay=0.9995),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-pdigit0.1-ema999-lrfinal0": dict(
        B8, tflop=45, p_drop_digit=0.1, ema_decay=0.999, lr_final=0.0
    ),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-c48x128": dict(B8, tflop=45, net=dict(B8["net"], channels=(48, 128))),
    "45-tflop-b8-lr1e-3-convfirst-snr0.5-c32x128": dict(B8, tflop=45, net=dict(B8["net"], channels=(32, 128))),
    "60-tflop-b8-lr1e-3-convfirst-snr0.5": dict(B8, tflop=60),
    "70-tflop-b8-lr1e-3-convfirst-snr0.5": dict(B8, tflop=70),
    "50-tflop-b16-convfirst-snr0.5": dict(ROUND3, tflop=50),
    "60-tflop-b12-lr1.5e-3-convfirst-snr0.5": dict(ROUND3, tflop=60, batch_size=12, lr=1.5e-3, warmup_steps=300),
    "60-tflop-b16-convfirst-snr0.5": dict(ROUND3, tflop=60),
    "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999": dict(ROUND3, tflop=45, p_drop_digit=0.1, ema_decay=0.999),
    "50-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999": dict(ROUND3, tflop=50, p_drop_digit=0.1, ema_decay=0.999),
    "60-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999": dict(ROUND3, tflop=60, p_drop_digit=0.1, ema_decay=0.999),
    "70-tflop-b16-convfirst-snr0.5": dict(ROUND3, tflop=70),
    "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999-muon": dict(
        ROUND3, tflop=45, p_drop_digit=0.1, ema_decay=0.999, optimizer="muon"
    ),
    "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999-muon-convs": dict(
        ROUND3, tflop=45, p_drop_digit=0.1, ema_decay=0.999, optimizer="muon", muon_convs_only=True
    ),
    "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999-muon-lr3e-3": dict(
        ROUND3, tflop=45, p_drop_digit=0.1, ema_decay=0.999, optimizer="muon", lr=3e-3
    ),
    "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999-muon-lr2.5e-3": dict(
        ROUND3, tflop=45, p_drop_digit=0.1, ema_decay=0.999, optimizer="muon", lr=2.5e-3
    ),
    "60-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999-muon": dict(
        ROUND3, tflop=60, p_drop_digit=0.1, ema_decay=0.999, optimizer="muon"
    ),
    "80-tflop-b16-convfirst-snr0.5": dict(ROUND3, tflop=80),
    "default-wfloor0.05": dict(min_snr_floor=0.05),
    "default-wfloor0.1": dict(min_snr_floor=0.1),
    "default-zsnr": dict(schedule=dict(rescale_betas_zero_snr=True)),
    "default-zsnr-wfloor0.05": dict(schedule=dict(rescale_betas_zero_snr=True), min_snr_floor=0.05),
    "default-zsnr-gamma0.25": dict(schedule=dict(rescale_betas_zero_snr=True), min_snr_gamma=0.25),
    "default-zsnr-gamma1": dict(schedule=dict(rescale_betas_zero_snr=True), min_snr_gamma=1.0),
    "default-zsnr-pdigit0.15": dict(schedule=dict(rescale_betas_zero_snr=True), p_drop_digit=0.15),
    # Model guidance (issue "Digits as good as the data"): from scratch within 45 TFLOP, its extra forward counted,
    # or as a fine-tune: 40 TFLOP of the default recipe, then model guidance for the last 5 TFLOP of the same run
    # (its EMA restarted there; the table's "mg4-finetune-40+5-tflop" rows were trained before that restart, with
    # the EMA of the whole run, and are kept as they were measured).
    **{f"mg{s:g}-45-tflop": dict(model_guidance=s, tflop=45) for s in (3, 4, 5.5)},
    **{f"mg{s:g}-finetune-40+5-tflop": dict(model_guidance=s, tflop=40, finetune_tflop=5) for s in (3, 4, 5.5)},
    **{f"mg{s:g}-finetune-ema-40+5-tflop": dict(model_guidance=s, tflop=40, finetune_tflop=5) for s in (4, 5.5)},
}
# The sampler until the seed table: DDIM-25 with η = 1 from "leading" timesteps and digit guidance 6 at every step;
# then DPM-Solver++(2M) in 10 steps, then DDIM-10 with η = 1 from "trailing" timesteps, first with digit guidance 6,
# then 5. The names below keep the guidance they were measured with.
DDIM_10 = SampleConfig(method="ddim", steps=10, eta=1.0, spacing="trailing", guidance_digit=6.0)
OLD_SAMPLER = replace(DDIM_10, steps=25, spacing="leading")
DPM_10 = replace(DDIM_10, method="dpm++2m")
SAMPLERS: dict[str, SampleConfig] = {
    "default": SampleConfig(),  # the checkpoint's own digit guidance: 5.5, or 1 after model guidance
    "ddim-10-g6": DDIM_10,
    "ddim-25": OLD_SAMPLER,
    "dpm-10": DPM_10,
    **{f"ddim-10-g{g:g}": replace(DDIM_10, guidance_digit=g) for g in (1, 2, 3, 3.5, 4, 4.5, 5, 5.5, 7, 8)},
    "ddim-10-eta0.5": replace(DDIM_10, eta=0.5),
    "ddim-10-eta0.75": replace(DDIM_10, eta=0.75),
    **{
        f"ddim-10-eta{e:g}-g{g:g}": replace(DDIM_10, eta=e, guidance_digit=g)
        for e, g in ((0, 3), (0, 4), (0.25, 4), (0.5, 3.5), (0.5, 4))
    },
    **{f"dpm-10-g{g:g}": replace(DPM_10, guidance_digit=g) for g in (3, 4, 5)},
    "ddim-10-interval-0.8": replace(DDIM_10, guidance_interval=(0, 0.8)),
    "ddim-10-interval-0.2-0.8-g8": replace(DDIM_10, guidance_digit=8.0, guidance_interval=(0.2, 0.8)),
    "ddim-10-interval-0.6-g8": replace(DDIM_10, guidance_digit=8.0, guidance_interval=(0, 0.6)),
    "dpm-10-g7": replace(DPM_10, guidance_digit=7.0),
    "dpm-10-interval-0.8": replace(DPM_10, guidance_interval=(0, 0.8)),
    "dpm-10-interval-0.6-g8": replace(DPM_10, guidance_digit=8, guidance_interval=(0, 0.6)),
    "dpm-10-interval-0.5-g8": replace(DPM_10, guidance_digit=8, guidance_interval=(0, 0.5)),
}


def data_and_judges(seed: int, train_judges: bool = True) -> tuple[Path, Path]:
    """The demo's data and judges for `seed`, made once."""
    demo = DemoConfig()
    data, judges = WORK / f"seed{seed}" / "data", WORK / f"seed{seed}" / "judges"
    if not (data / "digits" / DOMAINS[-1] / SPLITS["val"]).is_file():
        make_dataset(data, demo.n_per_domain, demo.n_test_per_domain, seed)
    if train_judges and not classifier_path(judges, FEATURES_FILE).is_file():
        train_classifiers(data, judges, epochs=demo.classifier_epochs, seed=seed, overwrite=True)
    return data, judges


def recipe_config(recipe: str, **kwargs) -> TrainConfig:
    """The TrainConfig of `recipe`: its "net" changes go into a preset of the recipe's name, its "schedule" changes
    into the default schedule, its "tflop" budget becomes the most steps that fit it."""
    changes = dict(RECIPES[recipe])
    changes.pop("muon_convs_only", None)
    changes.pop("min_snr_floor", None)
    if "schedule" in changes:
        changes["schedule"] = replace(TrainConfig.default_schedule(), **changes["schedule"])
    if "net" in changes:
        PRESETS[recipe] = replace(PRESETS["cpu"], **changes.pop("net"))
        changes["preset"] = recipe
    budget, finetune = changes.pop("tflop", None), changes.pop("finetune_tflop", None)
    cfg = TrainConfig(**kwargs, **changes)
    if not budget:
        return cfg
    guided = step_flops(cfg) + forward_flops(cfg)
    if not finetune:
        return replace(cfg, steps=int(budget * 1e12 // guided))
    base = int(budget * 1e12 // step_flops(cfg))
    steps = base + int(finetune * 1e12 // guided)
    return replace(cfg, steps=steps, model_guidance_start=base / steps)


def trained(recipe: str, seed: int, data: Path) -> tuple[Path, float, float]:
    """The checkpoint of `recipe` for `seed` (trained now unless kept), its training TFLOP and seconds."""
    out = WORK / recipe / f"seed{seed}"
    log = out / "bench_train.json"
    if not log.is_file():
        with muon_layers(recipe), min_snr_floor(recipe):
            cfg = recipe_config(recipe, data_root=str(data), out_dir=str(out), seed=seed)
            start = time.perf_counter()
            train(replace(cfg, overwrite=True))
        log.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    tflop = json.loads((out / "config.json").read_text())["training_tflop"]  # counted by the training run
    return out, tflop, json.loads(log.read_text())["seconds"]


@contextmanager
def muon_layers(recipe: str):
    """Round 6's probe `muon_convs_only`: Muon for the conv kernels alone, the linear layers (time MLP, FiLM) to
    AdamW, which saves a third of Muon's FLOPs; training and its FLOP count both see the split."""
    import difflab.digits.train as training

    every = training.hidden_matrices

    def convs_only(net, outer):
        muon, rest = every(net, outer)
        return [p for p in muon if p.ndim == 4], rest + [p for p in muon if p.ndim != 4]

    training.hidden_matrices = convs_only if RECIPES[recipe].get("muon_convs_only") else every
    try:
        yield
    finally:
        training.hidden_matrices = every


@contextmanager
def min_snr_floor(recipe: str):
    """Round 7's probe `min_snr_floor`: the min-SNR loss weight raised to at least this value, so the nearly pure
    noise and nearly clean timesteps that the 10-step sampler starts and ends on are trained more (the timestep
    density follows the weight)."""
    floor = RECIPES[recipe].get("min_snr_floor")
    weight = NoiseSchedule.min_snr_weight
    if floor:
        NoiseSchedule.min_snr_weight = lambda self, t, gamma: weight(self, t, gamma).clamp(min=floor)
    try:
        yield
    finally:
        NoiseSchedule.min_snr_weight = weight


def judge(ckpt: Path, sampler: SampleConfig, seed: int, data: Path, judges: Path) -> dict:
    """Every measure of `digits evaluate` on QUALITY_PER_DIGIT digits per digit and domain drawn with `seed`."""
    net, schedule, model_config = load_digits_model(ckpt, torch.device("cpu"))
    return judge_net(net, schedule, sampler.for_model(model_config), seed, data, judges)


def judge_net(net, schedule, sampler: SampleConfig, seed: int, data: Path, judges: Path) -> dict:
    """`judge` for a network in hand (e.g. one combined with a guiding network)."""
    per_domain = course_images(net, schedule, replace(sampler, seed=seed), torch.device("cpu"), QUALITY_PER_DIGIT)
    return judge_images(per_domain, data, judges)


def judge_images(per_domain: dict[str, np.ndarray], data: Path, judges: Path) -> dict:
    """Every measure of `judge` on digits drawn elsewhere: uint8 per domain, QUALITY_PER_DIGIT per digit, in digit
    order."""
    labels, row = np.arange(10).repeat(QUALITY_PER_DIGIT), {}
    features = load_classifier(classifier_path(judges, FEATURES_FILE), "cpu")
    for domain, gen in per_domain.items():
        model = load_classifier(classifier_path(judges, domain), "cpu")
        train_x, _ = load_split(data, domain, "train")
        held_x, held_y = load_split(data, domain, "val")
        q = domain_quality(model, features, gen, labels, train_x, held_x, held_y)
        cas = cas_accuracy(gen, labels, held_x, held_y, domain, model.config.width, torch.device("cpu"), 0)
        cas_real = json.loads(classifier_path(judges, domain).with_suffix(".json").read_text())["cas_real"]["accuracy"]
        dist = q["distribution"]
        row[domain] = {
            "acc": float((model.predict(gen) == labels).mean()),
            "real_acc": q["heldout_accuracy"],
            "memorisation": q["memorisation_rate"],
            "cas_ratio": cas / cas_real,
            **{
                f"{name}_{space}": dist[space]["generated"][name] / dist[space]["floor"][name]
                for space in SPACES
                for name in ("fid", "recall", "precision")
            },
            # KID above its floor, in standard errors of the generated set's estimate
            **{
                f"kid_{space}": (dist[space]["generated"]["kid"] - dist[space]["floor"]["kid"])
                / dist[space]["generated"]["kid_std"]
                for space in SPACES
            },
        }
    row["acc"] = float(np.mean([row[d]["acc"] for d in DOMAINS]))
    return row


def seed_arguments(description: str) -> argparse.Namespace:
    """`--seeds` and `--threads` for the scripts that reuse this one's seeds; the thread count is set here."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def nfe(sampler: SampleConfig) -> int:
    """Network forward passes per image: a guided step batched over its branches counts each branch."""
    weights = (sampler.guidance_digit, sampler.guidance_domain - sampler.guidance_digit, 1 - sampler.guidance_domain)
    branches = sum(w != 0 for w in weights)
    steps = 1000 if sampler.method == "ddpm" else sampler.steps
    if sampler.guidance_interval == (0.0, 1.0) or branches == 1:
        return steps * branches
    lo, hi = sampler.guidance_interval
    guided = sum(lo * 999 <= t <= hi * 999 for t in ddim_timesteps(1000, steps, sampler.spacing))
    return steps + guided * (branches - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["default", "45-tflop"], choices=list(RECIPES))
    parser.add_argument("--samplers", nargs="+", default=["default"], choices=list(SAMPLERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="digits_seeds", help="results file stem")
    parser.add_argument("--train-only", action="store_true", help="train the checkpoints, measure nothing")
    parser.add_argument("--note", default="", help="appended to the results' note, e.g. how the checkpoints trained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.name}.json"
    rows = {tuple(r[:3]): r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for seed in args.seeds:
        data, judges = data_and_judges(seed, train_judges=not args.train_only)
        for recipe in args.recipes:
            ckpt, tflop, seconds = trained(recipe, seed, data)
            if args.train_only:
                continue
            for name in args.samplers:
                sampler = SAMPLERS[name].for_model(json.loads((ckpt / "config.json").read_text()))
                r = judge(ckpt, sampler, seed, data, judges)
                m, s = r["mnistm"], r["svhn"]
                both = lambda key, digits=2: [round(m[key], digits), round(s[key], digits)]  # noqa: E731
                rows[(recipe, name, seed)] = [
                    recipe, name, seed, m["acc"], s["acc"], round(r["acc"], 4), *both("real_acc", 4),
                    *both("fid_judge"), *both("fid_independent"), *both("kid_independent", 1),
                    *both("recall_independent"), *both("cas_ratio", 3), *both("memorisation", 3),
                    nfe(sampler), round(tflop, 1), None if seconds is None else round(seconds, 1),
                ]  # fmt: skip
                print(rows[(recipe, name, seed)], flush=True)
    # Runs side by side each add their rows: the file's rows as they are now, this run's over them.
    now = {tuple(r[:3]): r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    table = sorted({**now, **rows}.values(), key=lambda r: (r[0], r[1], r[2]))
    header = [
        "recipe", "sampler", "seed", "MNIST-M acc", "SVHN acc", "mean acc", "judge real MNIST-M", "judge real SVHN",
        "FID/floor judge MNIST-M", "FID/floor judge SVHN", "FID/floor indep. MNIST-M", "FID/floor indep. SVHN",
        "KID-floor (SE) indep. MNIST-M", "KID-floor (SE) indep. SVHN", "recall/floor indep. MNIST-M",
        "recall/floor indep. SVHN", "CAS/real MNIST-M", "CAS/real SVHN", "memorised MNIST-M", "memorised SVHN",
        "NFE / image", "training TFLOP", "training s",
    ]  # fmt: skip
    recipes = {k: v for k, v in RECIPES.items() if k in {r[0] for r in table}}
    samplers = {k: {**asdict(v), "precision": "auto"} for k, v in SAMPLERS.items() if k in {r[1] for r in table}}
    note = (
        "Each seed makes its own data, judges, model and sampling noise, as `difflab digits demo --seed N`; 4,000 "
        "digits (200 per digit and domain). acc: the seed's judge on the generated digits; judge real: the same judge "
        "on the real held-out digits. FID/floor: Fréchet distance (torchmetrics) of the generated digits to the "
        "held-out split over that of as many real training digits, in the judge's and the independent network's "
        "features (1.0 = as close as real data). KID-floor (SE): KID above its floor in standard errors of its "
        "estimate. recall/floor: recall (prdc, k = 3) over the real training digits'. CAS/real: a classifier trained "
        "on 2,000 generated digits over one trained on 2,000 real ones, both read on the held-out split. NFE: "
        "network forward passes per image, each guidance branch counted. Training seconds: the wall clock of the run "
        f"that made the checkpoint. {args.note} Recipes: {json.dumps(recipes)}. Samplers: {json.dumps(samplers)}."
    )
    write_results(args.name, header, table, note)


if __name__ == "__main__":
    main()
