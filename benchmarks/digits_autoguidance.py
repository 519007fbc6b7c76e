"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") on the digits models:
the AdamW 60-TFLOP model (the default until Muon) guided by the 45-TFLOP model of the same recipe and seed, with
digit guidance on top, against digit guidance alone. Data, judges and checkpoints are those of digits_seeds.py
(trained there if missing).

    python benchmarks/digits_autoguidance.py --seeds 0 1 2
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from difflab.digits.model import load_digits_model  # noqa: E402
from difflab.digits.sample import SampleConfig  # noqa: E402
from digits_seeds import data_and_judges, judge_net, seed_arguments, trained  # noqa: E402

MODEL_RECIPE = "60-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999"
GUIDE_RECIPE = "45-tflop-b16-convfirst-snr0.5-pdigit0.1-ema999"  # the same recipe stopped at 45 TFLOP
# (autoguidance weight, digit guidance); weight 1 is the guiding model unused
SETTINGS = [(1.0, 6.0), (1.5, 4.5), (1.5, 5.5), (2.0, 3.0), (2.0, 4.5)]


class AutoGuided(torch.nn.Module):
    """D_guided = D_bad + w·(D_good − D_bad) for every condition; the samplers' digit guidance applies on top."""

    def __init__(self, good: torch.nn.Module, bad: torch.nn.Module, weight: float):
        super().__init__()
        self.good, self.bad, self.weight, self.config = good, bad, weight, good.config

    @property
    def null_cond(self) -> tuple[int, int]:
        return self.good.null_cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        good = self.good(x, t, cond)
        return good if self.weight == 1 else torch.lerp(self.bad(x, t, cond), good, self.weight)


def main() -> None:
    args = seed_arguments(__doc__.splitlines()[0])
    cpu, rows = torch.device("cpu"), []
    for seed in args.seeds:
        data, judges = data_and_judges(seed)
        good, schedule, _ = load_digits_model(trained(MODEL_RECIPE, seed, data)[0], cpu)
        bad, _, _ = load_digits_model(trained(GUIDE_RECIPE, seed, data)[0], cpu)
        for weight, digit in SETTINGS:
            sampler = SampleConfig(guidance_digit=digit, precision="fp32")
            r = judge_net(AutoGuided(good, bad, weight), schedule, sampler, seed, data, judges)
            m, s = r["mnistm"], r["svhn"]
            rows.append([
                seed, weight, digit, m["acc"], s["acc"], round(r["acc"], 4), round(m["frechet_ratio"], 2),
                round(s["frechet_ratio"], 2), round(m["memorisation"], 3), round(s["memorisation"], 3),
            ])  # fmt: skip
            print(rows[-1], flush=True)
    header = [
        "seed", "autoguidance weight", "digit guidance", "MNIST-M acc", "SVHN acc", "mean acc",
        "Fréchet ratio MNIST-M", "Fréchet ratio SVHN", "memorised MNIST-M", "memorised SVHN",
    ]  # fmt: skip
    note = (
        f"DDIM-10, η = 1, trailing timesteps, fp32; 1,000 digits per row judged as in digits_seeds.md. Weight 1: the "
        f"{MODEL_RECIPE} model alone (10 network calls per image); above 1 the guiding model ({GUIDE_RECIPE}, 45 TFLOP "
        "more training) adds a forward per step, 20 calls per image."
    )
    write_results("digits_autoguidance", header, sorted(rows, key=lambda r: (r[1], r[2], r[0])), note)


if __name__ == "__main__":
    main()
