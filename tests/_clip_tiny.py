"""A tiny random CLIP model in transformers format, shared by the CLIP tests."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_tiny_clip(path: Path, with_tokenizer: bool = True, with_processor: bool = True, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from difflab.clip.tokenizer import load_clip_tokenizer

    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(layer, vocab_size=49408),
        projection_dim=32,
        vision_config=dict(layer, image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    if with_tokenizer:
        load_clip_tokenizer().save_pretrained(path)
    if with_processor:
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of varied sizes and aspect ratios: smooth colour blobs plus noise, so CLIP outputs differ."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = rng.integers(24, 80, size=2)
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.normal(0, 40, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images
