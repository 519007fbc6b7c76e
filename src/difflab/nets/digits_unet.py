"""A small UNet for 28x28 digits, conditioned on time, domain and digit.

Sized for CPUs: three resolutions (28, 14, 7), FiLM conditioning in every residual block, one attention
layer at 7x7. Each condition factor has its own learned "null" entry, so classifier-free guidance can be
applied to the domain and the digit separately.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DigitsUNetConfig:
    image_size: int = 28
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    emb_dim: int = 128
    num_domains: int = 2
    num_digits: int = 10
    attention: bool = True
    dropout: float = 0.0
    patch: int = 1  # 2: the UNet runs on 2x2 pixel patches (14x14x12 for 28x28x3), a quarter of the cost
    # True: each upsampling convolution runs before the upsample, at the lower resolution, and narrows to the next
    # level's channels: a quarter of its cost and a narrower input for the next block
    conv_before_upsample: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    def shape_name(self) -> str:
        """What sets a step's speed, e.g. "(48, 96) patch 2 conv-first": the key of a cached precision choice."""
        return f"{self.channels} patch {self.patch}" + (" conv-first" if self.conv_before_upsample else "")

    @classmethod
    def from_dict(cls, d: dict) -> "DigitsUNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class DigitsUNet(nn.Module):
    """ε-prediction network: `forward(x, t, cond)` with cond (B, 2) = [domain, digit];
    domain == num_domains and digit == num_digits mean "unconditioned" (the null embeddings)."""

    def __init__(self, config: DigitsUNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or DigitsUNetConfig()
        e = cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.domain_emb = nn.Embedding(cfg.num_domains + 1, e)
        self.digit_emb = nn.Embedding(cfg.num_digits + 1, e)
        self.emb_act = nn.SiLU()

        chans = cfg.channels
        self.stem = nn.Conv2d(cfg.in_channels * cfg.patch**2, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [chans[0]], chans[0]
        for level, c_out in enumerate(chans):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(c, c_out, e, cfg.dropout))
                c = c_out
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, e, cfg.dropout)
        self.mid_attn = Attention(c) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, e, cfg.dropout)
        self.up = nn.ModuleList()
        for level, c_out in reversed(list(enumerate(chans))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), c_out, e, cfg.dropout))
                c = c_out
            if level > 0:
                c_up = chans[level - 1] if cfg.conv_before_upsample else c
                conv, upsample = nn.Conv2d(c, c_up, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")
                layers = (conv, upsample) if cfg.conv_before_upsample else (upsample, conv)
                self.up.append(nn.Sequential(*layers))
                c = c_up
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.in_channels * cfg.patch**2, 3, padding=1))

    @property
    def null_cond(self) -> tuple[int, int]:
        """The ids of "no domain" and "no digit": one past the last real id of each factor."""
        return self.config.num_domains, self.config.num_digits

    def embed(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, self.config.emb_dim))
        return self.emb_act(emb + self.domain_emb(cond[:, 0]) + self.digit_emb(cond[:, 1]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (B, {self.config.in_channels}, H, W) input, got {tuple(x.shape)}")
        emb = self.embed(t, cond)
        h = self.stem(F.pixel_unshuffle(x, self.config.patch))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return F.pixel_shuffle(self.out(h), self.config.patch)
