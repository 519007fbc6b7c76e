"""The digits model as an ε-network for the DDIM jobs: registered with `difflab.ddim.models` when this package is
imported, so DDIM reaches the digits model without importing it."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.ddim.models import DigitsCondition, EpsModel, autocast_runner, prepare_net, register_folder_model
from difflab.digits.model import load_digits_model
from difflab.digits.sample import guided_digits_eps, model_guidance_default
from difflab.precision import Precision
from difflab.schedule import EpsFn
from difflab.utils import DifflabError


def load_digits_eps(path: Path, device: torch.device, precision: Precision, cond: DigitsCondition | None) -> EpsModel:
    if cond is None:
        raise DifflabError(
            f"{path}: a conditional digits checkpoint; `ddim sample`, `eta-grid` and `interpolate` draw from it "
            "with --domain and --digit, `ddim invert` needs an unconditional net"
        )
    net, schedule, model_config = load_digits_model(path)
    guidance = cond.guidance if cond.guidance is not None else model_guidance_default(model_config)
    config = net.config
    if not (0 <= cond.domain < config.num_domains and 0 <= cond.digit < config.num_digits):
        raise DifflabError(
            f"{path}: domain {cond.domain} / digit {cond.digit} out of range "
            f"({config.num_domains} domains, {config.num_digits} digits)"
        )
    net = prepare_net(net, device, precision)
    run = autocast_runner(net, device, precision)

    def make(n: int) -> EpsFn:
        # The digits sampler's rule, so `ddim sample --guidance g` is `digits sample --guidance-digit g`.
        c = torch.tensor([[cond.domain, cond.digit]], device=device).repeat(n, 1)
        return guided_digits_eps(run, c, guidance, 1.0, net.null_cond)

    multiple = config.patch * 2 ** (len(config.channels) - 1)
    return EpsModel("digits UNet", path, config.in_channels, multiple, config.image_size, device, make, schedule)


register_folder_model("digits_unet", load_digits_eps)
