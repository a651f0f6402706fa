"""An EDM-style UNet denoiser (Karras et al. 2022), the architecture Skip-Tuning was published on.

Encoder and decoder with a concatenated skip at every level (each encoder output is pushed on a
list; the decoder pops the deepest first and concatenates it to its input), ResNet blocks with
GroupNorm + SiLU and an additive noise-level embedding, explicit softmax(QK^T / sqrt(d)) V
self-attention at the low resolutions, and EDM preconditioning:

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)      c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_d^2)          c_noise = ln(sigma) / 4

The model returns the denoised image D(x; sigma); samplers integrate dx/dsigma = (x - D) / sigma.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    resolution: int = 16
    in_channels: int = 1
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    heads: int = 2
    emb_dim: int = 128
    dropout: float = 0.0
    sigma_data: float = 0.5
    groups: int = 8


def noise_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the noise level (the frequencies depend on nothing: constant-foldable)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over pixels, written out as softmax(Q K^T / sqrt(d)) V."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3, d, h * w).unbind(1)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=-1)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Level(nn.Module):
    """The blocks of one resolution, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock], attention: list[Attention | None]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList([a if a is not None else nn.Identity() for a in attention])


class EDMUNet(nn.Module):
    """D(x; sigma) for images (B, C, R, R) and noise levels sigma (B,)."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c, emb_dim, groups, drop = config.channels, config.emb_dim, config.groups, config.dropout
        self.map_noise = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)
        widths = [c * m for m in config.channel_mult]
        skip_widths = [c]
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        res, cin = config.resolution, c
        for i, width in enumerate(widths):
            blocks, attn = [], []
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(cin, width, emb_dim, groups, drop))
                attn.append(Attention(width, config.heads, groups) if res in config.attn_resolutions else None)
                cin = width
                skip_widths.append(width)
            self.enc.append(Level(blocks, attn))
            if i < len(widths) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skip_widths.append(cin)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cin, cin, emb_dim, groups, drop), Attention(cin, config.heads, groups),
                                  ResBlock(cin, cin, emb_dim, groups, drop)])
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            blocks, attn = [], []
            for _ in range(config.blocks_per_level + 1):
                blocks.append(ResBlock(cin + skip_widths.pop(), width, emb_dim, groups, drop))
                attn.append(Attention(width, config.heads, groups) if res in config.attn_resolutions else None)
                cin = width
            self.dec.append(Level(blocks, attn))
            if i > 0:
                self.up.append(nn.Conv2d(cin, cin, 3, padding=1))
                res *= 2
        self.norm_out = nn.GroupNorm(min(groups, cin), cin)
        self.conv_out = nn.Conv2d(cin, config.in_channels, 3, padding=1)

    def raw(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """F(x; c_noise): the network inside the preconditioning."""
        # computed in fp32 (precise), used in the weights' dtype (fp16/bf16 models)
        emb = self.map_noise(noise_embedding(c_noise, self.config.emb_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.enc):
            for block, attn in zip(level.blocks, level.attention):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
                skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for i, level in enumerate(self.dec):
            for block, attn in zip(level.blocks, level.attention):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.up):
                h = self.up[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.config.sigma_data
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip * x + c_out * self.raw(c_in * x, c_noise)
