"""VAR for the digits: a multi-scale residual VQ tokenizer and a next-scale prediction transformer.

Tian et al. 2024 (code FoundationVision/VAR), sized for 16x16 digits:

- **Scales.** The tokenizer downsamples 2x to an 8x8 latent grid, quantized at the scales
  ``patch_nums = (1, 2, 3, 4, 5, 6, 8)``: 155 tokens in 7 scales. 8x8 is the coarsest grid that
  still reconstructs the digits' strokes (a 4x4 grid loses them), and 7 scales keep VAR's shape:
  several cheap early scales, then late scales (5x5, 6x6, 8x8 = 125 of the 155 tokens) that hold
  most of the cost, which is what VARiant's subnets save.
- **Tokenizer** (:class:`MultiScaleVQ`): f = enc(x); f_rest = f; per scale k: z = area_down(f_rest,
  pn_k), idx = nearest code, h = phi_k(bicubic_up(e[idx])), f_hat += h, f_rest -= h; x_hat =
  dec(f_hat). phi(h) = 0.5 h + 0.5 conv3x3(h), four convs shared across scales by argmin |ticks -
  k/(K-1)|, ticks = linspace(1/12, 11/12, 4). One codebook for every scale.
- **Transformer** (:class:`VAR`): adaLN blocks conditioned on the class embedding (SiLU -> Linear(C,
  6C) chunked into gamma1, gamma2, scale1, scale2, shift1, shift2; LN without affine, eps 1e-6;
  x += gamma1 Attn(LN(x)(1 + scale1) + shift1); x += gamma2 FFN(...)), attention with L2-normalised
  q and k, q scaled by exp(min(s_h, ln 100)) (s_h initialised ln 4) and softmax scale 1, MLP 4x
  GELU(tanh). Scale k's tokens are
  word_embed(area_down(f_hat_<k, pn_k)); every token adds its absolute position and level embedding.
  The start token is word_embed(0) + class embedding + position 0 (VAR's pos_start is position 0).

Training is teacher-forced over all 155 tokens with the block-causal mask (level i sees levels <=
i). Inference is the real per-scale path: ``VAR.forward(x, label, *cache)`` runs one scale's
tokens against the keys and values of the earlier scales and returns the logits and the grown
cache, so the graph graphopt captures is the one that samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.ops.block_causal_attention import block_causal_mask


@dataclasses.dataclass(frozen=True)
class VQConfig:
    resolution: int = 16
    in_channels: int = 1
    channels: int = 48
    latent_channels: int = 16
    codebook_size: int = 256
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    phi_convs: int = 4
    phi_mix: float = 0.5
    beta: float = 0.25


@dataclasses.dataclass(frozen=True)
class VARConfig:
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    latent_channels: int = 16
    codebook_size: int = 256
    dim: int = 64
    depth: int = 12
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1
    resolution: int = 16  # of the images its tokenizer encodes

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)


def level_ids(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(L,) the scale index of every token of the flattened next-scale sequence."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(patch_nums)])


def _resize(h: torch.Tensor, size: int) -> torch.Tensor:
    if h.shape[-1] == size:
        return h
    if h.shape[-1] > size:
        return F.interpolate(h, size=(size, size), mode="area")
    return F.interpolate(h, size=(size, size), mode="bicubic")


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Phi(nn.Module):
    """phi(h) = (1 - mix) h + mix conv3x3(h)."""

    def __init__(self, c: int, mix: float):
        super().__init__()
        self.mix = mix
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (1 - self.mix) * h + self.mix * self.conv(h)


class MultiScaleVQ(nn.Module):
    """Encoder, multi-scale residual quantizer and decoder (see the module docstring)."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        if config.patch_nums[-1] != config.resolution // 2:
            raise ValueError(f"the last scale must be the latent grid ({config.resolution // 2} for "
                             f"{config.resolution}x{config.resolution} images), got {config.patch_nums}")
        self.config = config
        c, z = config.channels, config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(config.in_channels, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 4, stride=2, padding=1), _Res(c), nn.SiLU(), nn.Conv2d(c, z, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(z, c, 3, padding=1), _Res(c), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, config.in_channels, 3, padding=1))
        self.codebook = nn.Embedding(config.codebook_size, z)
        nn.init.uniform_(self.codebook.weight, -1 / config.codebook_size, 1 / config.codebook_size)
        self.phis = nn.ModuleList([Phi(z, config.phi_mix) for _ in range(config.phi_convs)])

    @property
    def latent_size(self) -> int:
        return self.config.patch_nums[-1]

    def phi(self, k: int) -> Phi:
        """The phi conv shared by scale ``k``: argmin |ticks - k/(K-1)|, ticks = linspace(1/12, 11/12, n)."""
        n, scales = len(self.phis), len(self.config.patch_nums)
        ticks = torch.linspace(1 / 12, 11 / 12, n)
        return self.phis[int((ticks - k / max(scales - 1, 1)).abs().argmin())]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, p, p) latents -> (B, p*p) code indices by L2 distance."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.codebook.weight
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1).reshape(z.shape[0], -1)

    def embed(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Scale ``k``'s indices (B, p*p) -> phi_k(up(e[idx])) on the full latent grid (B, C, S, S)."""
        p = self.config.patch_nums[k]
        h = self.codebook(idx).reshape(idx.shape[0], p, p, -1).permute(0, 3, 1, 2)
        return self.phi(k)(_resize(h, self.latent_size))

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(indices per scale, f_hat, VQ loss) of latents ``f`` (B, C, S, S)."""
        f_rest, f_hat = f.detach(), torch.zeros_like(f)
        indices, loss = [], f.new_zeros(())
        for k, p in enumerate(self.config.patch_nums):
            idx = self.nearest(_resize(f_rest, p))
            h = self.embed(k, idx)
            f_hat = f_hat + h
            f_rest = f_rest - h
            indices.append(idx)
            loss = loss + F.mse_loss(f_hat, f.detach()) + self.config.beta * F.mse_loss(f_hat.detach(), f)
        f_hat = f + (f_hat - f).detach()  # straight-through to the encoder
        return indices, f_hat, loss / len(self.config.patch_nums)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 1, R, R) in [-1, 1] -> code indices per scale, each (B, p*p)."""
        return self.quantize(self.encoder(x))[0]

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_hat)

    def decode_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(sum(self.embed(k, idx) for k, idx in enumerate(indices)))

    def teacher_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs for scales 1..K-1 (B, L - 1, C): area_down(f_hat_<k, pn_k), flattened."""
        f_hat, parts = None, []
        for k, idx in enumerate(indices[:-1]):
            h = self.embed(k, idx)
            f_hat = h if f_hat is None else f_hat + h
            nxt = _resize(f_hat, self.config.patch_nums[k + 1])
            parts.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def restart_codes(self, x: torch.Tensor, generator: torch.Generator) -> int:
        """Training aid: move the codes no scale of ``x`` uses to random latents of ``x``; returns how many.

        A code that is nearest to nothing never receives a gradient; restarting it on the data keeps
        the whole codebook in use (Dhariwal et al.'s Jukebox restarts dead codes the same way).
        """
        f = self.encoder(x)
        used = torch.zeros(self.config.codebook_size, dtype=torch.bool)
        pool = []
        f_rest = f
        for k, p in enumerate(self.config.patch_nums):
            z = _resize(f_rest, p)
            idx = self.nearest(z)
            used[idx.flatten()] = True
            pool.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
            f_rest = f_rest - self.embed(k, idx)
        dead = (~used).nonzero().flatten()
        if len(dead):
            pool_t = torch.cat(pool)
            pick = torch.randint(0, len(pool_t), (len(dead),), generator=generator)
            self.codebook.weight[dead] = pool_t[pick]
        return len(dead)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, VQ loss): the training objective's two terms."""
        _, f_hat, loss = self.quantize(self.encoder(x))
        return self.decode(f_hat), loss


class Attention(nn.Module):
    """VAR's attention: L2-normalised q and k, q scaled by exp(min(s_h, ln 100)), softmax scale 1."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scale_mul = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1) * self.scale_mul.clamp(max=math.log(100.0)).exp()
        return q, F.normalize(k, dim=-1), v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))

    def masked(self, x: torch.Tensor, mask: torch.Tensor,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Many scales at once under ``mask`` (training), after the keys and values ``prefix`` of
        earlier tokens when given; returns (out, keys, values)."""
        q, k, v = self._qkv(x)
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)), k, v

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scale's tokens against the earlier scales' keys and values; returns (out, keys, values)."""
        q, k, v = self._qkv(x)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return self._out(F.scaled_dot_product_attention(q, k, v, scale=1.0)), k, v


class VARBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def _modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m.unsqueeze(1) for m in self.ada_lin(cond).chunk(6, dim=1))

    def masked(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Many scales at once under ``mask`` (training); returns (x, keys, values)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self._modulation(cond)
        a, k, v = self.attn.masked(self.norm1(x) * (1 + scale1) + shift1, mask, prefix)
        x = x + gamma1 * a
        return x + gamma2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2), k, v

    def forward(self, x: torch.Tensor, cond: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scale's tokens with the cache of the earlier scales; returns (x, keys, values)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self._modulation(cond)
        a, k, v = self.attn(self.norm1(x) * (1 + scale1) + shift1, past_k, past_v)
        x = x + gamma1 * a
        return x + gamma2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2), k, v


class VAR(nn.Module):
    """Next-scale prediction over :class:`MultiScaleVQ`'s tokens, class conditional.

    ``forward(x, label, *cache)`` is one inference scale: ``x`` (B, p*p, C_latent) the scale's inputs
    (zeros for the first scale, whose single token is the start token: the class embedding at the
    first position), ``label`` (B,) with
    ``num_classes`` the null class, and ``cache`` the keys and values of the earlier scales, two
    tensors (B, H, T, D/H) per block in block order (T = 0 for the first scale). Returns the
    scale's logits (B, p*p, V) followed by every block's keys and values grown by this scale.
    :meth:`teacher_forced` is the training forward over the whole sequence.
    """

    def __init__(self, config: VARConfig = VARConfig()):
        super().__init__()
        self.config = config
        c, n = config.dim, config.tokens
        self.word_embed = nn.Linear(config.latent_channels, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.pos_embed = nn.Parameter(torch.randn(1, n, c) * 0.02)
        self.lvl_embed = nn.Embedding(len(config.patch_nums), c)
        self.blocks = nn.ModuleList([VARBlock(c, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.head_norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, config.codebook_size)
        self.register_buffer("levels", level_ids(config.patch_nums), persistent=False)
        self._init_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=0.02)
        for block in self.blocks:  # small modulation: every block starts near the identity
            block.ada_lin[-1].weight.data.mul_(0.1)
        self.head.weight.data.mul_(0.5)

    def _scale_at(self, start: int) -> int:
        offset = 0
        for k, p in enumerate(self.config.patch_nums):
            if offset == start:
                return k
            offset += p * p
        raise ValueError(f"a cache of {start} tokens does not end at a scale boundary of {self.config.patch_nums}")

    def _head(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.head_ada(cond).unsqueeze(1).chunk(2, dim=2)
        return self.head(self.head_norm(h) * (1 + scale) + shift)

    def teacher_forced(self, inputs: torch.Tensor, label: torch.Tensor, subnet: tuple[int, ...] | None = None,
                       bridge_tokens: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) for all scales at once: ``inputs`` (B, L - 1, C_latent) from
        :meth:`MultiScaleVQ.teacher_inputs`, block-causal attention.

        With ``subnet`` (block indices) also the logits of the tokens after the first
        ``bridge_tokens`` as VARiant's subnet computes them: only those blocks, each attending to the
        bridge tokens' keys and values from the full path, then block-causally among themselves.
        Training on both makes the subnets work with the full model's weights (VARiant's joint
        training with weight sharing)."""
        cond = self.class_emb(label)
        start = inputs.new_zeros((inputs.shape[0], 1, inputs.shape[2]))
        h = self.word_embed(torch.cat([start, inputs], dim=1)) + self.pos_embed + self.lvl_embed(self.levels)
        h = torch.cat([h[:, :1] + cond.unsqueeze(1), h[:, 1:]], dim=1)
        embedded = h
        mask = block_causal_mask(self.levels)
        bridge: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in self.blocks:
            h, k, v = block.masked(h, cond, mask)
            bridge.append((k[:, :, :bridge_tokens], v[:, :, :bridge_tokens]))
        logits = self._head(h, cond)
        if subnet is None:
            return logits
        late = embedded[:, bridge_tokens:]
        for i in subnet:  # late queries see the bridge prefix and the late tokens of their level or below
            late, _, _ = self.blocks[i].masked(late, cond, mask[bridge_tokens:], bridge[i])
        return logits, self._head(late, cond)

    def forward(self, x: torch.Tensor, label: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(cache) != 2 * len(self.blocks):
            raise ValueError(f"expected {2 * len(self.blocks)} cache tensors (keys and values per block), got {len(cache)}")
        start, length = cache[0].shape[2], x.shape[1]
        scale = self._scale_at(start)
        cond = self.class_emb(label)
        h = self.word_embed(x) + self.pos_embed[:, start:start + length] + self.lvl_embed.weight[scale]
        if scale == 0:  # the start token: the class embedding at the first position
            h = h + cond.unsqueeze(1)
        grown: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h, k, v = block(h, cond, cache[2 * i], cache[2 * i + 1])
            grown += [k, v]
        return (self._head(h, cond), *grown)

    def example_inputs(self, batch: int = 2, scale: int = -1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of one per-scale call (default: the last scale, which costs the most) with a random
        cache of the earlier scales' length: what graphopt captures the model on."""
        c = self.config
        scale = scale % len(c.patch_nums)
        start = sum(p * p for p in c.patch_nums[:scale])
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, c.patch_nums[scale] ** 2, c.latent_channels), generator=g)
        label = torch.arange(batch) % (c.num_classes + 1)
        shape = (batch, c.heads, start, c.dim // c.heads)
        cache = tuple(F.normalize(torch.randn(shape, generator=g), dim=-1) for _ in range(2 * c.depth))
        return (x, label, *cache)

    def empty_cache(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, ...]:
        """The cache before the first scale: two (B, H, 0, D/H) tensors per block."""
        c = self.config
        shape = (batch, c.heads, 0, c.dim // c.heads)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * c.depth))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the ``top_k`` largest and the ``top_p`` nucleus set to -inf
    (``top_k`` 0 and ``top_p`` 1 keep everything). The most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # mass before this token already > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample an index per row of ``probs`` (..., V) with the uniform draws ``u`` (...): the first index
    whose cumulative probability exceeds ``u``. Deterministic given ``u``, so two models compared on
    the same draws differ only by their probabilities."""
    cdf = probs.cumsum(dim=-1)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.unsqueeze(-1).to(cdf.dtype), right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@dataclasses.dataclass(frozen=True)
class VARSampler:
    """Next-scale sampling with a VAR transformer and its tokenizer, one model call per scale.

    Per scale k: the transformer's logits for the scale's tokens (conditional and null-class halves
    in one call), guidance ``(1 + t) cond - t uncond`` with t = ``cfg_scale`` k/(K-1), top-k/top-p
    filtering, one token per position drawn by inverse CDF from the "noise" (uniform draws, one per
    token, seeded), then f_hat += phi_k(up(e[idx])) and the next scale's inputs area_down(f_hat,
    pn_{k+1}). The cache of keys and values grows through the model's outputs. Images are the
    tokenizer's decoding of f_hat. ``sample(model, noise, labels)`` takes any callable with
    :class:`VAR`'s per-scale signature, so an optimized module drops in.
    """

    tokenizer: MultiScaleVQ
    patch_nums: tuple[int, ...]
    cache: tuple[int, int, int]  # (blocks, heads, head dim) of the model's cache
    num_classes: int = 10
    # chosen on the first (full-model only) checkpoint, 500 samples of seed 0: FD 18.0 at guidance 1.0,
    # 23.3 at 1.5, 29.9 at 2.0 (top-p 0.95-1), class agreement >= 0.996 at each
    cfg_scale: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    family: str = "var"
    method: str = "next-scale"

    @staticmethod
    def for_model(model: VAR, tokenizer: MultiScaleVQ, **options: object) -> "VARSampler":
        """The sampler of ``model`` (its scales and cache geometry) decoding with ``tokenizer``."""
        c = model.config
        return VARSampler(tokenizer, c.patch_nums, (c.depth, c.heads, c.dim // c.heads), c.num_classes,
                          **options)  # type: ignore[arg-type]

    @property
    def steps(self) -> int:
        return len(self.patch_nums)

    @property
    def nfe(self) -> int:
        """Model calls per image: one per scale (guidance batches both halves into that call)."""
        return len(self.patch_nums)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def with_steps(self, steps: int, method: str | None = None) -> "VARSampler":
        if steps != self.steps or method not in (None, self.method):
            raise ValueError(f"a VAR sampler runs its {self.steps} scales with method {self.method!r}; "
                             f"it has no {steps}-step {method or self.method} schedule")
        return self

    def noise(self, n: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """(n, tokens) seeded uniform draws: the randomness of every token choice."""
        g = torch.Generator().manual_seed(seed)
        return torch.rand((n, self.tokens), generator=g, dtype=torch.float64).to(device)

    def labels(self, n: int, seed: int, num_classes: int = 10) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, num_classes, (n,), generator=g)

    def sample(self, model: Callable, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images (n, 1, R, R) (not clamped) from ``noise`` (n, tokens) and ``labels`` (n,)."""
        return self.sample_steps(lambda scale: model, noise, labels)

    def sample_steps(self, model_at: Callable[[int], Callable], noise: torch.Tensor,
                     labels: torch.Tensor | None = None, *, on_cache: Callable[[int, tuple], None] | None = None
                     ) -> torch.Tensor:
        """:meth:`sample` with the model chosen per scale (``model_at(k)``); ``on_cache(k, cache)`` sees
        the cache held after each scale (for measuring it)."""
        n = noise.shape[0]
        if labels is None:
            labels = self.labels(n, 0, self.num_classes)
        tok = self.tokenizer
        param = next(tok.parameters())
        z = tok.config.latent_channels
        guided = self.cfg_scale != 0.0
        label_in = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        rows = 2 * n if guided else n
        blocks, heads, head_dim = self.cache
        cache: tuple[torch.Tensor, ...] = tuple(param.new_zeros((rows, heads, 0, head_dim)) for _ in range(2 * blocks))
        f_hat = param.new_zeros((n, z, tok.latent_size, tok.latent_size))
        x = param.new_zeros((n, 1, z))
        offset, scales = 0, len(self.patch_nums)
        with torch.no_grad():
            for k, p in enumerate(self.patch_nums):
                out = model_at(k)(torch.cat([x, x]) if guided else x, label_in, *cache)
                logits, cache = out[0], tuple(out[1:])
                if on_cache is not None:
                    on_cache(k, cache)
                if guided:
                    cond, uncond = logits.float().chunk(2)
                    t = self.cfg_scale * k / max(scales - 1, 1)
                    logits = (1 + t) * cond - t * uncond
                probs = filter_logits(logits.float(), self.top_k, self.top_p).softmax(dim=-1)
                idx = inverse_cdf(probs, noise[:, offset:offset + p * p].to(probs.device))
                offset += p * p
                f_hat = f_hat + tok.embed(k, idx)
                if k + 1 < scales:
                    x = _resize(f_hat, self.patch_nums[k + 1]).flatten(2).transpose(1, 2)
            return tok.decode(f_hat)

