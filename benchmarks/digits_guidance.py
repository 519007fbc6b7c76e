"""The frontier: accuracy against Fréchet distance as digit guidance grows, for a recipe of digits_seeds.py, beside
the real held-out digits judged the same way (what a generator as good as the data would score). Data, judges and
checkpoints are those of digits_seeds.py (trained there if missing); each row measures 2,000 digits per domain.

    python benchmarks/digits_guidance.py --recipes default mg4-finetune-40+5-tflop --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from difflab.digits.sample import SampleConfig  # noqa: E402
from digits_seeds import RECIPES, data_and_judges, judge, nfe, trained  # noqa: E402

GUIDANCE = [1.0, 2.0, 3.5, 5.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["default"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--guidance", nargs="+", type=float, default=GUIDANCE)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        data, judges = data_and_judges(seed)
        for recipe in args.recipes:
            ckpt = trained(recipe, seed, data)[0]
            for g in args.guidance:
                sampler = replace(SampleConfig(), guidance_digit=g)
                r = judge(ckpt, sampler, seed, data, judges)
                m, s = r["mnistm"], r["svhn"]
                real = ["real held-out digits", seed, "-", m["real_acc"], s["real_acc"]]
                row = [
                    recipe, seed, g, m["acc"], s["acc"], round(m["fid_independent"], 2),
                    round(s["fid_independent"], 2), round(m["fid_judge"], 2), round(s["fid_judge"], 2),
                    round(m["recall_independent"], 2), round(s["recall_independent"], 2), nfe(sampler),
                ]  # fmt: skip
                write(real + [1.0] * 6 + [0], row)
                print(row, flush=True)


def write(*new: list) -> None:
    """Merge `new` rows into the results as they are on disk now: several runs (say, one per recipe) may write."""
    path = RESULTS / "digits_guidance.json"
    rows = {tuple(map(str, r[:3])): r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    rows.update({tuple(map(str, r[:3])): r for r in new})
    header = [
        "recipe", "seed", "digit guidance", "MNIST-M acc", "SVHN acc", "FID/floor indep. MNIST-M",
        "FID/floor indep. SVHN", "FID/floor judge MNIST-M", "FID/floor judge SVHN", "recall/floor indep. MNIST-M",
        "recall/floor indep. SVHN", "NFE / image",
    ]  # fmt: skip
    note = (
        "Each recipe's model of each seed with the default sampler (DDIM-10, η = 1, trailing timesteps) and only the "
        "digit guidance changed; 2,000 digits per domain, measured as in digits_seeds.md. The real held-out row: the "
        "seed's judges on its held-out split; its Fréchet ratio is 1 by definition (the floor is as many real "
        "training digits). A model-guidance recipe has its guidance trained in; there the digit guidance is added on "
        "top (1 = none added)."
    )
    write_results("digits_guidance", header, sorted(rows.values(), key=lambda r: (r[0], r[1], str(r[2]))), note)
    figure(list(rows.values()))


def figure(rows: list[list]) -> None:
    """Accuracy against FID / floor in the independent features, the median over seeds of each recipe and guidance,
    per domain; the real held-out digits as the stars (FID / floor 1 by definition)."""
    from difflab.report.plots import plot_frontier

    curves, reference = {}, {}
    for col, domain in ((3, "MNIST-M"), (4, "SVHN")):
        for recipe in sorted({r[0] for r in rows if r[0] != "real held-out digits"}):
            mine = [r for r in rows if r[0] == recipe]
            points = []
            for g in sorted({r[2] for r in mine}):
                at = [r for r in mine if r[2] == g]
                fid = float(np.median([r[col + 2] for r in at]))
                points.append((fid, float(np.median([r[col] for r in at])), f"{g:g}"))
            curves[f"{recipe}, {domain}"] = points
        real = [r[col] for r in rows if r[0] == "real held-out digits"]
        reference[f"default, {domain}"] = (1.0, float(np.median(real)))  # one star per domain
    plot_frontier(curves, reference, RESULTS / "digits_guidance.png", "FID / floor, independent features",
                  "judge accuracy", "Over digit guidance: median over seeds")  # fmt: skip


if __name__ == "__main__":
    main()
