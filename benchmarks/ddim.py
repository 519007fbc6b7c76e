"""DDIM speed: difflab's batched 50-step sampler vs a diffusers DDIMScheduler loop over the same face UNet.

CPU: the full-width face UNet (113.7 M parameters, random weights) at 32x32, batch 2 -- 64x64 costs minutes per
run on two cores. GPU: 256x256 (the real size), batch 8, plus difflab's fp16 autocast + channels-last path and
its η = 0 MSE against float32 (the `ddim precision-check` criterion: below 1 on the 0-255 scale).
Run: .venv/bin/python benchmarks/ddim.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402
from difflab.ddim.models import face_eps_model  # noqa: E402
from difflab.ddim.noise import minmax_uint8  # noqa: E402
from difflab.ddim.pipeline import DDIMConfig, ddim_sample  # noqa: E402
from difflab.nets.face_unet import FaceUNet  # noqa: E402
from difflab.precision import Precision  # noqa: E402

STEPS = 50


def diffusers_loop(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True, set_alpha_to_one=False, steps_offset=1
    )
    sch.set_timesteps(STEPS)
    with torch.inference_mode():
        for t in sch.timesteps:
            x = sch.step(net(x, t.repeat(len(x)).to(x.device)), t, x, eta=0.0).prev_sample
    return x


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, batch, repeats = (256, 8, 2) if cuda else (32, 1, 2)
    torch.manual_seed(0)
    net = FaceUNet().eval().to(device)
    x_T = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    cfg = DDIMConfig(steps=STEPS, batch_size=batch)

    loops = {
        "diffusers": lambda: diffusers_loop(net, x_T.clone()).cpu(),
        "ours": lambda: ddim_sample(
            face_eps_model(net, Path("<memory>"), device, Precision("fp32")), x_T.clone(), cfg, progress=False
        ),
    }
    if cuda:
        # A copy: channels-last conversion works in place.
        fast = face_eps_model(copy.deepcopy(net), Path("<memory>"), device, Precision("fp16", channels_last=True))
        loops["fast"] = lambda: ddim_sample(fast, x_T.clone(), cfg, progress=False)
    with torch.inference_mode():  # warm up kernels once, outside the timings
        net(x_T, torch.full((batch,), 981, device=device))
    results, times = {}, {name: [] for name in loops}
    for _ in range(repeats):  # interleaved, so a busy spell of the machine hits every loop alike
        for name, fn in loops.items():
            times[name].append(best_time(lambda: results.__setitem__(name, fn()), repeats=1, warmup=1 if cuda else 0))
    t_diff, t_ours = min(times["diffusers"]), min(times["ours"])
    rows = [
        ["diffusers DDIMScheduler loop, fp32", size, batch, batch / t_diff, 1.0],
        ["difflab ddim_sample, fp32", size, batch, batch / t_ours, t_diff / t_ours],
    ]
    extra = {
        "seconds": times,
        "max_abs_diff_ours_vs_diffusers": float((results["ours"] - results["diffusers"]).abs().max()),
    }
    if cuda:
        t_fast = min(times["fast"])
        rows.append(
            ["difflab ddim_sample, fp16 autocast + channels_last", size, batch, batch / t_fast, t_diff / t_fast]
        )
        a, b = minmax_uint8(results["ours"]).astype(np.float64), minmax_uint8(results["fast"]).astype(np.float64)
        extra["fp16_vs_fp32_per_image_mse"] = ((a - b) ** 2).reshape(batch, -1).mean(axis=1).tolist()
    notes = (
        f"{STEPS} DDIM steps, η = 0, random-weight face UNet (113.7 M params), best of {repeats} interleaved runs. "
        "Both loops call the same network, so on CPU the ratio can only reflect sampler overhead (expected ≈ 1); "
        "on a shared, busy machine it mostly shows timing noise. "
        f"Max |ours - diffusers| on the final images: {extra['max_abs_diff_ours_vs_diffusers']:.2e} "
        "(float32 ᾱ in diffusers vs float64 in difflab, amplified by a random net)."
    )
    write_results("ddim", ["sampler", "size", "batch", "images/s", "speed vs diffusers"], rows, notes, extra)


if __name__ == "__main__":
    main()
