"""CLIP image and text scores for generated images.

image score = 100 x mean cosine similarity of a generated image to the reference images of a concept;
text score  = the model's own logit scale (`logit_scale.exp()`, 100 for the released CLIP models) x cosine
similarity of a generated image to a text: `logits_per_image`, as transformers computes it.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from difflab.clip.model import encode_pixels, encode_texts, load_clip, pixel_batch
from difflab.clip.preprocess import ClipTransform
from difflab.utils import pick_device


class ClipScorer:
    """Embeds images and texts with one CLIP model; all embeddings are unit-length float32 on the CPU."""

    def __init__(self, model, tokenizer, processor, device: str | torch.device | None = None, batch_size: int = 32):
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.transform = ClipTransform.from_processor(processor)
        self.batch_size = batch_size
        self.text_scale = float(model.logit_scale.detach().exp())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "ClipScorer":
        clip = load_clip(path, device)
        return cls(clip.model, clip.tokenizer, clip.processor, clip.device)

    @torch.inference_mode()
    def image_embeds(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (N,D)."""
        chunks = []
        for i in range(0, len(images), self.batch_size):
            pixels = pixel_batch(images[i : i + self.batch_size], self.transform, self.device)
            # Scores stay in float32, as the course grader computes them: near a baseline, bf16 could flip
            # PASS/FAIL and reorder best-of-N.
            chunks.append(encode_pixels(self.model, pixels).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> (N,D)."""
        return encode_texts(self.model, self.tokenizer, list(texts), self.device).cpu()

    @staticmethod
    def image_score(gen_embeds: torch.Tensor, ref_embeds: torch.Tensor) -> torch.Tensor:
        """(N,D) generated, (R,D) references -> (N,) 100 x mean cosine similarity to the references."""
        return 100 * (gen_embeds @ ref_embeds.T).mean(dim=1)

    def text_score(self, gen_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N,D) generated, one text (D,) or (1,D) -> (N,); several texts (M,D) -> (N,M). Logit scale x cosine."""
        if text_embeds.dim() == 1 or text_embeds.shape[0] == 1:
            return self.text_scale * gen_embeds @ text_embeds.reshape(-1)
        return self.text_scale * gen_embeds @ text_embeds.T
