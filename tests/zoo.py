"""Small models written in different styles, shared by the tests.

Each factory returns ``(model, args, kwargs)`` with the model in eval mode and fixed weights. The
styles differ on purpose: concatenated UNet skips with explicit softmax(QK^T)V attention, a DiT with
adaLN-Zero and F.scaled_dot_product_attention in a ModuleList, nn.MultiheadAttention, a dataclass
output, keyword-only arguments with a dict output, and UNet skips kept in a popped list, in a dict
by resolution, U-ViT's token skips, a text-conditioned UNet whose transformers wrap residual
blocks in a residual add and a PixArt-style transformer (caption projection, adaLN-single, diffusers'
``squeeze(1)`` on tokens). Each carries ``EXPECTED`` (or a note in its docstring): what the
structural analyses must find in it. :data:`DIFFUSERS` holds diffusers' own denoisers at test size.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding; the frequencies depend on no input, so constant folding can precompute them.
    Computed in fp32, returned in ``t``'s dtype when that is a float one (a model cast to bf16 gets bf16)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


# ---------------------------------------------------------------- UNet with concatenated skips


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(4, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class ConvAttention(nn.Module):
    """Self-attention over pixels written out as softmax(QK^T / sqrt(C)) V with einsum."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class TinyUNet(nn.Module):
    """Two resolutions, four encoder-to-decoder concatenations, attention at the low resolution.

    ``skip_rho`` (tests only; empty by default, so the captured graph is the plain UNet) scales the
    skip the ``i``-th decoder concatenation reads, deepest first: Skip-Tuning written by hand.
    """

    def __init__(self, channels: int = 8, emb_dim: int = 16, use_attention: bool = True):
        super().__init__()
        c = channels
        self.emb_dim = emb_dim
        self.map = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.enc0 = ResBlock(c, c, emb_dim)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c, 2 * c, emb_dim)
        self.enc1_attn = ConvAttention(2 * c) if use_attention else None
        self.mid = nn.ModuleList([ResBlock(2 * c, 2 * c, emb_dim), ResBlock(2 * c, 2 * c, emb_dim)])
        self.dec1 = nn.ModuleList([ResBlock(4 * c, 2 * c, emb_dim), ResBlock(3 * c, 2 * c, emb_dim)])
        self.up = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.dec0 = nn.ModuleList([ResBlock(3 * c, c, emb_dim), ResBlock(2 * c, c, emb_dim)])
        self.norm_out = nn.GroupNorm(4, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        self.skip_rho: dict[int, float] = {}

    def _skip(self, skips: list[torch.Tensor], join: int) -> torch.Tensor:
        skip = skips.pop()
        return skip * self.skip_rho[join] if join in self.skip_rho else skip

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        emb = self.map(timestep_embedding(sigma.log() / 4, self.emb_dim))
        skips = []
        h = self.conv_in(x)
        skips.append(h)
        h = self.enc0(h, emb)
        skips.append(h)
        h = self.down(h)
        skips.append(h)
        h = self.enc1(h, emb)
        if self.enc1_attn is not None:
            h = self.enc1_attn(h)
        skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, block in enumerate(self.dec1):
            h = block(torch.cat([h, self._skip(skips, i)], dim=1), emb)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        for i, block in enumerate(self.dec0):
            h = block(torch.cat([h, self._skip(skips, 2 + i)], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def unet() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = TinyUNet().eval()
    return model, (torch.randn(2, 1, 8, 8), torch.rand(2) + 0.5), {}


# ---------------------------------------------------------------- DiT with adaLN-Zero and SDPA


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.ada(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TinyDiT(nn.Module):
    def __init__(self, size: int = 8, patch: int = 2, dim: int = 32, depth: int = 3, heads: int = 2,
                 classes: int = 10, learn_sigma: bool = False):
        super().__init__()
        self.patch, self.dim, self.learn_sigma = patch, dim, learn_sigma
        self.out_channels = 2 if learn_sigma else 1
        self.x_embed = nn.Conv2d(1, dim, patch, stride=patch)
        grid = size // patch
        self.register_buffer("pos_embed", torch.randn(1, grid * grid, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(classes + 1, dim)  # the last class is the null class for CFG
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, patch * patch * self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(timestep_embedding(t * 1000, self.dim)) + self.y_embed(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        x = self.final(modulate(self.final_norm(x), shift, scale))
        x = self.unpatchify(x)
        if self.learn_sigma:
            x, _ = x.split(1, dim=1)
        return x


def dit() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = TinyDiT(learn_sigma=True).eval()
    return model, (torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])), {}


# ---------------------------------------------------------------- nn.MultiheadAttention encoder


class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class MHAModel(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, tokens: int = 6):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[MHABlock(dim, heads) for _ in range(depth)])
        self.out = nn.Linear(dim, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(tokens) + self.pos
        x = self.blocks(x)
        return self.out(x).contiguous()


def mha() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = MHAModel().eval()
    return model, (torch.randn(3, 6, 4),), {}


# ---------------------------------------------------------------- dataclass output


@dataclasses.dataclass
class DenoiserOutput:
    sample: torch.Tensor
    log_variance: torch.Tensor
    steps: int = 1


class DataclassModel(nn.Module):
    """A small conv denoiser that returns a dataclass, the diffusers habit."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(2, channels, 3, padding=1)
        self.body = nn.ModuleList([ResBlock(channels, channels, channels) for _ in range(2)])
        self.t_proj = nn.Linear(channels, channels)
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> DenoiserOutput:
        emb = self.t_proj(timestep_embedding(timestep, self.t_proj.in_features))
        h = self.conv_in(sample)
        for block in self.body:
            h = block(h, emb)
        eps, log_var = self.conv_out(h).chunk(2, dim=1)
        return DenoiserOutput(sample=eps, log_variance=log_var.clamp(-5, 5))


def dataclass_model() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = DataclassModel().eval()
    return model, (torch.randn(2, 2, 8, 8), torch.tensor([10.0, 500.0])), {}


# ---------------------------------------------------------------- keyword arguments, dict output


class KwargsModel(nn.Module):
    """Keyword-only conditioning, a float knob, split/einsum and a dict of outputs."""

    def __init__(self, dim: int = 12, cond_dim: int = 6):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)
        self.cond = nn.Linear(cond_dim, dim)
        self.mix = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, *, cond: torch.Tensor | None = None, scale: float = 1.0) -> dict:
        a, b = self.proj(x).split(x.shape[-1], dim=-1)
        h = a * torch.sigmoid(b)
        if cond is not None:
            h = h + self.cond(cond)[:, None, :]
        h = torch.einsum("bnd,de->bne", h, self.mix.t().t())
        h = self.norm(x + h * scale)
        return {"eps": h, "energy": (h * h).mean(dim=(1, 2))}


def kwargs_model() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = KwargsModel().eval()
    return model, (torch.randn(2, 5, 12),), {"cond": torch.randn(2, 6), "scale": 0.5}


# ---------------------------------------------------------------- UNet, skips in a list, pooling down


class ListUNet(nn.Module):
    """Three resolutions; max-pooling down, transposed convs up; the skips are a Python list pushed
    after each encoder level and popped by the decoder.

    EXPECTED: 3 concat skip edges (the level outputs, innermost joined first), each from an
    encoder block's exit into a decoder block's entry; 6 residual blocks; no stacks.
    """

    def __init__(self, channels: int = 4, emb_dim: int = 8):
        super().__init__()
        c = channels
        self.emb_dim = emb_dim
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.enc = nn.ModuleList([ResBlock(c, c, emb_dim), ResBlock(c, 2 * c, emb_dim),
                                  ResBlock(2 * c, 2 * c, emb_dim)])
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.ups = nn.ModuleList([nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2),
                                  nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2),
                                  nn.ConvTranspose2d(2 * c, c, 2, stride=2)])
        self.dec = nn.ModuleList([ResBlock(4 * c, 2 * c, emb_dim), ResBlock(4 * c, 2 * c, emb_dim),
                                  ResBlock(2 * c, c, emb_dim)])
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.emb_dim)
        h = self.conv_in(x)
        skips = []
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = F.silu(self.mid(h))
        for up, block in zip(self.ups, self.dec):
            h = block(torch.cat([up(h), skips.pop()], dim=1), emb)
        return self.conv_out(h)


def list_unet() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = ListUNet().eval()
    return model, (torch.randn(2, 1, 16, 16), torch.rand(2) * 1000), {}


# ---------------------------------------------------------------- UNet, skips in a dict by resolution


class DictUNet(nn.Module):
    """Strided convs down, bilinear interpolation up; encoder features are stored in a dict keyed by
    their resolution and looked up by the decoder's current resolution. The 4x4 skip is added, the
    8x8 one concatenated.

    EXPECTED: 2 skip edges, in decoder order an add (4x4) then a concat (8x8); the add is a skip,
    not a residual block.
    """

    def __init__(self, channels: int = 8, emb_dim: int = 8):
        super().__init__()
        c = channels
        self.emb_dim = emb_dim
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.enc = nn.ModuleDict({"r8": ResBlock(c, c, emb_dim), "r4": ResBlock(2 * c, 2 * c, emb_dim)})
        self.down = nn.ModuleDict({"r8": nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                                   "r4": nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)})
        self.mid = ResBlock(2 * c, 2 * c, emb_dim)
        self.mid_attn = ConvAttention(2 * c)
        self.up = nn.ModuleDict({"r4": nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                                 "r8": nn.Conv2d(2 * c, c, 3, padding=1)})
        self.dec = nn.ModuleDict({"r4": ResBlock(2 * c, 2 * c, emb_dim), "r8": ResBlock(2 * c, c, emb_dim)})
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.emb_dim)
        h = self.conv_in(x)
        features: dict[int, torch.Tensor] = {}
        for name in ("r8", "r4"):
            h = self.enc[name](h, emb)
            features[h.shape[-1]] = h
            h = self.down[name](h)
        h = self.mid_attn(self.mid(h, emb))
        for name in ("r4", "r8"):
            h = self.up[name](F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))
            skip = features[h.shape[-1]]
            h = h + skip if name == "r4" else torch.cat([h, skip], dim=1)
            h = self.dec[name](h, emb)
        return self.conv_out(h)


def dict_unet() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = DictUNet().eval()
    return model, (torch.randn(2, 3, 8, 8), torch.rand(2) * 1000), {}


# ---------------------------------------------------------------- U-ViT: long skips between tokens


class UViTBlock(nn.Module):
    """A pre-norm transformer layer; an out-block first merges its long skip, by ``x + skip`` or
    ``linear(cat([x, skip]))``."""

    def __init__(self, dim: int, heads: int, skip: str | None = None):
        super().__init__()
        self.heads, self.skip = heads, skip
        self.skip_linear = nn.Linear(2 * dim, dim) if skip == "concat" else None
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip == "add":
            x = x + skip
        elif self.skip == "concat":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TinyUViT(nn.Module):
    """U-ViT: the time is a token, in-blocks push their outputs, a mid block, out-blocks pop them.
    There is no change of resolution anywhere between a skip's ends.

    EXPECTED: 3 skip edges, innermost first: an add (out_blocks.0) then two concats, each from an
    in-block's exit (the entry of the next in-block or the mid block) into an out-block.
    """

    def __init__(self, size: int = 8, patch: int = 2, dim: int = 16, heads: int = 2, depth: int = 3):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.in_blocks = nn.ModuleList([UViTBlock(dim, heads) for _ in range(depth)])
        self.mid_block = UViTBlock(dim, heads)
        self.out_blocks = nn.ModuleList([UViTBlock(dim, heads, "add" if i == 0 else "concat") for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        time_token = self.time_embed(timestep_embedding(t, self.dim))[:, None, :]
        x = torch.cat([time_token, tokens], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, 1:]
        p = self.patch
        x = x.reshape(b, hh // p, ww // p, p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(b, 1, hh, ww)


def uvit() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = TinyUViT().eval()
    return model, (torch.randn(2, 1, 8, 8), torch.rand(2) * 1000), {}


# ---------------------------------------------------------------- text-conditioned UNet


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to ``context`` (``x`` itself for self-attention)."""

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's Transformer2DModel in small: ``x + proj_out(blocks(proj_in(norm(x))))``,
    projecting with 1x1 convs on the image or linears on the tokens."""

    def __init__(self, channels: int, context_dim: int, linear_projection: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(4, channels)
        project = nn.Linear if linear_projection else (lambda cin, cout: nn.Conv2d(cin, cout, 1))
        self.proj_in = project(channels, channels)
        self.block = TransformerBlock(channels, context_dim)
        self.proj_out = project(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        h = self.block(h, context)
        if self.linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(b, c, hh, ww)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww))
        return x + h


class TextUNet(nn.Module):
    """Two resolutions, a ResBlock then a transformer with self- and cross-attention to ``context``
    at each encoder level and after each decoder level, four encoder-to-decoder concatenations.

    EXPECTED: exactly 4 concat skip edges (conv_in, enc0_attn, down, enc1_attn into the four decoder
    ResBlocks); each transformer's ``x + proj_out(...)`` is a residual block whose region holds the
    transformer's 3 inner residual blocks, never a skip edge.
    """

    def __init__(self, channels: int = 8, emb_dim: int = 16, context_dim: int = 12):
        super().__init__()
        c = channels
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.enc0 = ResBlock(c, c, emb_dim)
        self.enc0_attn = SpatialTransformer(c, context_dim)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c, 2 * c, emb_dim)
        self.enc1_attn = SpatialTransformer(2 * c, context_dim, linear_projection=True)
        self.mid = ResBlock(2 * c, 2 * c, emb_dim)
        self.dec1 = nn.ModuleList([ResBlock(4 * c, 2 * c, emb_dim), ResBlock(3 * c, 2 * c, emb_dim)])
        self.dec1_attn = SpatialTransformer(2 * c, context_dim, linear_projection=True)
        self.up = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.dec0 = nn.ModuleList([ResBlock(3 * c, c, emb_dim), ResBlock(2 * c, c, emb_dim)])
        self.dec0_attn = SpatialTransformer(c, context_dim)
        self.norm_out = nn.GroupNorm(4, c)
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.emb_dim))
        h = self.conv_in(x)
        skips = [h]
        h = self.enc0_attn(self.enc0(h, emb), context)
        skips.append(h)
        h = self.down(h)
        skips.append(h)
        h = self.enc1_attn(self.enc1(h, emb), context)
        skips.append(h)
        h = self.mid(h, emb)
        for block in self.dec1:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.dec1_attn(h, context)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        for block in self.dec0:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.dec0_attn(h, context)
        return self.conv_out(F.silu(self.norm_out(h)))


def text_unet() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = TextUNet().eval()
    return model, (torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, 12)), {}


# ---------------------------------------------------------------- PixArt-style transformer, adaLN-single


class PixArtBlock(nn.Module):
    """diffusers' BasicTransformerBlock with ``norm_type="ada_norm_single"``: the block owns no
    modulation MLP, only a learned ``scale_shift_table`` added to the shared timestep projection.
    diffusers squeezes dim 1 after modulating, for the 4-D inputs it once took; on tokens that dim is
    the token count, so the squeeze is an identity torch keeps and ONNX's Squeeze rejects."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = CrossAttention(dim, heads=heads)
        self.attn2 = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        h = (self.norm1(x) * (1 + scale_msa) + shift_msa).squeeze(1)
        x = x + gate_msa * self.attn1(h)
        x = x + self.attn2(x, context)  # PixArt applies no norm before cross-attention
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


class TinyPixArt(nn.Module):
    """PixArt-alpha in small: patchify, an MLP projecting the caption's token embeddings to the
    cross-attention context, adaLN-single (one timestep MLP gives the 6 * dim modulation all blocks
    share), a final layer modulated by its own table, diffusers' ``view``/``squeeze(1)`` habits.

    EXPECTED: no skip edges; per block three chained residual blocks (attn1, attn2, ff), a stack of 2
    units of period 3 under ``blocks``; attn1 and ff take gate, 1 + scale and shift as side inputs,
    attn2 its keys and values; the attn2 sites cross-attend to the 5 caption tokens as projected by
    ``caption_projection``.
    """

    def __init__(self, size: int = 8, patch: int = 2, channels: int = 4, dim: int = 16, depth: int = 2,
                 heads: int = 2, caption_dim: int = 12):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.x_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos_embed", torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.caption_projection = nn.Sequential(nn.Linear(caption_dim, dim), nn.GELU(approximate="tanh"),
                                                nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([PixArtBlock(dim, heads) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        embedded_timestep = self.t_embed(timestep_embedding(timestep, self.dim))
        t = self.t_block(embedded_timestep)
        context = self.caption_projection(encoder_hidden_states).view(b, -1, h.shape[-1])
        for block in self.blocks:
            h = block(h, context, t)
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift).squeeze(1)
        p = self.patch
        h = h.reshape(b, hh // p, ww // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, c, hh, ww)


def pixart() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model = TinyPixArt().eval()
    return model, (torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, 12)), {}


class PerBlockConditioning(nn.Module):
    """Each block conditions itself as diffusers' DiT does: an MLP of the shared timestep features, a
    label table of its own, SiLU, its adaLN linear, chunks, ``1 + scale``; the blocks' token paths
    read the modulation."""

    def __init__(self, dim=8, blocks=3, classes=5, freq=6):
        super().__init__()
        self.dim, self.freq = dim, freq
        self.mlp1 = nn.ModuleList(nn.Linear(freq, dim) for _ in range(blocks))
        self.mlp2 = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.table = nn.ModuleList(nn.Embedding(classes, dim) for _ in range(blocks))
        self.ada = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * torch.arange(1, self.freq // 2 + 1, dtype=t.dtype)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        for mlp1, mlp2, table, ada, proj in zip(self.mlp1, self.mlp2, self.table, self.ada, self.proj):
            emb = mlp2(F.silu(mlp1(features))) + table(y)
            shift, scale, gate = ada(F.silu(emb)).chunk(3, dim=1)
            h = F.layer_norm(x, (self.dim,)) * (1 + scale[:, None]) + shift[:, None]
            x = x + gate[:, None] * proj(h)
        return x


def per_block_conditioning() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    return PerBlockConditioning().eval(), (torch.randn(2, 4, 8), torch.rand(2), torch.tensor([1, 3])), {}


class MicroConditioned(nn.Module):
    """A second batched input read only through a reshape to the first's batch (diffusers' UVit2D
    embeds its micro-conditioning so): torch.export gives its batch a symbol of its own."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4 + 10, 8)

    def forward(self, x: torch.Tensor, micro: torch.Tensor) -> torch.Tensor:
        flat = micro.flatten()[:, None]
        embedded = torch.cat([flat.sin(), flat.cos()], -1).reshape(x.shape[0], -1)
        return self.lin(torch.cat([x, embedded], 1))


def micro_conditioned() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    return MicroConditioned().eval(), (torch.randn(3, 4), torch.randn(3, 5)), {}


ZOO = {
    "unet": unet,
    "dit": dit,
    "mha": mha,
    "dataclass": dataclass_model,
    "kwargs": kwargs_model,
    "list_unet": list_unet,
    "dict_unet": dict_unet,
    "uvit": uvit,
    "text_unet": text_unet,
    "pixart": pixart,
}


# ---------------------------------------------------------------- diffusers' own denoisers, tiny


class Diffusers(nn.Module):
    """A diffusers model called with positional tensors (named ``names``; ``a.b`` is key ``b`` of the
    dict argument ``a``), its first output returned."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], **extra: object):
        super().__init__()
        self.model, self.names, self.extra = model, names, extra
        self.return_dict = "return_dict" in inspect.signature(model.forward).parameters

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, object] = dict(self.extra, return_dict=False) if self.return_dict else dict(self.extra)
        for name, tensor in zip(self.names, tensors):
            outer, _, inner = name.partition(".")
            if inner:
                kwargs.setdefault(outer, {})[inner] = tensor  # type: ignore[index]
            else:
                kwargs[name] = tensor
        out = self.model(**kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _x_t() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 8, 8), torch.tensor([10, 500])


def _unet2d_condition(d):
    model = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return model, ("sample", "timestep", "encoder_hidden_states"), (*_x_t(), torch.randn(2, 7, 32)), {}


def _sdxl_unet(d):
    """SDXL's UNet layout: text-time conditioning (pooled text and six size/crop numbers, embedded
    per number and reshaped to the batch), two transformer layers in the lower level."""
    model = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4, transformer_layers_per_block=(1, 2))
    names = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds",
             "added_cond_kwargs.time_ids")
    return model, names, (*_x_t(), torch.randn(2, 7, 32), torch.randn(2, 16), torch.rand(2, 6) * 100), {}


def _dit(d):
    model = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model, ("hidden_states", "timestep", "class_labels"), (*_x_t(), torch.tensor([1, 3])), {}


def _pixart(d):
    model = d.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=16, norm_num_groups=8, use_additional_conditions=False)
    x, t = _x_t()
    return (model, ("hidden_states", "encoder_hidden_states", "timestep"), (x, torch.randn(2, 7, 16), t),
            {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})


def _sd3(d):
    model = d.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8)
    x, t = _x_t()
    return (model, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
            (x, torch.randn(2, 7, 16), torch.randn(2, 16), t), {})


def _flux(d):
    model = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    return (model, names, (torch.randn(2, 16, 16), torch.randn(2, 7, 32), torch.randn(2, 32),
                           torch.tensor([0.01, 0.5]), torch.zeros(16, 3), torch.zeros(7, 3)), {})


def _sana(d):
    model = d.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1)
    x, t = _x_t()
    return model, ("hidden_states", "encoder_hidden_states", "timestep"), (x, torch.randn(2, 7, 16), t), {}


def _hunyuan(d):
    """HunyuanDiT: U-ViT-style long skips between its blocks, two text encoders with masks."""
    model = d.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, num_layers=4,
        sample_size=8, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=7,
        text_len_t5=5, use_style_cond_and_image_meta_size=False)
    names = ("hidden_states", "timestep", "encoder_hidden_states", "text_embedding_mask", "encoder_hidden_states_t5",
             "text_embedding_mask_t5")
    x, t = _x_t()
    return model, names, (x, t.float(), torch.randn(2, 7, 16), torch.ones(2, 7), torch.randn(2, 5, 16),
                          torch.ones(2, 5)), {}


def _uvit2d(d):
    model = d.UVit2DModel(
        hidden_size=32, use_bias=False, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
        encoder_hidden_size=16, vocab_size=17, codebook_size=16, in_channels=8, block_out_channels=16,
        num_res_blocks=1, downsample=False, upsample=False, block_num_heads=2, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, sample_size=4)
    names = ("input_ids", "encoder_hidden_states", "pooled_text_emb", "micro_conds")
    return model, names, (torch.randint(0, 16, (2, 4, 4)), torch.randn(2, 7, 16), torch.randn(2, 16),
                          torch.randn(2, 5)), {}


DIFFUSERS = {"unet2d_condition": _unet2d_condition, "sdxl_unet": _sdxl_unet, "dit": _dit, "pixart": _pixart,
             "sd3": _sd3, "flux": _flux, "sana": _sana, "hunyuan": _hunyuan, "uvit2d": _uvit2d}
"""diffusers' own denoisers at test size: what third-party code brings that the zoo's imitations may not
(attention processors, embedders, RoPE, micro-conditioning, SDXL's text-time conditioning)."""


def diffusers_model(name: str) -> tuple[nn.Module, tuple, dict]:
    """One of :data:`DIFFUSERS` as ``(model, args, kwargs)``, random weights of seed 0 (needs diffusers)."""
    import diffusers

    torch.manual_seed(0)
    model, names, args, extra = DIFFUSERS[name](diffusers)
    return Diffusers(model, names, **extra).eval(), args, {}
