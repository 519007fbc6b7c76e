"""Samplers: pure tensor math for one reverse step (DDPM ancestral, DDIM with η, DPM-Solver++(2M)), and loops
that wire an ε-function to a `NoiseSchedule`. A model knows nothing of sampling; guidance is a wrapper around the model.

Conventions follow diffusers so results can be compared number for number:
- DDPM uses the posterior q(x_{t'} | x_t, x̂_0) with "fixed_small" variance; x̂_0 optionally clipped.
- DDIM uses the unclipped ε for the direction term even when x̂_0 is clipped, and σ_t(η) of Song et al.
- A step whose previous timestep is < 0 uses ᾱ_prev = `final_alpha` (1, or ᾱ_0 as in the HW2 spec).
- A step takes x̂_0 from the network where it predicts v, and forms it from ε otherwise; so a zero-terminal-SNR
  schedule (ᾱ_T = 0, where ε is x_T itself) samples as diffusers' DDIM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from difflab.schedule import EpsFn, NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading", offset: int = 1) -> list[int]:
    """Descending timesteps for a `num_steps`-step sampler.

    "leading" (diffusers' default, steps_offset=1): 981, 961, ..., 1 for 50 of 1000.
    "trailing": ends at T-1, e.g. 999, 979, ..., 19. "linspace": rounded linspace(0, T-1).
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in 1..{num_train_steps}, got {num_steps}")
    if spacing == "leading":
        ratio = num_train_steps // num_steps
        ts = [i * ratio + offset for i in range(num_steps)]
    elif spacing == "trailing":
        ratio = num_train_steps / num_steps
        ts = [round(num_train_steps - i * ratio) - 1 for i in range(num_steps)][::-1]
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train_steps - 1, num_steps).round().long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    if ts[-1] >= num_train_steps:
        raise ValueError(f"offset {offset} pushes timesteps past {num_train_steps - 1}")
    return sorted(ts, reverse=True)


def _alpha_bar(schedule: NoiseSchedule, t: int, final_alpha: float | None) -> float:
    """ᾱ_t as a Python float (double precision): step coefficients such as 1 − ᾱ_t/ᾱ_prev cancel badly
    in float32 near t = 0, so they are formed in float64 and only then meet the float32 sample."""
    if t >= 0:
        return float(schedule.alphas_cumprod[t])
    return float(schedule.alphas_cumprod[0]) if final_alpha is None else float(final_alpha)


def _predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab_t: float) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, the clean sample every step and the inversion start from."""
    return (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5


def ddim_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
    final_alpha: float | None = 1.0,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev}; returns (x_prev, x̂_0). `final_alpha=None` means ᾱ_0. `x0`: x̂_0 as the
    network gave it (v-prediction); by default it is formed from ε."""
    ab_t, ab_prev = _alpha_bar(schedule, t, 1.0), _alpha_bar(schedule, t_prev, final_alpha)
    x0 = _predict_x0(x_t, eps, ab_t) if x0 is None else x0
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5
    x_prev = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddpm_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from the posterior q(x_{t_prev} | x_t, x̂_0); t_prev may skip steps. `x0` as in
    `ddim_step`."""
    ab_t, ab_prev = _alpha_bar(schedule, t, 1.0), _alpha_bar(schedule, t_prev, 1.0)
    beta_t = 1 - ab_t / ab_prev
    x0 = _predict_x0(x_t, eps, ab_t) if x0 is None else x0
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x_t
    if t > 0:
        if noise is None:
            raise ValueError("a DDPM step with t > 0 needs a noise tensor")
        mean = mean + max((1 - ab_prev) / (1 - ab_t) * beta_t, 1e-20) ** 0.5 * noise
    return mean, x0


def _half_log_snr(ab: float) -> float:
    """λ = log(α/σ) = ½ log(ᾱ / (1 − ᾱ)), the time variable of DPM-Solver. ᾱ is floored at 2^-24, where
    diffusers' DPM-Solver floors a zero-terminal-SNR schedule's ᾱ_T = 0 (λ = −∞) too."""
    ab = max(ab, 2.0**-24)
    return 0.5 * math.log(ab / (1 - ab))


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    previous: tuple[int, torch.Tensor] | None = None,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step x_t -> x_{t_prev} (Lu et al., 2022; diffusers' DPMSolverMultistepScheduler with
    its defaults: data prediction, midpoint, first order at the first and at the last step, which goes to
    σ = 0). `previous` = (the timestep before t, the x̂_0 predicted there) enables the second-order
    correction; returns (x_prev, x̂_0). `x0` as in `ddim_step`."""
    ab_t = _alpha_bar(schedule, t, 1.0)
    x0 = _predict_x0(x_t, eps, ab_t) if x0 is None else x0
    ab_prev = _alpha_bar(schedule, t_prev, 1.0)
    if ab_prev >= 1.0:  # the final step to σ = 0 lands on x̂_0 itself
        return x0, x0
    lam_t, lam_prev = _half_log_snr(ab_t), _half_log_snr(ab_prev)
    h = lam_prev - lam_t
    decay = math.expm1(-h)  # e^{-h} - 1
    d = x0
    if previous is not None:
        t_before, x0_before = previous
        r = (lam_t - _half_log_snr(_alpha_bar(schedule, t_before, 1.0))) / h
        d = x0 + (x0 - x0_before) / (2 * r)
    x_prev = ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * x_t - ab_prev**0.5 * decay * d
    return x_prev, x0


def ddim_invert_step(
    schedule: NoiseSchedule, eps: torch.Tensor, x_t: torch.Tensor, t: int, t_next: int
) -> torch.Tensor:
    """Deterministic DDIM run backwards: x_t -> x_{t_next} with t_next > t (t = -1 is the clean image)."""
    ab_t, ab_next = _alpha_bar(schedule, t, 1.0), _alpha_bar(schedule, t_next, 1.0)
    x0 = _predict_x0(x_t, eps, ab_t)
    return ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * eps


def _predict(
    model_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ε at x_t for a network that predicts what `schedule.prediction` says (ε or v), and x̂_0 where it predicts v."""
    out = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
    x0 = schedule.v_to_x0(x, t, out) if schedule.prediction == "v_prediction" else None
    return schedule.to_eps(x, t, out), x0


METHODS = ("ddim", "ddpm", "dpm++2m")


@dataclass
class SampleResult:
    images: torch.Tensor
    trajectory: dict[int, torch.Tensor] = field(default_factory=dict)
    """x_t (on CPU) before the step at each captured timestep t; key -1 holds the final image."""


@torch.inference_mode()
def sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | None = None,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    clip_x0: bool = True,
    final_alpha: float | None = 1.0,
    generator: torch.Generator | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    capture: Iterable[int] | str | None = None,
    progress: bool = False,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> SampleResult:
    """Run a reverse process from x_T over descending `timesteps` (default: all T steps).

    method: "ddim" (η knob), "ddpm" (ancestral) or "dpm++2m" (DPM-Solver++(2M), deterministic, few steps;
    the last step goes to σ = 0 whatever `final_alpha`). Fresh noise comes from `generator` (drawn on CPU so a
    seed gives the same images on every device) unless `step_noise[i]` is given for step i.
    capture: timesteps whose x_t to keep, or "all".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    ts = list(range(schedule.num_steps - 1, -1, -1)) if timesteps is None else [int(t) for t in timesteps]
    keep = set(ts) if capture == "all" else set(capture or ())
    x = x_T
    result = SampleResult(images=x_T)
    stochastic = method == "ddpm" or (method == "ddim" and eta > 0)
    previous = None
    for i, t in enumerate(tqdm(ts, desc=f"{method} sampling", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        if t in keep:
            result.trajectory[t] = x.detach().float().cpu()
        eps, x0 = _predict(eps_fn, schedule, x, t)
        noise = None
        if stochastic and (method == "ddim" or t > 0):
            noise = (
                step_noise[i] if step_noise is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype)
            )
            noise = noise.to(x.device, x.dtype)
        if method == "ddim":
            x, _ = ddim_step(schedule, eps, x, t, t_prev, eta, noise, clip_x0, final_alpha, x0)
        elif method == "dpm++2m":
            x, x0 = dpmpp_2m_step(schedule, eps, x, t, t_prev, previous, x0)
            previous = (t, x0)
        else:
            x, _ = ddpm_step(schedule, eps, x, t, t_prev, noise, clip_x0, x0)
        if on_step is not None:
            on_step(i, t, x)
    if keep:
        result.trajectory[-1] = x.detach().float().cpu()
    result.images = x
    return result


@torch.inference_mode()
def ddim_invert(
    eps_fn: EpsFn, x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], progress: bool = False
) -> torch.Tensor:
    """Map a clean image to the x_T that deterministic DDIM over `timesteps` (descending) brings back to it."""
    ascending = sorted(int(t) for t in timesteps)
    x = x0
    t_cur = -1
    for t_next in tqdm(ascending, desc="ddim inversion", disable=not progress, leave=False):
        # The sampler will use ε(x_{t_next}, t_next) for this step; x_{t_next} is unknown yet, so x_t stands in.
        eps, _ = _predict(eps_fn, schedule, x, t_next)
        x = ddim_invert_step(schedule, eps, x, t_cur, t_next)
        t_cur = t_next
    return x


def guided(model: Callable[..., torch.Tensor], conds: Sequence[torch.Tensor], weights: Sequence[float]) -> EpsFn:
    """Classifier-free guidance as one batched forward: ε = Σ_i w_i · model(x, t, cond_i).

    The weights sum to 1. Classic CFG with scale s is conds=[c, ∅], weights=[s, 1 - s]; branches with
    weight 0 are dropped so they cost nothing.
    """
    if len(conds) != len(weights) or not conds:
        raise ValueError("need one weight per condition")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"guidance weights must sum to 1, got {sum(weights)}")
    branches = [(c, w) for c, w in zip(conds, weights) if w != 0]
    cond_batch = torch.cat([c for c, _ in branches])
    n = len(branches)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x.repeat(n, *([1] * (x.ndim - 1))), t.repeat(n), cond_batch).float()
        return sum(w * part for (_, w), part in zip(branches, out.chunk(n)))

    return eps_fn


def cfg(model: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> EpsFn:
    """Classic classifier-free guidance ε_∅ + s(ε_c − ε_∅), cond and uncond in one forward."""
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)
    return guided(model, [cond, uncond], [scale, 1.0 - scale])
