"""The mini stack difflab ships: a finished build packed into one fp16 safetensors file and one JSON of configs.

Building the stack well takes longer than the personalization demo's budget on a slow 2-core CPU, so a build
made with `difflab minisd build` is packed (`difflab minisd pack`) into the package, and the demo unpacks it
into the same standard folders a build writes (`clip/`, `vae/`, `sd/`, `judges/`). The text encoder is stored
once: SD's text encoder is the CLIP text tower, as the build makes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.io import atomic_write, check_state_dict, load_json, read_safetensors, save_json
from difflab.utils import DifflabError

PREBUILT = Path(__file__).parent / "prebuilt"
WEIGHTS, CONFIGS = "stack.safetensors", "stack.json"
FORMAT = "difflab-minisd-stack"
# (component, folder in a build, weight file in that folder)
PARTS = (
    ("clip", "clip", "model.safetensors"),
    ("vae", "sd/vae", "diffusion_pytorch_model.safetensors"),
    ("unet", "sd/unet", "diffusion_pytorch_model.safetensors"),
)


def available(src: str | os.PathLike = PREBUILT) -> bool:
    return (Path(src) / WEIGHTS).is_file() and (Path(src) / CONFIGS).is_file()


def pack(stack: str | os.PathLike, dest: str | os.PathLike = PREBUILT) -> Path:
    """Pack the finished build in `stack` into `dest`/stack.safetensors (fp16) + stack.json; returns `dest`."""
    from safetensors.torch import save_file

    stack, dest = Path(stack), Path(dest)
    weights, configs = {}, {"format": FORMAT, "judges": {}}
    for name, folder, file in PARTS:
        configs[name] = load_json(stack / folder / "config.json", f"{name} config")
        for key, value in read_safetensors(stack / folder / file, f"{name} weights").items():
            weights[f"{name}.{key}"] = value
    text = read_safetensors(stack / "sd/text_encoder/model.safetensors", "text encoder weights")
    for key, value in text.items():  # saved without the "text_model." that CLIPModel puts in front
        if not torch.equal(value, weights.get(f"clip.text_model.{key.removeprefix('text_model.')}", torch.empty(0))):
            raise DifflabError(f"{stack / 'sd/text_encoder'}: not the CLIP text tower ({key} differs)")
    for path in sorted((stack / "judges").glob("*.safetensors")):
        configs["judges"][path.stem] = load_json(path.with_suffix(".json"), "judge config")
        for key, value in read_safetensors(path, "judge weights").items():
            weights[f"judge.{path.stem}.{key}"] = value
    if not configs["judges"]:
        raise DifflabError(f"{stack / 'judges'}: no judges; finish the build with --resume")
    if (stack / "build.json").is_file():
        build = load_json(stack / "build.json", "build log")
        configs["build"] = {
            "config": build.get("config"),
            "seconds": {s: v.get("seconds") for s, v in build.get("stages", {}).items()},
            "machines": {s: v.get("machine") for s, v in build.get("stages", {}).items()},
        }
    dest.mkdir(parents=True, exist_ok=True)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    atomic_write(dest / WEIGHTS, lambda tmp: save_file(half, tmp, metadata={"format": FORMAT}))
    save_json(configs, dest / CONFIGS)
    return dest


def components(src: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    configs = load_json(src / CONFIGS, "mini-SD stack config")
    if not isinstance(configs, dict) or configs.get("format") != FORMAT:
        raise DifflabError(f"{src / CONFIGS}: not a packed mini-SD stack")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_safetensors(src / WEIGHTS, "mini-SD stack").items():
        name, _, rest = key.partition(".")
        if name == "judge":  # judge.<judge name>.<weight name>
            judge, _, rest = rest.partition(".")
            name = f"judge.{judge}"
        parts.setdefault(name, {})[rest] = value.float() if value.is_floating_point() else value
    wanted = [name for name, _, _ in PARTS] + [f"judge.{judge}" for judge in configs["judges"]]
    missing = [name for name in wanted if name not in parts]
    if missing:
        raise DifflabError(f"{src / WEIGHTS}: no weights for {', '.join(missing)}")
    return configs, parts


def unpack(out: str | os.PathLike, src: str | os.PathLike = PREBUILT) -> Path:
    """Write the packed stack in `src` into `out` as the standard folders a build writes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from difflab.clip.tokenizer import load_clip_tokenizer
    from difflab.minisd.build import save_clip, save_pipeline, write_dir
    from difflab.minisd.models import text_tower

    src, out = Path(src), Path(out)
    if not available(src):
        raise DifflabError(f"{src}: no packed mini-SD stack ({WEIGHTS} + {CONFIGS})")
    configs, parts = components(src)
    clip = CLIPModel(CLIPConfig.from_dict(configs["clip"]))
    check_state_dict(clip, parts["clip"], src / WEIGHTS)
    vae = AutoencoderKL.from_config(configs["vae"])
    check_state_dict(vae, parts["vae"], src / WEIGHTS)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    check_state_dict(unet, parts["unet"], src / WEIGHTS)
    tokenizer = load_clip_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    build = (configs.get("build") or {}).get("config", {})
    made = {
        "command": f"`difflab personalize demo`: the stack difflab ships, unpacked from {src}",
        "built with": f"`difflab minisd build --seed {build.get('seed', '?')}`, stage steps "
        + ", ".join(f"{k} {v.get('steps')}" for k, v in build.get("train", {}).items() if isinstance(v, dict)),
    }
    write_dir(out / "clip", lambda tmp: save_clip(clip, tokenizer, tmp, made))
    write_dir(out / "vae", vae.save_pretrained)
    write_dir(out / "sd", lambda tmp: save_pipeline(vae, text_tower(clip), tokenizer, unet, tmp, made))

    def write_judges(tmp: Path) -> None:
        for name, meta in configs["judges"].items():
            save_file(parts[f"judge.{name}"], tmp / f"{name}.safetensors", metadata={"format": meta.get("format", "")})
            save_json(meta, tmp / f"{name}.json")

    write_dir(out / "judges", write_judges)
    save_json({"unpacked_from": str(src), "build": configs.get("build")}, out / "build.json")
    return out
