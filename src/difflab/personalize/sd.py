"""Load Stable Diffusion v1.x without a model hub.

Two inputs are accepted:
- a diffusers-format folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`);
- the original single-file checkpoint (`sd-v1-4.ckpt` or `.safetensors`), whose weights are mapped to diffusers
  names with diffusers' own conversion functions and placed into models built from the configs shipped in
  `configs/sd-v1/` (the tokenizer files there are the real CLIP BPE vocabulary).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from difflab.configs import SD_V1_CONFIG
from difflab.io import loader_error, read_tensors
from difflab.parallel import Processes
from difflab.precision import DTYPE_CANDIDATES, Precision
from difflab.utils import DifflabError, pick_device

# transformers says once per image-processor class that it falls back to PIL without torchvision. difflab never
# installs torchvision (it breaks beside the CPU torch), so the notice is nothing a user can act on.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# "auto" may generate in a lower precision whose UNet noise prediction is this close to fp32's (relative error):
# generated images are scored by CLIP, not compared with a reference.
TOLERANCE = 0.03
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
# Prefixes of the three models inside an original (CompVis / LDM) checkpoint.
LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}


def load_sd(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config_dir: str | os.PathLike | None = None,
):
    """A `StableDiffusionPipeline` (no safety checker) from a diffusers folder or an original single-file checkpoint.

    `config_dir` (a diffusers-layout folder of configs + tokenizer) describes the architecture of a single-file
    checkpoint; it defaults to the shipped SD v1 configs.
    """
    path = Path(path)
    if path.is_dir():
        pipe = _load_folder(path, dtype)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise DifflabError(
                f"{path}: expected a diffusers folder or a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
            )
        pipe = _load_single_file(path, Path(config_dir) if config_dir else SD_V1_CONFIG, dtype)
    else:
        raise DifflabError(f"{path}: Stable Diffusion model not found (give a diffusers folder or sd-v1-4.ckpt)")
    return pipe.to(pick_device(None if device is None else str(device)))


def load_pipeline(
    path: str | os.PathLike,
    embeds: Sequence[str | os.PathLike] = (),
    device: str | None = None,
    precision: Precision | str = "auto",
    processes: Processes | None = None,
):
    """The pipeline that generation and composition run, its weights in `precision`'s dtype (as diffusers holds
    them), with the learned embeddings in `embeds` added. "auto" tries a UNet call in fp32 and bf16 on the main
    one of several `processes`, which all take its choice."""
    from difflab.personalize.embeddings import load_embeddings

    processes = processes or Processes()
    dev = pick_device(device)
    precision = Precision.parse(precision)
    if precision.auto:
        pipe = load_sd(path, device=dev)
        precision = processes.from_main(pipeline_precision(pipe, precision, dev) if processes.is_main else None)
        precision.cast(pipe)
    else:
        precision = precision.settle(dev)
        pipe = load_sd(path, device=dev, dtype=precision.dtype or torch.float32)
    if processes.is_main:
        print(f"precision: {precision.describe()}", flush=True)
    if embeds:
        load_embeddings(pipe, embeds)
    return pipe


def pipeline_precision(pipe, precision: Precision, device: torch.device, batch: int = 2) -> Precision:
    """Settle `precision` on the UNet's guided call (2 x `batch` rows of seeded latents and text states) with its
    weights in each dtype, within TOLERANCE of fp32's noise prediction."""
    import copy

    unet, cfg = pipe.unet, pipe.unet.config
    size = cfg.sample_size
    seeded = torch.Generator().manual_seed(0)
    z = torch.randn(2 * batch, cfg.in_channels, size, size, generator=seeded).to(device)
    text = torch.randn(2 * batch, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, generator=seeded)
    t = torch.linspace(0, 999, 2 * batch).long().to(device)
    copies = {"fp32": unet}

    def trial(p: Precision) -> torch.Tensor:
        model = copies.get(p.label) or copies.setdefault(p.label, p.cast(copy.deepcopy(unet)))
        with torch.inference_mode():
            return model(z.to(model.dtype), t, text.to(device, model.dtype)).sample.float()

    job = f"SD UNet {cfg.block_out_channels} {size}px batch {2 * batch}"
    return precision.settle(device, job, trial, DTYPE_CANDIDATES, rounds=3, tolerance=TOLERANCE)


def _check_folder(path: Path) -> None:
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise DifflabError(f"{path}: not a complete diffusers Stable Diffusion folder, missing {', '.join(missing)}")


def _load_folder(path: Path, dtype: torch.dtype | None):
    from diffusers import StableDiffusionPipeline

    _check_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # a bad or pickled weights file surfaces as many exception types
        raise loader_error(path, "diffusers pipeline", e) from None
    _check_pipeline(pipe, str(path))
    return pipe


def _check_pipeline(pipe, where: str) -> None:
    hidden, cross = pipe.text_encoder.config.hidden_size, pipe.unet.config.cross_attention_dim
    if hidden != cross:
        raise DifflabError(f"{where}: text encoder width {hidden} does not match the UNet cross-attention dim {cross}")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict of a single-file checkpoint, read without executing pickled code."""
    path = Path(path)
    # Original checkpoints may carry training-framework objects (e.g. Lightning callbacks) next to the
    # weights: they are read as inert stand-ins, so the tensors load and no pickled code runs.
    sd = read_tensors(path, "Stable Diffusion checkpoint", skip_unknown_objects=True)
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DifflabError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _split_ldm(sd: dict[str, torch.Tensor], path: Path) -> None:
    found = {name: any(k.startswith(p) for k in sd) for name, p in LDM_PREFIX.items()}
    if not all(found.values()):
        missing = [f"{LDM_PREFIX[n]}* ({n})" for n, ok in found.items() if not ok]
        sample = ", ".join(list(sd)[:3]) or "none"
        raise DifflabError(
            f"{path}: not a Stable Diffusion v1 checkpoint: no {' / '.join(missing)} weights (first keys: {sample})"
        )


def _check_signature(sd: dict[str, torch.Tensor], config_dir: Path, path: Path) -> None:
    """Compare a few telling shapes with the configs before building anything (an SD v1 UNet is 860 M parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = UNet2DConditionModel.load_config(config_dir / "unet")
    vae = AutoencoderKL.load_config(config_dir / "vae")
    text = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    token_key = LDM_PREFIX["text_encoder"] + "text_model.embeddings.token_embedding.weight"
    if token_key not in sd:  # layout of checkpoints written with transformers < 4.22
        token_key = token_key.replace("text_model.", "")
    cross_keys = [k for k in sd if k.startswith(LDM_PREFIX["unet"]) and k.endswith("attn2.to_k.weight")]
    expected = {
        LDM_PREFIX["unet"] + "input_blocks.0.0.weight": (unet["block_out_channels"][0], unet["in_channels"], 3, 3),
        LDM_PREFIX["vae"] + "encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
        token_key: (text.vocab_size, text.hidden_size),
    }
    if cross_keys:
        expected[cross_keys[0]] = (sd[cross_keys[0]].shape[0], unet["cross_attention_dim"])
    for key, shape in expected.items():
        if key not in sd:
            raise DifflabError(f"{path}: not a Stable Diffusion v1 checkpoint: weight {key} is missing")
        if tuple(sd[key].shape) != shape:
            raise DifflabError(
                f"{path}: not a Stable Diffusion v1 checkpoint: {key} has shape {tuple(sd[key].shape)}, "
                f"expected {shape} (configs in {config_dir})"
            )


def _fit(model, weights: dict[str, torch.Tensor], component: str, path: Path) -> None:
    """Load converted weights strictly, with a message that says what the architecture expected."""
    expected = model.state_dict()
    # position_ids is a buffer some transformers versions save and others do not.
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    expected_keys = {k for k in expected if not k.endswith("position_ids")}
    missing = sorted(expected_keys - weights.keys())
    unexpected = sorted(weights.keys() - expected_keys)
    wrong = [
        (k, tuple(weights[k].shape), tuple(expected[k].shape))
        for k in sorted(expected_keys & weights.keys())
        if weights[k].shape != expected[k].shape
    ]
    if wrong:
        k, got, want = wrong[0]
        raise DifflabError(
            f"{path}: not a Stable Diffusion v1 checkpoint: {component} weight {k} has shape {got}, "
            f"expected {want} ({len(wrong)} mismatched tensors)"
        )
    if missing:
        raise DifflabError(f"{path}: {component} weights incomplete: {len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        raise DifflabError(
            f"{path}: {component} has {len(unexpected)} weights that an SD v1 model does not, e.g. {unexpected[0]}"
        )
    model.load_state_dict(weights, strict=False)


def _load_tokenizer(folder: Path):
    """The CLIP tokenizer of a configs folder: vocab.json + merges.txt, or the tokenizer.json transformers 5 writes."""
    from difflab.clip.tokenizer import MAX_LENGTH, load_clip_tokenizer

    if (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MAX_LENGTH)
    return load_clip_tokenizer(folder)


def _load_single_file(path: Path, config_dir: Path, dtype: torch.dtype | None):
    import diffusers
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_folder(config_dir)
    sd = read_checkpoint(path)
    _split_ldm(sd, path)
    _check_signature(sd, config_dir, path)

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    _fit(unet, convert_ldm_unet_checkpoint(sd, unet.config), "unet", path)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    _fit(vae, convert_ldm_vae_checkpoint(sd, vae.config), "vae", path)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True))
    clip_sd = convert_ldm_clip_checkpoint(sd)
    # Original checkpoints name weights `text_model.*` (or, before transformers 4.22, without that level);
    # the installed transformers decides which of the two its CLIPTextModel expects.
    level = "text_model." if any(k.startswith("text_model.") for k in text_encoder.state_dict()) else ""
    clip_sd = {level + k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    _fit(text_encoder, clip_sd, "text_encoder", path)
    del sd

    scheduler_cfg = PNDMScheduler.load_config(config_dir / "scheduler")
    scheduler_cls = getattr(diffusers, scheduler_cfg.get("_class_name", "PNDMScheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(config_dir / "tokenizer"),
        unet=unet,
        scheduler=scheduler_cls.from_config(scheduler_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _check_pipeline(pipe, str(path))
    return pipe.to(dtype=dtype) if dtype is not None else pipe
