"""GroupNorm over (B, C, *spatial) tensors (NCHW), with an optional fused SiLU epilogue.

The C channels split into G groups of C/G consecutive channels. For sample b and group g, with S the
C/G * prod(spatial) values of that group::

    mu   = (1/|S|) sum_{s in S} x_s
    var  = (1/|S|) sum_{s in S} (x_s - mu)^2                  (biased, as F.group_norm)
    y_s  = (x_s - mu) / sqrt(var + eps) * w_c + b_c           (c: the channel of s; w, b optional)
    y_s <- y_s * sigmoid(y_s)                                 (optional SiLU: UNet blocks' norm -> act)

In a contiguous NCHW tensor a group is one contiguous run of |S| values, so the kernel needs no
index arithmetic beyond the channel of each value for the affine.

Two kernels, because one program per (sample, group) leaves a GPU idle at small batch (a UNet at batch
2 with 32 groups has 64 groups to spread over ~130 SMs) while each group holds up to 10^5 values:

1. ``groupnorm_stats_kernel``, grid (B*G, SPLITS): each program reduces one chunk of its group to the
   chunk's mean and M2 = sum (x - mean_chunk)^2 (two passes over the chunk, for the same reason as
   LayerNorm: no E[x^2] - mu^2 cancellation).
2. ``groupnorm_apply_kernel``, same grid: each program merges its group's SPLITS partials with Chan's
   parallel formula, mu = sum n_k mu_k / n, M2 = sum (M2_k + n_k (mu_k - mu)^2), and normalises its chunk.

The launcher picks SPLITS from the shape (enough programs to fill a GPU, at least ``BLOCK_SIZE`` values
per chunk); statistics and the epilogue are in fp32 whatever the input dtype.

Not supported: channels-last layouts (call ``.contiguous()``), other epilogues than SiLU, backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from ._launch import check_contiguous, check_device, check_float, check_shape, next_power_of_2, pick_config


@triton.jit
def groupnorm_stats_kernel(x_ptr, mean_ptr, m2_ptr, GROUP_SIZE, CHUNK, SPLITS, BLOCK_SIZE: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, GROUP_SIZE)
    x_group = x_ptr + group * GROUP_SIZE
    offs = tl.arange(0, BLOCK_SIZE)

    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for off in range(start, end, BLOCK_SIZE):
        acc += tl.load(x_group + off + offs, mask=off + offs < end, other=0.0).to(tl.float32)
    count = (end - start).to(tl.float32)
    mean = tl.sum(acc, axis=0) / count

    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for off in range(start, end, BLOCK_SIZE):
        mask = off + offs < end
        x = tl.load(x_group + off + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        acc += d * d
    tl.store(mean_ptr + group * SPLITS + split, mean)
    tl.store(m2_ptr + group * SPLITS + split, tl.sum(acc, axis=0))


@triton.jit
def groupnorm_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, m2_ptr,
                           GROUPS, CHANNELS_PER_GROUP, SPATIAL, GROUP_SIZE, CHUNK, SPLITS, eps,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_SILU: tl.constexpr,
                           SPLITS_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)

    # Chan et al.'s merge of the chunk statistics; every chunk but the last holds CHUNK values
    k = tl.arange(0, SPLITS_BLOCK)
    valid = k < SPLITS
    counts = tl.where(valid, tl.minimum(GROUP_SIZE - k * CHUNK, CHUNK), 0).to(tl.float32)
    means = tl.load(mean_ptr + group * SPLITS + k, mask=valid, other=0.0)
    m2s = tl.load(m2_ptr + group * SPLITS + k, mask=valid, other=0.0)
    mean = tl.sum(counts * means, axis=0) / GROUP_SIZE
    d = means - mean
    var = tl.sum(m2s + counts * d * d, axis=0) / GROUP_SIZE
    rstd = 1.0 / tl.sqrt(var + eps)

    start = split * CHUNK
    end = tl.minimum(start + CHUNK, GROUP_SIZE)
    x_group = x_ptr + group * GROUP_SIZE
    y_group = y_ptr + group * GROUP_SIZE
    first_channel = (group % GROUPS) * CHANNELS_PER_GROUP
    offs = tl.arange(0, BLOCK_SIZE)
    for off in range(start, end, BLOCK_SIZE):
        idx = off + offs
        mask = idx < end
        y = (tl.load(x_group + idx, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        channel = first_channel + idx // SPATIAL
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_group + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


TARGET_PROGRAMS = 1024
"""Programs per launch the split aims for: several per SM on current GPUs (H100: 132 SMs)."""

MAX_SPLITS = 64


def groupnorm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, eps: float = 1e-5, silu: bool = False,
              config: Mapping[str, int] | None = None) -> torch.Tensor:
    """GroupNorm of ``x`` (B, C, *spatial) in ``num_groups`` groups, then optionally SiLU.

    ``x``: contiguous, fp32/fp16/bf16, at least 2-D, C divisible by ``num_groups``. ``weight``,
    ``bias``: (C,), contiguous, any float dtype. Returns a new tensor like ``x``. ``config``: one of
    :func:`configs` (default: the first).
    """
    op = "groupnorm"
    check_device(op, groupnorm_apply_kernel, x=x, weight=weight, bias=bias)
    check_float(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape (B, C, *spatial), got {tuple(x.shape)}")
    check_contiguous(op, "x", x)
    batch, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must be positive and divide the {channels} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float(op, name, p)
            check_shape(op, name, p, (channels,), "one value per channel")
            check_contiguous(op, name, p)
    cfg = pick_config(op, configs, config)

    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    spatial = x[0, 0].numel()
    groups = batch * num_groups
    group_size = channels // num_groups * spatial
    if group_size >= 2**31:  # in-group offsets are int32
        raise ValueError(f"{op}: a group of {group_size} values is too large (at most 2**31 - 1)")
    splits = num_splits(groups, group_size, cfg["BLOCK_SIZE"])
    chunk = triton.cdiv(triton.cdiv(group_size, splits), cfg["BLOCK_SIZE"]) * cfg["BLOCK_SIZE"]
    splits = triton.cdiv(group_size, chunk)  # rounding chunks up to whole blocks may leave fewer non-empty
    mean = torch.empty(groups, splits, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)

    grid = (groups, splits)
    groupnorm_stats_kernel[grid](x, mean, m2, group_size, chunk, splits, **cfg)
    groupnorm_apply_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, m2,
        num_groups, channels // num_groups, spatial, group_size, chunk, splits, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, APPLY_SILU=silu,
        SPLITS_BLOCK=next_power_of_2(splits), **cfg)
    return y


def num_splits(groups: int, group_size: int, block_size: int) -> int:
    """Chunks per group: enough for ``TARGET_PROGRAMS`` in all, but no chunk under one block of values."""
    wanted = triton.cdiv(TARGET_PROGRAMS, groups)
    return max(1, min(wanted, triton.cdiv(group_size, block_size), MAX_SPLITS))


def groupnorm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, *, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """The module docstring's formula in plain torch, in fp32, cast back to ``x.dtype``."""
    batch, channels = x.shape[:2]
    xg = x.float().reshape(batch, num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = (xg - mean).square().mean(-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    per_channel = (channels,) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(per_channel)
    if bias is not None:
        y = y + bias.float().reshape(per_channel)
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)


def configs() -> list[dict[str, int]]:
    """Values per loop step (and the smallest chunk) and warps; the first is the untuned default."""
    return [
        {"BLOCK_SIZE": 1024, "num_warps": 4, "num_stages": 1},
        {"BLOCK_SIZE": 2048, "num_warps": 8, "num_stages": 1},
        {"BLOCK_SIZE": 4096, "num_warps": 8, "num_stages": 1},
        {"BLOCK_SIZE": 512, "num_warps": 4, "num_stages": 1},
        {"BLOCK_SIZE": 256, "num_warps": 2, "num_stages": 1},
    ]
