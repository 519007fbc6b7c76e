"""Accuracy of generated digits against training steps and CPU seconds, for the old recipe (commit 0d367a9)
and the current defaults, on the same embedded data and the same judges.

Each recipe trains once for `--steps` with its learning-rate schedule set for that length; the EMA weights
are judged at every `--every` steps (1,000 digits with the demo's sampler, `SampleConfig()`). The
intermediate points are snapshots of one run, not runs of their own length, so they understate what a run
of that length reaches. Fixed work and seeds: the accuracies do not depend on the machine's load; the CPU
seconds (process time of training) do a little.

    python benchmarks/digits_recipe.py                     # both recipes, one after the other
    python benchmarks/digits_recipe.py --recipes new --threads 1 --part new   # one recipe per process
    python benchmarks/digits_recipe.py --merge old new      # gather per-recipe parts into one table
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from difflab.digits.classifier import classifier_path, load_classifier, train_classifiers  # noqa: E402
from difflab.digits.data import DOMAINS, SPLITS, make_dataset  # noqa: E402
from difflab.digits.model import ScheduleConfig  # noqa: E402
from difflab.digits.sample import SampleConfig, generate, make_conds  # noqa: E402
from difflab.digits.train import TrainConfig, train  # noqa: E402
from difflab.utils import to_uint8  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work" / "digits_recipe"
# The recipe of commit 0d367a9 (15-minute wall-clock budget), as fixed work: ε-prediction, min-SNR(5),
# AdamW 1e-3, batch 32, EMA 0.999, (48, 96) channels on 2x2 patches, T = 500.
OLD = dict(
    lr=1e-3,
    batch_size=32,
    ema_decay=0.999,
    min_snr_gamma=5.0,
    warmup_steps=100,
    adam_beta2=0.999,
    schedule=ScheduleConfig(prediction="epsilon"),
    timestep_sampling="uniform",
)
# The first v-prediction recipe: uniform-t but for a 100-step warm-up and Adam's β2 = 0.999. Over seeds
# 0/1/2 it gave 0.992 / 0.988 / 0.956, uniform-t 0.988 / 0.979 / 0.981 (README, "The digits model").
SHORT_WARMUP = dict(warmup_steps=100, adam_beta2=0.999, timestep_sampling="uniform")
# The recipe before timesteps were drawn by their min-SNR weight: uniform t, each sample weighted.
UNIFORM_T = dict(timestep_sampling="uniform")
# Tried and dropped: the plain v-loss (x_0 error weighted by 1 + SNR instead of min(SNR, 5)).
PLAIN_V = dict(min_snr_gamma=None, timestep_sampling="uniform")
RECIPES = {"old": OLD, "short-warmup": SHORT_WARMUP, "uniform-t": UNIFORM_T, "plain-v": PLAIN_V, "new": {}}


def data_and_judges(seed: int = 0) -> tuple[Path, Path]:
    data, judges = WORK / "data", WORK / "judges"
    if not (data / "digits" / DOMAINS[-1] / SPLITS["val"]).is_file():  # the last file make_dataset writes
        make_dataset(data, seed=seed)
    if not classifier_path(judges, DOMAINS[-1]).is_file():
        train_classifiers(data, judges, seed=seed)
    return data, judges


# The earlier sampler (DDIM-25, η = 0, digit guidance 5), judged at the last step only.
OLD_SAMPLER = SampleConfig(steps=25, eta=0.0, guidance_digit=5.0)


def judge(net, schedule, judges: dict, sampler: SampleConfig, per_digit: int = 50) -> dict[str, float]:
    digits = torch.arange(10).repeat_interleave(per_digit)
    cond = torch.cat([make_conds(torch.full_like(digits, d), digits) for d in range(len(DOMAINS))])
    images = to_uint8(generate(net, schedule, cond, sampler, torch.device("cpu"), progress=False)[0])
    n = len(digits)
    accs = {
        d: float((judges[d].predict(images[i * n : (i + 1) * n]) == digits.numpy()).mean())
        for i, d in enumerate(DOMAINS)
    }
    return {**accs, "acc": sum(accs.values()) / len(accs)}


def run_recipe(name: str, steps: int, every: int, data: Path, judges_dir: Path, seed: int = 0) -> list[dict]:
    cfg = replace(
        TrainConfig(
            data_root=str(data),
            out_dir=str(WORK / "runs" / f"{name}-seed{seed}"),
            steps=steps,
            seed=seed,
            overwrite=True,
            save_every=steps,
            sample_every=every,
            device="cpu",
        ),
        **RECIPES[name],
    )
    snapshots, start = {}, time.process_time()

    def keep(step: int, ema) -> None:
        snapshots[step] = (copy.deepcopy(ema), time.process_time() - start)

    train(cfg, on_sample=keep)
    judges = {d: load_classifier(classifier_path(judges_dir, d)) for d in DOMAINS}
    schedule = cfg.schedule.build()
    rows = []
    for step, (net, cpu_s) in sorted(snapshots.items()):
        samplers = {"new": SampleConfig(), "old": OLD_SAMPLER} if step == steps else {"new": SampleConfig()}
        for sampler_name, sampler in samplers.items():
            row = {
                "recipe": name,
                "seed": seed,
                "sampler": sampler_name,
                "step": step,
                "cpu_s": round(cpu_s, 1),
                **judge(net, schedule, judges, sampler),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def write_table(rows: list[dict], steps: int, threads: int) -> None:
    header = ["recipe", "seed", "sampler", "step", "CPU s (training)", "MNIST-M acc", "SVHN acc", "mean acc"]
    table = [
        [r["recipe"], r.get("seed", 0), r["sampler"], r["step"], r["cpu_s"], r["mnistm"], r["svhn"], r["acc"]]
        for r in rows
    ]
    notes = (
        f"Each recipe: one run of {steps} steps (LR schedule set for {steps}), EMA weights judged every "
        f"{rows[0]['step']} steps on 1,000 digits by the same judges, with the demo's sampler (new: "
        f"{json.dumps(asdict(SampleConfig()))}) and at the last step also with the earlier one (old: DDIM-25, "
        "η = 0, digit guidance 5). "
        f"Training on {threads} thread(s) per run (with --part, the runs may go side by side). "
        "Old = commit 0d367a9's recipe as fixed work; new = the current TrainConfig defaults (timesteps drawn "
        "in proportion to their min-SNR weight); uniform-t = new with uniform timesteps (the previous defaults)."
    )
    write_results("digits_recipe", header, table, notes, extra={"records": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="training seed (the data and judges stay those of seed 0)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--part", help="write only results/.digits_recipe_<part>.json, for --merge")
    p.add_argument("--merge", nargs="+", help="parts to gather into the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # also what the table's machine line reports
    if args.merge:
        rows = [r for part in args.merge for r in json.loads((RESULTS / f".digits_recipe_{part}.json").read_text())]
        write_table(rows, max(r["step"] for r in rows), args.threads)
        return
    data, judges = data_and_judges()
    rows = [r for name in args.recipes for r in run_recipe(name, args.steps, args.every, data, judges, args.seed)]
    if args.part:
        (RESULTS / f".digits_recipe_{args.part}.json").write_text(json.dumps(rows, indent=1))
    else:
        write_table(rows, args.steps, args.threads)


if __name__ == "__main__":
    main()
