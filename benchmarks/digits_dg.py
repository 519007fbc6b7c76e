"""Discriminator guidance (Kim et al. 2023) on the default recipe's checkpoints: does a small discriminator of real
against generated noisy digits lift the frontier of digits_guidance.py (accuracy against Fréchet distance)?

A discriminator d(x_t, t, domain, digit) learns real training digits diffused to t (label 1) against the sampler's
own states x_t at its timesteps (label 0), drawn from noises no measured image uses, at the guidance it will correct.
Sampling then adds w·∇ log(d / (1 − d)) to the model's score: ε̂ = ε − w·√(1 − ᾱ_t)·∇_x logit d. The sampler's
states rather than diffused generated digits: a 10-step sampler's x_t is not the forward process's, and these are the
inputs the discriminator is asked about. Every FLOP is counted by torch's counter: the fakes' sampling and the
discriminator's training (auxiliary compute), its forward and backward at each sampling step (per image).
Rows with w = 0 are the same sampler without the discriminator, on the same noises. Sampled in fp32.

    python benchmarks/digits_dg.py --seeds 0 1 2 --guidance 2 --weights 0 1 2 4 --threads 1
    python benchmarks/digits_dg.py --seeds 0 1 2 --guidance 2 --weights 2 --width 16 --steps 600 \
        --fake-per-digit 40 --name digits_dg_budget   # 4.6 TFLOP: within a 45-TFLOP budget beside a 40-TFLOP model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from difflab.digits.data import DOMAINS  # noqa: E402
from difflab.digits.model import load_digits_model  # noqa: E402
from difflab.digits.sample import (  # noqa: E402
    ImageNoise,
    SampleConfig,
    course_plan,
    guided_digits_eps,
    image_generators,
    image_seed,
    plan_conds,
)
from difflab.digits.train import load_training_set  # noqa: E402
from difflab.nets.digits_unet import sinusoidal_embedding  # noqa: E402
from difflab.samplers import sample  # noqa: E402
from difflab.utils import count_flops, to_uint8  # noqa: E402
from digits_seeds import QUALITY_PER_DIGIT, data_and_judges, judge_images, trained  # noqa: E402

FAKE_SEED = 10_000  # added to the run's seed for the discriminator's fakes: no measured image draws from their noises
CHECK_SEED = 20_000  # and for the fakes its held-out accuracy is read on


class Discriminator(nn.Module):
    """Three conv stages (28, 14, 7 pixels) modulated by the timestep and the (domain, digit) pair, pooled; the logit
    is a linear read-out plus a projection onto the pair's embedding (Miyato & Koyama 2018)."""

    def __init__(self, width: int, emb_dim: int = 64, pairs: int = 2 * 10):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pair_emb = nn.Embedding(pairs, emb_dim)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        ins = (width, *widths[:-1])
        self.films = nn.ModuleList(nn.Linear(emb_dim, 2 * c) for c in ins)
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in ins)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, o, 3, stride=1 if i == 0 else 2, padding=1) for i, (c, o) in enumerate(zip(ins, widths))
        )
        self.out_norm = nn.GroupNorm(8, widths[-1])
        self.head = nn.Linear(widths[-1], 1)
        self.projection = nn.Embedding(pairs, widths[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        pair = cond[:, 0] * 10 + cond[:, 1]
        emb = F.silu(self.time_mlp(sinusoidal_embedding(t, self.emb_dim)) + self.pair_emb(pair))
        h = self.stem(x)
        for film, norm, conv in zip(self.films, self.norms, self.convs):
            scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)
            h = conv(F.silu(norm(h) * (1 + scale) + shift))
        f = F.silu(self.out_norm(h)).mean((2, 3))
        return self.head(f)[:, 0] + (self.projection(pair) * f).sum(1)


def discriminator_guided(eps_fn, disc: Discriminator, cond: torch.Tensor, weight: float, schedule):
    """`eps_fn` with w·√(1 − ᾱ_t)·∇_x logit d taken from its ε (its v moved by that over √ᾱ_t for v-prediction)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = eps_fn(x, t)
        # The sampler runs in inference mode; the gradient needs ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.clone().requires_grad_()
            disc(xg, t.clone(), cond.clone()).sum().backward()
            grad = xg.grad
        ab = schedule.alpha_bar(t, x)
        delta = -weight * (1 - ab).sqrt() * grad
        return out + delta / ab.sqrt() if schedule.prediction == "v_prediction" else out + delta

    return fn


def draw(net, schedule, sampler: SampleConfig, per_digit: int, seed: int, disc=None, weight=0.0, capture=False):
    """The course layout's images (as `course_images` draws them: image n of (domain, digit) from its own noise), with
    discriminator guidance of `weight`; with `capture`, also the states x_t at every sampler timestep."""
    plan, timesteps = course_plan(per_digit), sampler.timesteps(schedule)
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    images, states = [], []
    for start in range(0, len(plan), sampler.batch_size):
        batch = plan[start : start + sampler.batch_size]
        cond = plan_conds(batch)
        noise = ImageNoise(image_generators([image_seed(seed, *image) for image in batch]), len(cond), shape)
        eps_fn = guided_digits_eps(net, cond, sampler.guidance_digit, sampler.guidance_domain, net.null_cond)
        if disc is not None and weight:
            eps_fn = discriminator_guided(eps_fn, disc, cond, weight, schedule)
        res = sample(
            eps_fn, noise.initial(), schedule, timesteps, method=sampler.method, eta=sampler.eta,
            step_noise=noise, capture=timesteps if capture else None,
        )  # fmt: skip
        images.append(res.images.clamp(-1, 1))
        states += [(res.trajectory[t], torch.full((len(cond),), t), cond) for t in timesteps if capture]
    images = torch.cat(images)
    if capture:
        return images, [torch.cat(parts) for parts in zip(*states)]
    return images


def real_digits(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both domains' digits of `split` in [-1, 1], NCHW, with their (domain, digit) pairs."""
    images, conds = load_training_set(str(data), split)
    return images.float() / 127.5 - 1, conds


def real_and_fake(reals, fakes, timesteps, schedule, n: int, g: torch.Generator):
    """n real digits diffused to random sampler timesteps and n fake states: (x_t, t, pair, label)."""
    x, c = reals
    i = torch.randint(len(x), (n,), generator=g)
    t = torch.tensor(timesteps)[torch.randint(len(timesteps), (n,), generator=g)]
    x_real = schedule.q_sample(x[i], t, torch.randn(x[i].shape, generator=g))
    j = torch.randint(len(fakes[0]), (n,), generator=g)
    return (
        torch.cat([x_real, fakes[0][j]]), torch.cat([t, fakes[1][j]]), torch.cat([c[i], fakes[2][j]]),
        torch.cat([torch.ones(n), torch.zeros(n)]),
    )  # fmt: skip


def train_discriminator(reals, fakes, timesteps, schedule, args, seed: int) -> tuple[Discriminator, float]:
    """The discriminator and its training TFLOP by torch's counter."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    disc = Discriminator(args.width)
    opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)

    def step() -> None:
        x, t, c, y = real_and_fake(reals, fakes, timesteps, schedule, args.batch // 2, g)
        loss = F.binary_cross_entropy_with_logits(disc(x, t, c), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()

    flops = count_flops(step)
    for _ in range(args.steps - 1):
        step()
    return disc.eval().requires_grad_(False), flops * args.steps / 1e12


def heldout_accuracy(disc, reals, fakes, timesteps, schedule) -> float:
    """How often the discriminator tells a held-out real digit from a held-out fake state."""
    x, t, c, y = real_and_fake(reals, fakes, timesteps, schedule, len(fakes[0]), torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(((disc(x, t, c) > 0).float() == y).float().mean())


def discriminator(net, schedule, sampler: SampleConfig, reals, heldout, args, seed: int):
    """The discriminator for `sampler`'s states, its held-out accuracy and the TFLOP it cost: its fakes' sampling
    and its training."""
    timesteps = sampler.timesteps(schedule)
    with torch.inference_mode():
        fake_flops = count_flops(lambda: draw(net, schedule, sampler, 1, seed))
        fakes = draw(net, schedule, sampler, args.fake_per_digit, seed + FAKE_SEED, capture=True)[1]
        check = draw(net, schedule, sampler, 20, seed + CHECK_SEED, capture=True)[1]
    disc, disc_tflop = train_discriminator(reals, fakes, timesteps, schedule, args, seed)
    accuracy = heldout_accuracy(disc, heldout, check, timesteps, schedule)
    return disc, accuracy, fake_flops * args.fake_per_digit / 1e12 + disc_tflop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--guidance", nargs="+", type=float, default=[2.0, 5.5])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0, 2.0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000, help="discriminator training steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fake-per-digit", type=int, default=100, help="fakes per domain and digit")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="digits_dg", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.name}.json"
    rows = {tuple(map(str, r[:3])): r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for seed in args.seeds:
        data, judges = data_and_judges(seed)
        net, schedule, _ = load_digits_model(trained("default", seed, data)[0], torch.device("cpu"))
        net.requires_grad_(False)
        reals, heldout = real_digits(data, "train"), real_digits(data, "val")
        for guidance in args.guidance:
            sampler = SampleConfig(guidance_digit=guidance)
            disc, accuracy, aux_tflop = None, None, 0.0
            if any(args.weights):
                disc, accuracy, aux_tflop = discriminator(net, schedule, sampler, reals, heldout, args, seed)
            for weight in args.weights:
                with torch.inference_mode():
                    images = draw(net, schedule, sampler, QUALITY_PER_DIGIT, seed, disc, weight)
                    per_image = count_flops(lambda: draw(net, schedule, sampler, 1, seed, disc, weight)) / 20
                pixels = to_uint8(images)
                per_domain = dict(zip(DOMAINS, pixels.reshape(len(DOMAINS), -1, *pixels.shape[1:])))
                r = judge_images(per_domain, data, judges)
                m, s = r["mnistm"], r["svhn"]
                both = lambda key: [round(m[key], 2), round(s[key], 2)]  # noqa: E731
                row = [
                    seed, guidance, weight, m["acc"], s["acc"], round(r["acc"], 4), *both("fid_independent"),
                    *both("fid_judge"), *both("recall_independent"), *both("cas_ratio"),
                    accuracy and round(accuracy, 3), round(aux_tflop, 1), round(per_image / 1e9, 2),
                ]  # fmt: skip
                rows[tuple(map(str, row[:3]))] = row
                print(row, flush=True)
                write_results(
                    args.name,
                    ["seed", "digit guidance", "DG weight", "MNIST-M acc", "SVHN acc", "mean acc",
                     "FID/floor indep. MNIST-M", "FID/floor indep. SVHN", "FID/floor judge MNIST-M",
                     "FID/floor judge SVHN", "recall/floor indep. MNIST-M", "recall/floor indep. SVHN",
                     "CAS/real MNIST-M", "CAS/real SVHN", "discriminator held-out acc", "auxiliary TFLOP",
                     "sampling GFLOP / image"],  # fmt: skip
                    sorted(rows.values(), key=lambda r: (r[0], r[1], r[2])),
                    "The default recipe's checkpoint of each seed, DDIM-10 (η = 1, trailing) at each digit guidance, "
                    "sampled in fp32; 2,000 digits per domain, measured as digits_seeds.md measures. DG weight 0: no "
                    "discriminator. The discriminator of each (seed, guidance): width "
                    f"{args.width}, {args.steps} steps of batch {args.batch} (half real, half fake), AdamW one-cycle "
                    f"to {args.lr}, on {args.fake_per_digit} fakes per domain and digit x 10 sampler states; its "
                    "held-out accuracy is read on the held-out split and 20 fresh fakes per domain and digit. "
                    "Auxiliary TFLOP: the fakes' sampling and the discriminator's training.",
                )  # fmt: skip


if __name__ == "__main__":
    main()
