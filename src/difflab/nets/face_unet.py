"""The 256x256 face UNet of the HW2 DDIM exercise: the original DDPM architecture with the parameter names of
its PyTorch port, so that its `UNet.pt` state dict loads with `strict=True`.

Layout (channel plan 1,1,2,2,4,4 of 128; two ResBlocks per level; attention at the fifth level, 16x16 for a
256x256 input). Blocks are registered as `down1..down18`, `mid1, mid2`, `up1..up23`, numbered in the order the
forward pass runs them, because that is how the checkpoint names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflab.io import state_dict_mismatch


@dataclass(frozen=True)
class FaceUNetConfig:
    in_channel: int = 3
    channel: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    n_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (4,)
    n_head: int = 1
    dropout: float = 0.0

    @property
    def time_dim(self) -> int:
        return self.channel * 4

    @property
    def size_multiple(self) -> int:
        """Inputs must have H and W divisible by this (one halving per level but the last)."""
        return 2 ** (len(self.channel_multiplier) - 1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding cat(sin(t·f), cos(t·f)) with f = 10000^(-2i/dim); `inv_freq` is a saved buffer."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer(
            "inv_freq", torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000) / dim))
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1).float() * self.inv_freq.float()
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channel)
        self.conv1 = nn.Conv2d(in_channel, out_channel, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channel))
        self.norm2 = nn.GroupNorm(32, out_channel)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channel, out_channel, 3, padding=1)
        self.skip = nn.Conv2d(in_channel, out_channel, 1) if in_channel != out_channel else None

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(time_embed)[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention(nn.Module):
    """Attention over all H·W positions; q, k, v are the three channel thirds of one 1x1 conv. The logits are
    scaled by 1/sqrt(channels) (not per head), as in the checkpoint's original code."""

    def __init__(self, channel: int, n_head: int = 1):
        super().__init__()
        self.n_head = n_head
        self.norm = nn.GroupNorm(32, channel)
        self.qkv = nn.Conv2d(channel, channel * 3, 1)
        self.out = nn.Conv2d(channel, channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.n_head, 3 * c // self.n_head, h * w)
        q, k, v = (part.transpose(-1, -2) for part in qkv.chunk(3, dim=2))  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlockWithAttention(nn.Module):
    def __init__(
        self, in_channel: int, out_channel: int, time_dim: int, attention: bool, n_head: int = 1, dropout: float = 0.0
    ):
        super().__init__()
        self.resblocks = ResBlock(in_channel, out_channel, time_dim, dropout)
        self.attention = SelfAttention(out_channel, n_head) if attention else None

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        x = self.resblocks(x, time_embed)
        return x if self.attention is None else self.attention(x)


def downsample(channel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channel, channel, 3, stride=2, padding=1))


def upsample(channel: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channel, channel, 3, padding=1))


class FaceUNet(nn.Module):
    """ε-prediction UNet called as `net(x_t, t)` with integer timesteps t of shape (B,)."""

    def __init__(self, config: FaceUNetConfig = FaceUNetConfig()):
        super().__init__()
        self.config = cfg = config
        ch, tdim = cfg.channel, cfg.time_dim
        last = len(cfg.channel_multiplier) - 1

        def block(cin: int, cout: int, level: int) -> ResBlockWithAttention:
            return ResBlockWithAttention(cin, cout, tdim, level in cfg.attention_levels, cfg.n_head, cfg.dropout)

        self.time = nn.Sequential(TimeEmbedding(ch), nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))

        down: list[nn.Module] = [nn.Conv2d(cfg.in_channel, ch, 3, padding=1)]
        skip_channels = [ch]
        cur = ch
        for level, mult in enumerate(cfg.channel_multiplier):
            for _ in range(cfg.n_res_blocks):
                down.append(block(cur, ch * mult, level))
                cur = ch * mult
                skip_channels.append(cur)
            if level != last:
                down.append(downsample(cur))
                skip_channels.append(cur)

        # The middle always attends once, in its first block.
        mid = [ResBlockWithAttention(cur, cur, tdim, True, cfg.n_head, cfg.dropout), block(cur, cur, -1)]

        up: list[nn.Module] = []
        for level, mult in reversed(list(enumerate(cfg.channel_multiplier))):
            for _ in range(cfg.n_res_blocks + 1):
                up.append(block(cur + skip_channels.pop(), ch * mult, level))
                cur = ch * mult
            if level != 0:
                up.append(upsample(cur))

        # Registered one by one so the state dict reads down1.*, mid1.*, up1.* like the checkpoint.
        for prefix, blocks in (("down", down), ("mid", mid), ("up", up)):
            for i, m in enumerate(blocks, 1):
                self.add_module(f"{prefix}{i}", m)
        self.down_blocks, self.mid_blocks, self.up_blocks = down, mid, up
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channel, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input height and width must be divisible by {m}, got {tuple(x.shape[-2:])}")
        time_embed = self.time(t.reshape(-1).expand(x.shape[0]))
        skips = []
        h = x
        for layer in self.down_blocks:
            h = layer(h, time_embed) if isinstance(layer, ResBlockWithAttention) else layer(h)
            skips.append(h)
        for layer in self.mid_blocks:
            h = layer(h, time_embed)
        for layer in self.up_blocks:
            if isinstance(layer, ResBlockWithAttention):
                h = layer(torch.cat([h, skips.pop()], dim=1), time_embed)
            else:
                h = layer(h)
        return self.out(h)


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> FaceUNetConfig:
    """Read the two sizes a checkpoint can vary in (input and base channels); the rest is the fixed layout."""
    conv_in = state_dict.get("down1.weight")
    if conv_in is None or conv_in.ndim != 4:
        return FaceUNetConfig()
    return FaceUNetConfig(in_channel=conv_in.shape[1], channel=conv_in.shape[0])


def face_unet_from_state_dict(state_dict: dict[str, torch.Tensor]) -> FaceUNet:
    """Build a FaceUNet around the given tensors without a throw-away random init (built on the meta device).
    Raises ValueError listing missing/unexpected keys and wrong shapes."""
    with torch.device("meta"):
        model = FaceUNet(config_from_state_dict(state_dict))
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError("; ".join(problems))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


# --- the same network as a diffusers UNet2DModel ---------------------------------------------------------------
# The architecture is the one diffusers ships for the original DDPM checkpoints, so a renamed state dict
# runs in diffusers too: an independent implementation to test against, and a way to export.


def diffusers_unet_config(config: FaceUNetConfig) -> dict:
    levels = range(len(config.channel_multiplier))
    attn = config.attention_levels
    return dict(
        in_channels=config.in_channel,
        out_channels=config.in_channel,
        block_out_channels=tuple(config.channel * m for m in config.channel_multiplier),
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)),
        layers_per_block=config.n_res_blocks,
        attention_head_dim=config.channel * max(config.channel_multiplier) // config.n_head,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        freq_shift=0,
        flip_sin_to_cos=False,
        downsample_padding=1,
        dropout=config.dropout,
    )


def to_diffusers_state_dict(model: FaceUNet) -> dict[str, torch.Tensor]:
    """Rename (and split q/k/v of) our parameters into diffusers UNet2DModel names."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: nn.Module, renames: dict[str, str]) -> None:
        for name, tensor in module.state_dict().items():
            for ours, theirs in renames.items():
                if name.startswith(ours):
                    name = theirs + name[len(ours) :]
                    break
            out[f"{prefix}.{name}"] = tensor

    def put_block(prefix_res: str, prefix_attn: str, block: ResBlockWithAttention) -> None:
        put(prefix_res, block.resblocks, {"time.1": "time_emb_proj", "skip": "conv_shortcut"})
        if block.attention is not None:
            att = block.attention
            put(prefix_attn, att.norm, {"": "group_norm."})
            for name, w, b in zip(("to_q", "to_k", "to_v"), att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)):
                out[f"{prefix_attn}.{name}.weight"], out[f"{prefix_attn}.{name}.bias"] = w.flatten(1), b
            out[f"{prefix_attn}.to_out.0.weight"], out[f"{prefix_attn}.to_out.0.bias"] = (
                att.out.weight.flatten(1),
                att.out.bias,
            )

    put("time_embedding", model.time, {"1.": "linear_1.", "3.": "linear_2."})
    out.pop("time_embedding.0.inv_freq")
    put("conv_in", model.down_blocks[0], {})
    cfg, per_level = model.config, model.config.n_res_blocks
    blocks = iter(model.down_blocks[1:])
    for level in range(len(cfg.channel_multiplier)):
        for i in range(per_level):
            put_block(f"down_blocks.{level}.resnets.{i}", f"down_blocks.{level}.attentions.{i}", next(blocks))
        if level != len(cfg.channel_multiplier) - 1:
            put(f"down_blocks.{level}.downsamplers.0", next(blocks), {"0.": "conv."})
    put_block("mid_block.resnets.0", "mid_block.attentions.0", model.mid_blocks[0])
    put_block("mid_block.resnets.1", "mid_block.attentions.1", model.mid_blocks[1])
    blocks = iter(model.up_blocks)
    for level in range(len(cfg.channel_multiplier)):
        for i in range(per_level + 1):
            put_block(f"up_blocks.{level}.resnets.{i}", f"up_blocks.{level}.attentions.{i}", next(blocks))
        if level != len(cfg.channel_multiplier) - 1:
            put(f"up_blocks.{level}.upsamplers.0", next(blocks), {"1.": "conv."})
    put("conv_norm_out", model.out[0], {})
    put("conv_out", model.out[2], {})
    return out


def to_diffusers(model: FaceUNet):
    """The same function as a diffusers `UNet2DModel` (float32, on CPU)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**diffusers_unet_config(model.config))
    unet.load_state_dict(to_diffusers_state_dict(model), strict=True)
    return unet.eval()


__all__ = [
    "FaceUNet",
    "FaceUNetConfig",
    "face_unet_from_state_dict",
    "config_from_state_dict",
    "diffusers_unet_config",
    "to_diffusers_state_dict",
    "to_diffusers",
]
