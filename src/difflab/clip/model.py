"""Loading a local CLIP folder and turning images / texts into unit-length CLIP embeddings.

A CLIP folder is in transformers format: `config.json` (model_type "clip") + weights, optionally tokenizer
files and `preprocessor_config.json`. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from difflab.clip.preprocess import ClipTransform
from difflab.clip.tokenizer import MAX_LENGTH, load_clip_tokenizer
from difflab.io import loader_error
from difflab.utils import DifflabError, pick_device

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclass
class Clip:
    """A CLIP model with the tokenizer and image preprocessing that belong to it."""

    model: Any  # transformers.CLIPModel, in eval mode on `device`
    tokenizer: Any
    processor: Any  # a CLIP image processor; only its size/crop/mean/std settings are used for batching
    device: torch.device
    path: Path | None = None


def check_clip_folder(path: str | os.PathLike) -> Path:
    """Fail with a message naming what is missing, before transformers gets a chance to try a hub."""
    path = Path(path)
    if path.is_file():
        raise DifflabError(f"{path}: is a file; --model takes a CLIP model folder (config.json + weights)")
    if not path.is_dir():
        raise DifflabError(f"{path}: CLIP model folder not found")
    config = path / "config.json"
    if not config.is_file():
        raise DifflabError(f"{path}: not a transformers model folder (config.json missing)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise DifflabError(f"{config}: not valid JSON ({e})") from None
    if model_type != "clip":
        raise DifflabError(f"{path}: config.json says model_type {model_type!r}, expected a 'clip' model (CLIPModel)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise DifflabError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    return path


def default_processor(image_size: int):
    """CLIP's standard preprocessing at the model's input size (the PIL processor: no torchvision needed)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def load_clip(path: str | os.PathLike, device: str | torch.device | None = None) -> Clip:
    """Load model + tokenizer + image processor from a local folder.

    Without tokenizer files the CLIP BPE tokenizer shipped offline is used; without `preprocessor_config.json`
    CLIP's standard preprocessing at the model's image size.
    """
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = check_clip_folder(path)
    device = device if isinstance(device, torch.device) else pick_device(device)
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:  # corrupt or mismatched weights surface as many exception types; all are user errors here
        raise loader_error(path, "CLIPModel", e) from None
    # transformers only warns about missing tensors and leaves them random: a partial checkpoint must not pass.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise DifflabError(f"{path}: weights lack {len(missing)} CLIP tensors, e.g. {', '.join(missing[:3])}")
    model.to(device).eval()

    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=MAX_LENGTH)
    else:
        tokenizer = load_clip_tokenizer()
    if (path / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    else:
        processor = default_processor(model.config.vision_config.image_size)
    return Clip(model, tokenizer, processor, device, path)


def folder_fingerprint(path: str | os.PathLike) -> str:
    """Identify a model folder by its resolved path and each file's name, size and mtime (cheap, no hashing of GBs)."""
    path = Path(path).resolve()
    h = hashlib.sha256(str(path).encode())
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _embedding(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def encode_pixels(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) normalised pixels -> (B,D) unit-length float32 image embeddings."""
    return F.normalize(_embedding(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def encode_texts(model, tokenizer, texts: Sequence[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Strings -> (N,D) unit-length float32 text embeddings (padded per batch, truncated at 77 tokens)."""
    chunks = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        ).to(device)
        feats = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        chunks.append(F.normalize(_embedding(feats).float(), dim=-1))
    return torch.cat(chunks)


def pixel_batch(images: Sequence, transform: ClipTransform, device: torch.device) -> torch.Tensor:
    """PIL images -> normalised (B,3,H,W) float32 pixels on `device`."""
    return transform.normalize(torch.stack([transform(im) for im in images]).to(device))
