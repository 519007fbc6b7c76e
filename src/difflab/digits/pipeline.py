"""The digits model as a pipeline in the diffusers style:

    pipe = DigitsPipeline.from_pretrained("runs/demo/model").to("cpu")
    images = pipe(domain="svhn", digit=7, num_images=8, generator=torch.Generator().manual_seed(0)).images

It wires the net, its noise schedule and difflab's samplers (`digits.sample.generate`); it reads nothing but
the model folder. `digits sample --seed S` draws image n of (domain, digit) from the generator seeded
`image_seed(S, domain, digit, n)`: pass those generators (`layout_generators`) to get its images.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from difflab.digits.data import DOMAINS
from difflab.digits.model import load_digits_model
from difflab.digits.sample import (
    ImageNoise,
    SampleConfig,
    generate,
    guided_digits_eps,
    image_generators,
    image_seed,
    make_conds,
)
from difflab.nets.digits_unet import DigitsUNet
from difflab.schedule import NoiseSchedule
from difflab.utils import DifflabError, pick_device, to_uint8

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DigitsPipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor


def layout_generators(seed: int, domain: str | int, digit: int, num_images: int) -> list[torch.Generator]:
    """The generators of the first `num_images` images of (domain, digit) in `digits sample --seed seed`."""
    d = domain if isinstance(domain, int) else DOMAINS.index(domain)
    return image_generators([image_seed(seed, d, digit, n) for n in range(num_images)])


class DigitsPipeline:
    def __init__(self, net: DigitsUNet, schedule: NoiseSchedule, config: SampleConfig | None = None):
        self.net, self.schedule = net.eval(), schedule
        # Built from a net alone, the sampler guides with classifier-free guidance unless told otherwise.
        self.config = (config or SampleConfig()).for_model({})
        self.device = next(net.parameters()).device

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: SampleConfig | None = None) -> DigitsPipeline:
        """A checkpoint folder written by `difflab digits train`, on the CPU (`.to(device)` moves it)."""
        net, schedule, model_config = load_digits_model(folder, torch.device("cpu"))
        return cls(net, schedule, (config or SampleConfig()).for_model(model_config))

    def to(self, device: str | torch.device) -> DigitsPipeline:
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.net.to(self.device)
        return self

    def __call__(
        self,
        domain: str | int = DOMAINS[0],
        digit: int | list[int] = 0,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        method: str | None = None,
        scheduler=None,
    ) -> DigitsPipelineOutput:
        """`num_images` digits (one `digit` for all, or one per image) in `domain` ("mnistm"/"svhn" or its index).
        Unset sampler settings come from `self.config` (the `digits sample` defaults). A diffusers `scheduler`
        (built from `scheduler_config()`) replaces difflab's sampler; its own stochastic steps, if any, draw from
        `generator` when it is a single one."""
        d = self._domain(domain)
        digits = [digit] * num_images if isinstance(digit, int) else list(digit)
        if len(digits) != num_images or not all(0 <= k < self.net.config.num_digits for k in digits):
            raise DifflabError(f"digit {digit!r}: need {num_images} digits in 0..{self.net.config.num_digits - 1}")
        if output_type not in OUTPUT_TYPES:
            raise DifflabError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        cfg = self._config(num_inference_steps, guidance_scale, eta, method)
        if isinstance(generator, list) and len(generator) != num_images:
            raise DifflabError(f"{len(generator)} generators for {num_images} images: give one per image, or one")
        generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        cond = make_conds([d] * num_images, digits)
        if scheduler is not None:
            return DigitsPipelineOutput(self._output(self._scheduled(scheduler, cond, cfg, generator), output_type))
        images, _ = generate(self.net, self.schedule, cond, cfg, self.device, progress=False, generator=generator)
        return DigitsPipelineOutput(self._output(images, output_type))

    def scheduler_config(self) -> dict:
        """The model's noise schedule for diffusers, with difflab's sampling conventions (x_0 clipped to [-1, 1],
        the timestep spacing of `self.config`, "leading" offset by 1): `DDIMScheduler.from_config(
        pipe.scheduler_config())` steps as `method="ddim"`."""
        return {
            "num_train_timesteps": self.schedule.num_steps,
            "trained_betas": self.schedule.betas.tolist(),
            "prediction_type": self.schedule.prediction,
            # On a zero-terminal-SNR schedule diffusers' rescale changes no beta, but it turns on DPM-Solver's floor
            # under ᾱ_T = 0, without which its first step divides by zero.
            "rescale_betas_zero_snr": self.schedule.zero_terminal_snr,
            "clip_sample": True,
            "timestep_spacing": self.config.spacing,
            "steps_offset": 1,
        }

    @torch.inference_mode()
    def _scheduled(self, scheduler, cond: torch.Tensor, cfg: SampleConfig, generator) -> torch.Tensor:
        """The guided ε of difflab, stepped by a diffusers scheduler, in float32."""
        c = cond.to(self.device)
        eps = guided_digits_eps(self.net, c, cfg.guidance_digit, cfg.guidance_domain, self.net.null_cond)
        shape = (self.net.config.in_channels, self.net.config.image_size, self.net.config.image_size)
        x = ImageNoise(generator, len(c), shape).initial().to(self.device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(cfg.steps)
        # As diffusers' pipelines do: only a scheduler whose step draws noise takes a generator (UniPC's takes none).
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters and isinstance(generator, torch.Generator):
            step_kwargs["generator"] = generator
        for t in scheduler.timesteps:
            e = eps(scheduler.scale_model_input(x, t), t.expand(len(c)).to(self.device))
            x = scheduler.step(e, t, x, **step_kwargs).prev_sample
        return x.cpu()

    def _domain(self, domain: str | int) -> int:
        if isinstance(domain, str):
            if domain not in DOMAINS:
                raise DifflabError(f"domain {domain!r}: choose one of {', '.join(DOMAINS)}")
            return DOMAINS.index(domain)
        if not 0 <= domain < self.net.config.num_domains:
            raise DifflabError(f"domain {domain}: need 0..{self.net.config.num_domains - 1}")
        return domain

    def _config(self, steps, guidance, eta, method) -> SampleConfig:
        changes = {"steps": steps, "guidance_digit": guidance, "eta": eta, "method": method}
        return replace(self.config, **{k: v for k, v in changes.items() if v is not None})

    @staticmethod
    def _output(images: torch.Tensor, output_type: str):
        """As diffusers: "pt" (N, 3, H, W) and "np" (N, H, W, 3) floats in [0, 1], "pil" a list of images."""
        unit = (images.float().clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            return unit
        if output_type == "np":
            return unit.permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in to_uint8(images)]
