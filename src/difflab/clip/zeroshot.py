"""Zero-shot classification with CLIP: one text embedding per class, images scored against all of them.

A class embedding is the mean of the L2-normalised embeddings of its prompts (one per template), normalised
again -- with a single template this is just that prompt's embedding. Class embeddings can be cached on disk,
keyed by the model folder, the templates and the class names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from difflab.clip.model import default_processor, encode_pixels, encode_texts, pixel_batch
from difflab.clip.preprocess import ClipTransform
from difflab.clip.tokenizer import load_clip_tokenizer
from difflab.io import atomic_write, read_safetensors, read_text
from difflab.precision import Precision
from difflab.utils import DifflabError, pick_device

DEFAULT_TEMPLATE = "A photo of {}."

# Prompt set in the spirit of CLIP's CIFAR ensembles: varied photo conditions around one object word.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def load_templates(spec: str) -> list[str]:
    """ "ensemble" -> the built-in set; an existing file -> one template per non-empty line; else one template."""
    if spec == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    path = Path(spec)
    if path.is_file() or ("{}" not in spec and (path.suffix or "/" in spec)):  # a file name, present or not
        templates = [line.strip() for line in read_text(path, "templates").splitlines() if line.strip()]
        source = str(path)
    else:
        templates, source = [spec], "template"
    if not templates:
        raise DifflabError(f"{path}: template file is empty")
    for t in templates:
        if t.count("{}") != 1:
            raise DifflabError(f"{source}: template {t!r} must contain exactly one '{{}}' for the class name")
    return templates


def readable_name(class_name: str) -> str:
    """CIFAR-style names use underscores: willow_tree -> willow tree."""
    return class_name.replace("_", " ").strip()


@torch.inference_mode()
def class_embeddings(
    model,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    precision: Precision = Precision(),
) -> torch.Tensor:
    """(C,D) unit-length embeddings, prompts of all classes encoded in large batches."""
    prompts = [t.format(readable_name(c)) for c in class_names for t in templates]
    with precision.autocast(device):
        feats = encode_texts(model, tokenizer, prompts, device)
    return F.normalize(feats.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


def cache_key(model_fingerprint: str, class_names: Sequence[str], templates: Sequence[str], precision: str) -> str:
    payload = json.dumps(
        {"model": model_fingerprint, "classes": list(class_names), "templates": list(templates), "precision": precision}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab")) / "clip_text"


def cached_class_embeddings(
    model,
    tokenizer,
    class_names,
    templates,
    device,
    model_fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
    precision: Precision = Precision(),
) -> tuple[torch.Tensor, bool]:
    """Class embeddings from `cache_dir` when present for this exact model/classes/templates/precision;
    (embeds, was_cached)."""
    key = cache_key(model_fingerprint, class_names, templates, precision.name)
    path = Path(cache_dir or default_cache_dir()) / f"text-{key}.safetensors"
    if path.is_file():
        try:
            return read_safetensors(path, "cache entry")["embeds"], True
        except (DifflabError, KeyError):  # a damaged cache entry is recomputed, never fatal
            pass
    embeds = class_embeddings(model, tokenizer, class_names, templates, device, precision).cpu()
    atomic_write(path, lambda tmp: save_file({"embeds": embeds.contiguous()}, tmp))
    return embeds, False


@dataclass
class Prediction:
    probs: torch.Tensor  # (B,C) softmax over classes
    topk: torch.Tensor  # (B,k) class indices, best first
    topk_probs: torch.Tensor  # (B,k)

    @property
    def top1(self) -> torch.Tensor:
        return self.topk[:, 0]


class ZeroShotClassifier:
    """Reusable: text side computed once, `predict` on PIL images or preprocessed pixel tensors."""

    def __init__(
        self,
        model,
        class_names: Sequence[str],
        class_embeds: torch.Tensor,
        transform: ClipTransform,
        device: torch.device,
        precision: Precision = Precision(),
    ):
        self.model, self.class_names, self.transform, self.device = model, list(class_names), transform, device
        self.class_embeds = class_embeds.to(device)
        self.logit_scale = model.logit_scale.detach().exp().float().to(device)
        self.precision = precision

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised (B,3,H,W) pixels -> (B,C) scaled cosine similarities, as CLIP's logits_per_image."""
        with self.precision.autocast(self.device):
            image_embeds = encode_pixels(self.model, pixel_values.to(self.device))
        return self.logit_scale * image_embeds @ self.class_embeds.T

    def predict(self, images: Sequence | torch.Tensor, k: int = 5) -> Prediction:
        """PIL images, a uint8 (B,3,H,W) batch from `transform`, or normalised float pixels -> Prediction."""
        if isinstance(images, torch.Tensor):
            pixels = self.transform.normalize(images.to(self.device)) if images.dtype == torch.uint8 else images
        else:
            pixels = pixel_batch(images, self.transform, self.device)
        probs = self.logits(pixels).softmax(dim=-1).cpu()
        top = probs.topk(min(k, probs.shape[1]), dim=-1)
        return Prediction(probs, top.indices, top.values)


def zeroshot_classifier(
    model,
    class_names: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    tokenizer=None,
    processor=None,
    device: str | torch.device | None = None,
    precision: Precision | str = Precision(),
) -> ZeroShotClassifier:
    """Build a classifier from a CLIPModel (its text embeddings computed here, once)."""
    if not class_names:
        raise DifflabError("no class names given")
    device = device if isinstance(device, torch.device) else pick_device(device)
    model = model.to(device).eval()
    tokenizer = tokenizer or load_clip_tokenizer()
    processor = processor or default_processor(model.config.vision_config.image_size)
    precision = Precision.parse(precision).settle(device)
    embeds = class_embeddings(model, tokenizer, class_names, list(templates), device, precision)
    return ZeroShotClassifier(model, class_names, embeds, ClipTransform.from_processor(processor), device, precision)
