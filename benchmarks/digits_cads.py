"""CADS (condition-annealed sampling, Sadat et al. 2024) on the default recipe's checkpoints: does noise on the digit
embedding early in sampling lift the frontier of digits_guidance.py (accuracy against Fréchet distance)?

The digit embedding y of the conditional branch is replaced by ŷ = √γ(t)·y + s·√(1 − γ(t))·n, n ~ N(0, I) drawn at
every step, with γ = 1 for t/T ≤ τ1, 0 for t/T ≥ τ2 and linear between; ŷ is then rescaled to y's own mean and
standard deviation with weight ψ. The unconditional branch is untouched. Measured as digits_guidance.py measures
(2,000 digits per domain, the seed's own data and judges); the plain rows are that benchmark's.
This stays a benchmark: it lifted no point of the frontier on seeds 0-2 (docs/digits-quality.md, "The frontier over
guidance"), so the library has no CADS option.

    python benchmarks/digits_cads.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from difflab.digits.model import load_digits_model  # noqa: E402
from difflab.digits.sample import SampleConfig  # noqa: E402
from difflab.nets.digits_unet import DigitsUNet, sinusoidal_embedding  # noqa: E402
from difflab.precision import Precision  # noqa: E402
from digits_seeds import data_and_judges, judge_net, trained  # noqa: E402

# (τ1, τ2, s, ψ): the paper's class-conditional setting, a milder and a stronger one.
SETTINGS = [(0.6, 0.9, 0.25, 1.0), (0.5, 0.9, 0.1, 1.0), (0.3, 0.9, 0.25, 1.0)]


class CadsUNet(DigitsUNet):
    """The digits UNet with CADS noise on the digit embedding of every row that has a digit."""

    def __init__(self, net: DigitsUNet, num_steps: int, setting: tuple[float, float, float, float], seed: int):
        super().__init__(net.config)
        self.load_state_dict(net.state_dict())
        self.eval()
        self.num_steps, self.setting = num_steps, setting
        self.generator = torch.Generator().manual_seed(seed)

    def embed(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tau1, tau2, s, psi = self.setting
        y = self.digit_emb(cond[:, 1])
        gamma = ((tau2 - t.float() / (self.num_steps - 1)) / (tau2 - tau1)).clamp(0, 1)[:, None]
        noise = torch.randn(y.shape, generator=self.generator).to(y)
        noised = gamma.sqrt() * y + s * (1 - gamma).sqrt() * noise
        standardised = (noised - noised.mean(1, keepdim=True)) / noised.std(1, keepdim=True)
        rescaled = standardised * y.std(1, keepdim=True) + y.mean(1, keepdim=True)
        y = torch.where((cond[:, 1] != self.config.num_digits)[:, None], psi * rescaled + (1 - psi) * noised, y)
        emb = self.time_mlp(sinusoidal_embedding(t, self.config.emb_dim))
        return self.emb_act(emb + self.domain_emb(cond[:, 0]) + y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--guidance", type=float, default=5.5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "digits_cads.json"
    rows = {tuple(map(str, r[:3])): r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    plain = json.loads((RESULTS / "digits_guidance.json").read_text())["rows"]
    for seed in args.seeds:
        data, judges = data_and_judges(seed)
        net, schedule, _ = load_digits_model(trained("default", seed, data)[0], torch.device("cpu"))
        # fp32: the precision check compares two forwards, which CADS's fresh noise would tell apart
        sampler = replace(SampleConfig(), guidance_digit=args.guidance, precision=Precision("fp32"))
        for r in plain:
            if r[0] == "default" and r[1] == seed:
                rows[("none", str(seed), str(r[2]))] = ["none", seed, r[2], *r[3:11]]
        for setting in SETTINGS:
            r = judge_net(CadsUNet(net, schedule.num_steps, setting, seed), schedule, sampler, seed, data, judges)
            m, s = r["mnistm"], r["svhn"]
            row = [
                "τ1 {} τ2 {} s {} ψ {}".format(*setting), seed, args.guidance, m["acc"], s["acc"],
                round(m["fid_independent"], 2), round(s["fid_independent"], 2), round(m["fid_judge"], 2),
                round(s["fid_judge"], 2), round(m["recall_independent"], 2), round(s["recall_independent"], 2),
            ]  # fmt: skip
            rows[tuple(map(str, row[:3]))] = row
            print(row, flush=True)
            write_results(
                "digits_cads",
                ["CADS", "seed", "digit guidance", "MNIST-M acc", "SVHN acc", "FID/floor indep. MNIST-M",
                 "FID/floor indep. SVHN", "FID/floor judge MNIST-M", "FID/floor judge SVHN",
                 "recall/floor indep. MNIST-M", "recall/floor indep. SVHN"],  # fmt: skip
                sorted(rows.values(), key=lambda r: (r[1], r[0] != "none", r[0], r[2])),
                "The default recipe's checkpoint of each seed, DDIM-10 (η = 1, trailing), 20 passes per image, "
                "sampled in fp32; 2,000 digits per domain. 'none': the plain sampler at each guidance, from "
                "digits_guidance.md (sampled in the precision `auto` chose, within its tolerance of fp32).",
            )  # fmt: skip


if __name__ == "__main__":
    main()
