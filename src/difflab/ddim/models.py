"""Load any ε-network difflab knows into one sampling interface, dispatching on what the checkpoint is:

- a face UNet state dict (`UNet.pt`, `.pth`, `.bin`, `.safetensors`);
- a diffusers `UNet2DModel` folder (`config.json` with `"_class_name": "UNet2DModel"`), loaded offline;
- a difflab digits folder (`config.json` with `"model": "digits_unet"`), sampled for one domain/digit with CFG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from difflab.io import load_json, read_state_dict
from difflab.precision import REFERENCE, Precision
from difflab.schedule import EpsFn, NoiseSchedule
from difflab.utils import DifflabError, pick_device


@dataclass(frozen=True)
class DigitsCondition:
    """What a conditional digits net is asked for: a domain, a digit and the CFG scale (None: the checkpoint's own,
    `digits.sample.model_guidance_default`)."""

    domain: int = 0
    digit: int = 0
    guidance: float | None = 1.0


@dataclass
class EpsModel:
    """An ε-network ready for sampling. `eps_fn(n)` gives the ε-function for a batch of n samples (conditional
    nets need their condition batched to match)."""

    kind: str
    source: Path
    channels: int
    size_multiple: int
    sample_size: int | None
    device: torch.device
    make_eps_fn: Callable[[int], EpsFn]
    schedule: NoiseSchedule | None = None
    """The noise schedule the net was trained with; None means the HW2 one (linear 1e-4..2e-2, 1000 steps)."""

    def eps_fn(self, n: int) -> EpsFn:
        return self.make_eps_fn(n)

    def check_input(self, shape: tuple[int, ...], what: str) -> None:
        c, h, w = shape[-3:]
        m = self.size_multiple
        if c != self.channels or h % m or w % m:
            raise DifflabError(
                f"{what}: shape {tuple(shape)} does not fit the {self.kind} "
                f"({self.channels} channels, height and width divisible by {m})"
            )


# Model folders other areas provide, by config.json's "model": loader(path, device, precision, condition) -> EpsModel.
# The digits package registers "digits_unet" when imported; ddim imports no other area.
FOLDER_MODELS: dict[str, Callable[..., EpsModel]] = {}


def register_folder_model(kind: str, loader: Callable[..., EpsModel]) -> None:
    FOLDER_MODELS[kind] = loader


def autocast_runner(net: Callable[..., torch.Tensor], device: torch.device, precision: Precision):
    """Call `net` in `precision` (autocast, memory format); always hand back float32."""

    def run(x: torch.Tensor, *args) -> torch.Tensor:
        with precision.autocast(device):
            return net(precision.input(x), *args).float()

    return run


def prepare_net(net: torch.nn.Module, device: torch.device, precision: Precision) -> torch.nn.Module:
    return precision.prepare(net.to(device).eval().requires_grad_(False))


def load_eps_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    precision: Precision | str = "auto",
    condition: DigitsCondition | None = None,
) -> EpsModel:
    """Load a checkpoint as an `EpsModel` in `precision`. DDIM's outputs are checked against references computed
    elsewhere (the course's ground truth, diffusers' DDIM), so "auto" is fp32 here on every device (`REFERENCE`);
    a lower precision is the user's explicit choice."""
    path = Path(path)
    device = device if isinstance(device, torch.device) else pick_device(device)
    return _load(path, device, Precision.parse(precision).settle(device, "ddim", tolerance=REFERENCE), condition)


def _load(path: Path, device: torch.device, precision: Precision, condition: DigitsCondition | None) -> EpsModel:
    if not path.exists():
        raise DifflabError(f"{path}: checkpoint not found")
    if path.is_dir():
        config = load_json(path / "config.json") if (path / "config.json").is_file() else {}
        if config.get("model") in FOLDER_MODELS:
            return FOLDER_MODELS[config["model"]](path, device, precision, condition)
        if config.get("_class_name") == "UNet2DModel":
            return _load_diffusers(path, device, precision)
        raise DifflabError(
            f"{path}: folder is neither a diffusers UNet2DModel (config.json with _class_name UNet2DModel) nor a "
            f"model folder difflab knows (config.json with model {' / '.join(FOLDER_MODELS) or 'digits_unet'})"
        )
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
        raise DifflabError(
            f"{path}: unknown checkpoint type; expected a state dict (.pt/.safetensors) or a model folder"
        )
    return face_eps_model(load_face_unet(path), path, device, precision)


def load_face_unet(path: str | os.PathLike):
    """A `FaceUNet` (float32, CPU) from a state dict file; names missing/unexpected keys and wrong shapes."""
    from difflab.nets.face_unet import face_unet_from_state_dict

    try:
        return face_unet_from_state_dict(read_state_dict(path))
    except ValueError as e:
        raise DifflabError(f"{path}: not a face UNet state dict: {e}") from None


def face_eps_model(net, source: Path, device: torch.device, precision: Precision) -> EpsModel:
    net = prepare_net(net, device, precision)
    run = autocast_runner(net, device, precision)
    return EpsModel("face UNet", source, net.config.in_channel, net.config.size_multiple, None, device, lambda n: run)


def _load_diffusers(path: Path, device: torch.device, precision: Precision) -> EpsModel:
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise DifflabError(f"{path}: cannot load the diffusers UNet2DModel ({str(e).splitlines()[0][:160]})") from None
    unet = prepare_net(unet, device, precision)
    run = autocast_runner(lambda x, t: unet(x, t).sample, device, precision)
    size = unet.config.sample_size
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    return EpsModel(
        "diffusers UNet2DModel",
        path,
        unet.config.in_channels,
        multiple,
        size if isinstance(size, int) else None,
        device,
        lambda n: run,
    )
