"""DDIM with the HW2 convention on any `EpsModel`: fixed-noise sampling, η grids, noise interpolation,
inversion and a low-precision check. The math lives in `difflab.samplers`; this module batches and wires it.

Convention (spec §2): linear β 1e-4..2e-2 over 1000 steps, 50 steps 981, 961, ..., 1, ᾱ_prev = ᾱ_0 at the last
step, x̂_0 clipped to [-1, 1] -- the same as diffusers' DDIMScheduler(set_alpha_to_one=False, steps_offset=1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.ddim.models import EpsModel
from difflab.ddim.noise import list_noise_files, load_image_tensor, load_noises, minmax_uint8, save_noise, write_pngs
from difflab.samplers import ddim_invert, ddim_timesteps, sample
from difflab.schedule import NoiseSchedule
from difflab.utils import DifflabError, to_uint8


@dataclass(frozen=True)
class DDIMConfig:
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 8
    seed: int = 0
    clip_x0: bool = True


FACE_SIZE = 256  # the course face UNet's images; other nets carry their own size


def spec_schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear", 1000, 1e-4, 2e-2)


def draw_noises(
    model: EpsModel, names: Sequence[str], seed: int, out_dir: str | os.PathLike | None = None, size: int | None = None
) -> torch.Tensor:
    """Seeded standard-normal noises, one per name, shaped for `model` (its own image size, else `size` or
    the face UNet's 256); saved as `<out_dir>/<name>.pt` so a run can be repeated with `--noise-dir`."""
    size = size or model.sample_size or FACE_SIZE
    generator = torch.Generator().manual_seed(seed)
    noises = torch.randn(len(names), model.channels, size, size, generator=generator)
    model.check_input(tuple(noises.shape), f"--size {size}")
    if out_dir is not None:
        for name, noise in zip(names, noises):
            save_noise(noise[None], Path(out_dir) / f"{name}.pt")
    return noises


def ddim_sample(
    model: EpsModel,
    noises: torch.Tensor,
    config: DDIMConfig = DDIMConfig(),
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise (N, C, H, W) noises in batches; returns float32 images on the CPU (about [-1, 1]).
    Fresh noise for η > 0 comes from `generator` (default: seeded from `config.seed`). `on_step(i, t, x)` sees
    each batch's x after step i (at timestep t)."""
    eta = config.eta if eta is None else eta
    if eta < 0:
        raise DifflabError(f"eta must be >= 0, got {eta}")
    model.check_input(tuple(noises.shape), "noise")
    schedule = model.schedule or spec_schedule()
    try:
        timesteps = ddim_timesteps(schedule.num_steps, config.steps)
    except ValueError as e:
        raise DifflabError(f"--steps: {e}") from None
    generator = generator or torch.Generator().manual_seed(config.seed)
    chunks = noises.split(config.batch_size)
    out = []
    for chunk in tqdm(chunks, desc=f"DDIM η={eta:g}", unit="batch", disable=not progress or len(chunks) == 1):
        result = sample(
            model.eps_fn(len(chunk)),
            chunk.to(model.device),
            schedule,
            timesteps,
            method="ddim",
            eta=eta,
            clip_x0=config.clip_x0,
            final_alpha=None,
            generator=generator,
            progress=progress,
            on_step=on_step,
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def sample_noise_folder(
    model: EpsModel,
    noise_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DDIMConfig = DDIMConfig(),
    progress: bool = True,
) -> list[Path]:
    """`<noise_dir>/NN.pt` -> `<out_dir>/NN.png` (min-max normalised per image), all noises batched."""
    files = list_noise_files(noise_dir)
    noises = load_noises(files, model.channels)
    model.check_input(tuple(noises.shape), str(files[0]))
    images = ddim_sample(model, noises, config, progress=progress)
    return write_pngs(images, [f.stem for f in files], out_dir)


def sample_seeded(
    model: EpsModel,
    count: int,
    noise_seed: int,
    out_dir: str | os.PathLike,
    config: DDIMConfig = DDIMConfig(),
    size: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Like `sample_noise_folder` without a noise folder: `count` noises drawn from `noise_seed`, kept in
    `<out_dir>/noise/NN.pt` for reuse, images in `<out_dir>/NN.png`."""
    names = [f"{i:02d}" for i in range(count)]
    noises = draw_noises(model, names, noise_seed, Path(out_dir) / "noise", size)
    return write_pngs(ddim_sample(model, noises, config, progress=progress), names, out_dir)


def eta_grid(
    model: EpsModel,
    noises: torch.Tensor,
    etas: Sequence[float],
    config: DDIMConfig = DDIMConfig(),
    progress: bool = True,
) -> torch.Tensor:
    """Images for every (noise, η) pair, shaped (len(noises), len(etas), C, H, W); one seeded generator
    for the whole grid, so a seed gives the same figure."""
    generator = torch.Generator().manual_seed(config.seed)
    columns = [ddim_sample(model, noises, config, eta=eta, generator=generator, progress=progress) for eta in etas]
    return torch.stack(columns, dim=1)


def lerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * x0 + alpha * x1


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    """sin((1-α)θ)/sin θ · x0 + sin(αθ)/sin θ · x1, θ the angle between the flattened tensors
    (falls back to lerp when they are parallel, where the formula is 0/0)."""
    a, b = x0.double().flatten(), x1.double().flatten()
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos).item()
    if math.sin(theta) < 1e-6:
        return lerp(x0, x1, alpha)
    w0, w1 = math.sin((1 - alpha) * theta) / math.sin(theta), math.sin(alpha * theta) / math.sin(theta)
    return (w0 * x0.double() + w1 * x1.double()).to(x0.dtype)


INTERPOLATIONS = {"lerp": lerp, "slerp": slerp}


def interpolate(
    model: EpsModel,
    x0: torch.Tensor,
    x1: torch.Tensor,
    methods: Sequence[str],
    alphas: Sequence[float],
    config: DDIMConfig = DDIMConfig(),
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """DDIM images of the interpolated noises, one (len(alphas), C, H, W) strip per method, all in one batch run."""
    for m in methods:
        if m not in INTERPOLATIONS:
            raise DifflabError(f"unknown interpolation {m!r}; choose {', '.join(INTERPOLATIONS)}")
    noises = torch.cat([INTERPOLATIONS[m](x0, x1, a) for m in methods for a in alphas])
    images = ddim_sample(model, noises, config, progress=progress)
    return dict(zip(methods, images.split(len(alphas))))


@dataclass
class InversionResult:
    noise: torch.Tensor
    reconstruction: torch.Tensor
    mse: float
    """MSE (0-255 scale) between the image and the reconstruction mapped from [-1, 1] to 8 bits."""
    mse_minmax: float
    """The same, with the reconstruction written the way `ddim sample` writes it (per-image min-max)."""


def invert_image(
    model: EpsModel,
    image: str | os.PathLike,
    out: str | os.PathLike | None = None,
    config: DDIMConfig = DDIMConfig(),
    progress: bool = True,
) -> InversionResult:
    """Deterministic DDIM inversion: image -> x_T, then sample x_T back and measure how close it came."""
    x0 = load_image_tensor(image)
    model.check_input(tuple(x0.shape), str(image))
    schedule = model.schedule or spec_schedule()
    timesteps = ddim_timesteps(schedule.num_steps, config.steps)
    noise = ddim_invert(model.eps_fn(1), x0.to(model.device), schedule, timesteps, progress=progress).float().cpu()
    if out is not None:
        save_noise(noise, out)
    back = ddim_sample(model, noise, config, eta=0.0, progress=progress)
    target = to_uint8(x0).astype(np.float64)
    mse = float(((to_uint8(back).astype(np.float64) - target) ** 2).mean())
    mse_minmax = float(((minmax_uint8(back).astype(np.float64) - target) ** 2).mean())
    return InversionResult(noise, back, mse, mse_minmax)


def precision_mse(
    reference: EpsModel, low: EpsModel, noises: torch.Tensor, config: DDIMConfig = DDIMConfig(), progress: bool = True
) -> list[float]:
    """Per-image MSE (0-255, as graded) between η = 0 images of a float32 model and the same model under
    autocast; the low-precision path is acceptable when every value stays below 1."""
    a = minmax_uint8(ddim_sample(reference, noises, config, eta=0.0, progress=progress)).astype(np.float64)
    b = minmax_uint8(ddim_sample(low, noises, config, eta=0.0, progress=progress)).astype(np.float64)
    return [float(v) for v in ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)]
