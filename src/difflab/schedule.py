"""The diffusion math, written once: noise schedules (optionally rescaled to zero terminal SNR), the forward
process, the ε / v training loss with min-SNR weighting and its timestep density, and v -> ε, v -> x̂_0.

Everything that needs ᾱ_t (training, every sampler, inversion) reads it from a `NoiseSchedule`.
Schedules are computed in float64 and cast where used, so long products stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network as samplers see it: (x_t of shape (B,...), integer timesteps of shape (B,)) -> predicted noise
(or v, for a schedule whose `prediction` is "v_prediction")."""

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' `prediction_type` names


def make_betas(
    kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> torch.Tensor:
    """β_1..β_T in float64. `scaled_linear` is Stable Diffusion's (linear in √β); `cosine` is
    Nichol & Dhariwal's ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) with β capped at 0.999."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose √ᾱ_t is shifted to end at 0 and scaled to keep √ᾱ_1 (Lin et al. 2023, "Common diffusion noise
    schedules and sample steps are flawed", Algorithm 1), so that x_T holds none of the image, as the pure noise
    that sampling starts from holds none: ᾱ_T = 0, β_T = 1."""
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].item(), root[-1].item()
    alpha_bar = ((root - last) * first / (first - last)) ** 2
    alpha_bar[-1] = 0.0  # exactly, not a rounding residue
    return 1.0 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


@dataclass(frozen=True)
class NoiseSchedule:
    """β_t and ᾱ_t, and what the network predicts (as diffusers' schedulers carry `prediction_type`)."""

    betas: torch.Tensor
    prediction: str = "epsilon"
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = self.betas.to(torch.float64)
        # β = 1 (ᾱ = 0: x_t is pure noise) only at the last step, as in a zero-terminal-SNR schedule
        if betas.ndim != 1 or not bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all() and 0 < betas[-1] <= 1):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1), the last in (0, 1]")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))
        # At SNR 0 the ε target is x_t itself: an ε-network's output says nothing about x_0 there.
        if self.zero_terminal_snr and self.prediction != "v_prediction":
            raise ValueError(f"a zero terminal SNR schedule needs v_prediction, not {self.prediction!r}")

    @classmethod
    def make(
        cls,
        kind: str = "linear",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        prediction: str = "epsilon",
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """`zero_terminal_snr` rescales the betas (`rescale_zero_terminal_snr`); it needs v-prediction."""
        betas = make_betas(kind, num_steps, beta_start, beta_end)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, prediction)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether x_T is pure noise: ᾱ_T = 0 (β_T = 1)."""
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t gathered for integer timesteps `t` (scalar or (B,)), shaped to broadcast against `like`.
        t = -1 means "before the first step": ᾱ = 1."""
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        ab = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])[t + 1]
        return ab.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target of Salimans & Ho: v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def to_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, output: torch.Tensor) -> torch.Tensor:
        """The ε implied by a network output: the output itself, or √ᾱ_t v + √(1−ᾱ_t) x_t for v-prediction.
        Linear in the output, so guidance may combine raw outputs before this."""
        if self.prediction == "epsilon":
            return output
        ab = self.alpha_bar(t, x_t)
        return ab.sqrt() * output + (1 - ab).sqrt() * x_t

    def v_to_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v, exact also at ᾱ_t = 0, where the ε implied by v is x_t itself and says
        nothing of x_0."""
        ab = self.alpha_bar(t, x_t)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * v

    def sample_timesteps(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        density: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Uniform timesteps, or drawn from `density` (T probabilities, e.g. `min_snr_density`)."""
        if density is None:
            return torch.randint(0, self.num_steps, (batch,), generator=generator).to(device)
        return torch.multinomial(density, batch, replacement=True, generator=generator).to(device)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t.cpu().long()]
        return (ab / (1 - ab)).to(t.device)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """The per-sample loss weight that makes the implied x_0 loss weighted by min(SNR_t, γ) (Hang et al.,
        2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
        snr = self.snr(t)
        return snr.clamp(max=gamma) / (snr if self.prediction == "epsilon" else snr + 1)

    def min_snr_density(self, gamma: float) -> torch.Tensor:
        """Timestep probabilities proportional to the min-SNR weight. Drawing t from it and passing it as
        `density` to `training_loss` keeps the min-SNR objective but spends no samples on timesteps it
        nearly ignores (for v-prediction the weight is ~0 at both ends): a lower-variance gradient."""
        w = self.min_snr_weight(torch.arange(self.num_steps), gamma).float()
        return w / w.sum()

    def training_loss(
        self,
        eps_fn: EpsFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        min_snr_gamma: float | None = None,
        density: torch.Tensor | None = None,
        target_shift: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The simple loss of Ho et al., ‖ε − ε_θ(√ᾱ x_0 + √(1−ᾱ) ε, t)‖², or for a v-prediction schedule
        its twin ‖v − v_θ‖² (`eps_fn` then returns v). `target_shift(x_t, t, prediction)` is added to the target
        (model guidance's term; it is held constant).

        `min_snr_gamma` weights each sample by `min_snr_weight`: the many nearly-clean timesteps then stop
        dominating the gradient, which speeds up convergence. `density` says that `t` was drawn from it rather
        than uniformly; each sample is then divided by T·density[t], so the expected loss is the same."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator, density)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        target = noise if self.prediction == "epsilon" else self.velocity(x0, t, noise)
        x_t = self.q_sample(x0, t, noise)
        pred = eps_fn(x_t, t)
        if target_shift is not None:
            target = target.float() + target_shift(x_t, t, pred)
        if min_snr_gamma is None and density is None:
            return F.mse_loss(pred.float(), target.float())
        weight = torch.ones(len(t), device=t.device)
        if min_snr_gamma is not None:
            weight = self.min_snr_weight(t, min_snr_gamma).float()
        if density is not None:
            weight = weight / (self.num_steps * density.to(t.device)[t])
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()
