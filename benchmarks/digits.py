"""Digits benchmarks: sampling throughput of our batched-CFG DDIM vs a diffusers DDIMScheduler loop with two
forwards per step, the training-step time (fp32 vs bf16 autocast), and accuracy vs sampling steps when a
trained checkpoint and classifiers exist (e.g. after `make demo`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402
from difflab.digits.model import ScheduleConfig, load_digits_model  # noqa: E402
from difflab.digits.sample import SampleConfig, guided_digits_eps, make_conds, write_course_layout  # noqa: E402
from difflab.digits.train import PRESETS  # noqa: E402
from difflab.nets.digits_unet import DigitsUNet  # noqa: E402
from difflab.samplers import ddim_timesteps, sample  # noqa: E402
from difflab.schedule import NoiseSchedule  # noqa: E402


def diffusers_cfg_loop(net, x, cond, uncond, scale, steps, num_train_timesteps):
    """How a diffusers user writes CFG: a DDIMScheduler and two forwards (cond, uncond) per step."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=1,
    )
    sch.set_timesteps(steps)
    for t in sch.timesteps:
        tt = t.repeat(len(x))
        e_c, e_u = net(x, tt, cond), net(x, tt, uncond)
        x = sch.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return x


def sampling_rows(net, sched: NoiseSchedule, n, steps, scale):
    x = torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    cond = make_conds([0] * n, [i % 10 for i in range(n)])
    uncond = cond.clone()
    uncond[:, 1] = net.null_cond[1]
    ts = ddim_timesteps(sched.num_steps, steps)
    rows = []
    with torch.inference_mode():
        ref = diffusers_cfg_loop(net, x, cond, uncond, scale, steps, sched.num_steps)
        theirs = best_time(
            lambda: diffusers_cfg_loop(net, x, cond, uncond, scale, steps, sched.num_steps), repeats=2, warmup=0
        )
        ours_fn = lambda: sample(guided_digits_eps(net, cond, scale, 1.0), x, sched, ts)  # noqa: E731
        diff = (ours_fn().images - ref).abs().max().item()
        ours = best_time(ours_fn, repeats=2, warmup=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16 = best_time(ours_fn, repeats=2, warmup=0)
    rows.append(["sampling", "diffusers DDIMScheduler, 2 forwards/step, fp32", n / theirs, 1.0, ""])
    rows.append(
        [
            "sampling",
            "difflab, 1 batched forward/step, fp32",
            n / ours,
            theirs / ours,
            f"max abs diff vs diffusers {diff:.1e}",
        ]
    )
    rows.append(["sampling", "difflab, 1 batched forward/step, bf16 autocast", n / ours_bf16, theirs / ours_bf16, ""])
    return rows


def train_rows(net, batch):
    sched = ScheduleConfig().build()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.rand(batch, 3, 28, 28) * 2 - 1
    cond = make_conds([0] * batch, [i % 10 for i in range(batch)])

    def step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sched.training_loss(lambda xx, t: net(xx, t, cond), x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    fp32 = best_time(lambda: step(False), repeats=3)
    bf16 = best_time(lambda: step(True), repeats=3)
    return [
        ["train step", f"AdamW, batch {batch}, fp32", 1 / fp32, 1.0, f"{fp32:.3f} s/step"],
        ["train step", f"AdamW, batch {batch}, bf16 autocast", 1 / bf16, fp32 / bf16, f"{bf16:.3f} s/step"],
    ]


def accuracy_rows(ckpt: Path, classifiers: Path, per_digit: int):
    from difflab.digits.evaluate import evaluate_folder

    net, sched, model_config = load_digits_model(ckpt)
    rows = []
    variants = [("ddpm", sched.num_steps), ("ddim", 100), ("ddim", 50), ("ddim", 25), ("ddim", 10)]
    for method, steps in variants:
        cfg = SampleConfig(method=method, steps=steps).for_model(model_config)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_course_layout(net, sched, tmp, cfg, torch.device("cpu"), per_digit)
            seconds = time.perf_counter() - start
            result = evaluate_folder(tmp, classifiers, Path(tmp) / "eval")
        d = result["domains"]
        rows.append(
            [
                "accuracy",
                f"{method.upper()}-{steps}, guidance {cfg.guidance_digit}",
                20 * per_digit / seconds,
                result["accuracy"],
                f"MNIST-M {d['mnistm']['accuracy']:.3f}, SVHN {d['svhn']['accuracy']:.3f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", type=Path, default=Path("runs/demo/model"))
    p.add_argument("--classifiers", type=Path, default=Path("runs/demo/classifiers"))
    p.add_argument("--per-digit", type=int, default=10, help="images per digit and domain for the accuracy sweep")
    p.add_argument("--n", type=int, default=100, help="images for the throughput comparison")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    trained = (args.ckpt / "model.safetensors").is_file() and (args.classifiers / "svhn.safetensors").is_file()
    # A trained net for the sampler comparison when there is one: with random weights the reverse process
    # amplifies rounding differences (diffusers keeps ᾱ in float32) and the max-diff column means little.
    if trained:
        net, sched, _ = load_digits_model(args.ckpt)
    else:
        net, sched = DigitsUNet(PRESETS["cpu"]).eval(), ScheduleConfig().build()
    rows = sampling_rows(net, sched, args.n, args.steps, scale=5.0)
    rows += train_rows(DigitsUNet(PRESETS["cpu"]), 128)
    notes = (
        f"Preset 'cpu' network ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params). Sampling: "
        f"{args.n} images, DDIM-{args.steps}, digit guidance 5, {'trained' if trained else 'random-weight'} net; "
        "'rate' is images/s (train: steps/s); "
        "'vs baseline' is the speed-up over the first row of its group, or the mean accuracy for accuracy rows."
    )
    if trained:
        rows += accuracy_rows(args.ckpt, args.classifiers, args.per_digit)
        notes += f" Accuracy rows: {args.ckpt}, {args.per_digit} images per digit and domain."
    else:
        notes += f" Accuracy rows skipped: no checkpoint at {args.ckpt} (run `make demo` first)."
    write_results("digits", ["what", "variant", "rate", "vs baseline", "note"], rows, notes)


if __name__ == "__main__":
    main()
