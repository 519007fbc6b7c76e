"""The miniature Stable Diffusion v1 stack: the same component classes as SD v1, sized for a CPU.

- CLIP (transformers `CLIPModel`) with the real CLIP BPE tokenizer; its text tower is SD's text encoder;
- `AutoencoderKL`, 32x32x3 pixels <-> 16x16x4 latents (SD v1: 512x512x3 <-> 64x64x4): at 8x8x4 an MSE-trained
  VAE blurred away the photo texture that makes a digit MNIST-M-like (the style judge called 24.5 % of its
  reconstructions of MNIST-M digits MNIST-M; 92 % at 16x16x4 with 4 norm groups, real images 95 %);
- `UNet2DConditionModel` cross-attending to the frozen text encoder's last hidden states, as SD v1 does.
"""

from __future__ import annotations

from dataclasses import dataclass

from difflab.configs import SD_V1_CONFIG

VOCAB_SIZE = 49408  # the CLIP BPE vocabulary
BOS, EOS = 49406, 49407


@dataclass
class MiniSDConfig:
    image_size: int = 32
    text_width: int = 64  # CLIP text hidden size = the UNet's cross-attention dim
    text_layers: int = 3
    vision_width: int = 64
    vision_layers: int = 4
    patch_size: int = 4
    projection_dim: int = 64
    vae_channels: tuple[int, ...] = (16, 32)  # two levels: 2x downsampling
    latent_channels: int = 4
    # Few groups: a group's spatial mean is normalised away, and with one channel per group the encoder lost
    # each image's overall colour (blue backgrounds came back grey).
    vae_norm_groups: int = 4
    # Cross-attention at all but the full-resolution level, which is 64 channels wide: the photo texture of the
    # MNIST-M style lives there (docs/minisd.md compares 32 and 64 channels).
    unet_channels: tuple[int, ...] = (64, 64, 128)
    attention_head_dim: int = 8

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_clip(cfg: MiniSDConfig):
    from transformers import CLIPConfig, CLIPModel

    def tower(width: int, layers: int) -> dict:
        return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4)

    text = dict(
        tower(cfg.text_width, cfg.text_layers),
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    vision = dict(tower(cfg.vision_width, cfg.vision_layers), image_size=cfg.image_size, patch_size=cfg.patch_size)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def build_vae(cfg: MiniSDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=cfg.vae_norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: MiniSDConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        # Attention at the 16x16 latent (256 queries) would cost more than the rest of the level.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=16,
    )


def sd_scheduler_config() -> dict:
    """SD v1's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps) with SD 2's v-prediction, which
    learned the digits in fewer steps than epsilon prediction (difflab's digits recipe)."""
    from diffusers import PNDMScheduler

    return {**PNDMScheduler.load_config(SD_V1_CONFIG / "scheduler"), "prediction_type": "v_prediction"}


def text_tower(clip):
    """SD's text encoder: the CLIP text tower as a `CLIPTextModel`."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """A diffusers `StableDiffusionPipeline` of these parts with SD v1's scheduler and no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def random_pipeline(cfg: MiniSDConfig, seed: int = 0):
    """The stack's pipeline with random weights, built by the same code as the trained one: for tests and CPU
    benchmarks of the data flow, never for images."""
    import torch

    from difflab.clip.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    return assemble_pipeline(build_vae(cfg), text_tower(build_clip(cfg)), load_clip_tokenizer(), build_unet(cfg))
