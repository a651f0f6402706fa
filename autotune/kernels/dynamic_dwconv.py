"""ATConv's dynamic depthwise convolution: one k x k kernel per (sample, channel), shared by all positions.

With V in R^{B x C x H x W}, kernels K in R^{B x C x k x k} (k odd; ATConv uses k = 3), zero padding
p = k // 2 and no bias::

    Y[b, c, y, x] = sum_{i, j < k} K[b, c, i, j] V[b, c, y + i - p, x + j - p]      (V = 0 outside the image)

i.e. ``conv2d(V.reshape(1, B*C, H, W), K.reshape(B*C, 1, k, k), padding=p, groups=B*C)`` (a
cross-correlation, as every torch conv). ATen runs that as a grouped convolution with B*C groups and
per-group weights; here it is one pass: a program owns a ``BLOCK_H x BLOCK_W`` output tile of one
(sample, channel) plane, loads its k^2 weights once, and accumulates k^2 shifted, masked loads of the
input tile (neighbouring taps hit the cache, so V is read from memory about once). Accumulation is fp32.

:func:`generated_dwconv_plan` also computes ATConv's kernel generation in the same program (the
routed values' GELU, the shared k^2 x k^2 generator, lateral inhibition): a lowered graph runs it in
place of those ops and the convolution (:mod:`graphopt.autotune.atconv`). The pooling and the C x C
routing linear before it stay ATen ops.

Not supported: even kernel sizes, stride or dilation other than 1, other paddings, a bias, backward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from graphopt.ops.dynamic_dwconv import dynamic_dwconv_reference  # noqa: F401 - the op's formula, re-exported

from ._launch import (Buffer, KernelCall, LaunchPlan, Ref, check_device, check_float, check_shape, contiguous_strides,
                      next_power_of_2, pick_config)


@triton.jit
def _dwconv_tile(v_plane, o_plane, weights, taps, H, W, stride_vh, stride_vw, stride_oh, stride_ow,
                 KERNEL_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One output tile: the k^2 shifted, masked loads of the input plane, each times its tap's weight
    (``weights[t]`` for tap ``t = i * k + j``, fp32), accumulated in fp32 and stored."""
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in tl.static_range(KERNEL_SIZE):
        src_rows = rows + (i - KERNEL_SIZE // 2)
        rows_ok = (src_rows >= 0) & (src_rows < H)
        for j in tl.static_range(KERNEL_SIZE):
            src_cols = cols + (j - KERNEL_SIZE // 2)
            ok = rows_ok[:, None] & ((src_cols >= 0) & (src_cols < W))[None, :]
            x = tl.load(v_plane + src_rows[:, None] * stride_vh + src_cols[None, :] * stride_vw, mask=ok, other=0.0)
            weight = tl.sum(tl.where(taps == i * KERNEL_SIZE + j, weights, 0.0), axis=0)
            acc += weight * x.to(tl.float32)
    tl.store(o_plane + rows[:, None] * stride_oh + cols[None, :] * stride_ow, acc.to(o_plane.dtype.element_ty),
             mask=(rows < H)[:, None] & (cols < W)[None, :])


@triton.jit
def dynamic_dwconv_kernel(v_ptr, w_ptr, o_ptr, C, H, W,
                          stride_vb, stride_vc, stride_vh, stride_vw,
                          stride_wb, stride_wc, stride_wi, stride_wj,
                          stride_ob, stride_oc, stride_oh, stride_ow,
                          KERNEL_SIZE: tl.constexpr, TAPS: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    pid_bc = tl.program_id(0).to(tl.int64)
    b = pid_bc // C
    c = pid_bc % C
    taps = tl.arange(0, TAPS)  # TAPS: k^2 rounded up to a power of two
    taps_ok = taps < KERNEL_SIZE * KERNEL_SIZE
    w_plane = w_ptr + b * stride_wb + c * stride_wc
    weights = tl.load(w_plane + (taps // KERNEL_SIZE) * stride_wi + (taps % KERNEL_SIZE) * stride_wj, mask=taps_ok,
                      other=0.0).to(tl.float32)
    _dwconv_tile(v_ptr + b * stride_vb + c * stride_vc, o_ptr + b * stride_ob + c * stride_oc, weights, taps, H, W,
                 stride_vh, stride_vw, stride_oh, stride_ow, KERNEL_SIZE, BLOCK_H, BLOCK_W)


@triton.jit
def generated_dwconv_kernel(v_ptr, r_ptr, gw_ptr, gb_ptr, s_ptr, o_ptr, C, H, W,
                            stride_vb, stride_vc, stride_vh, stride_vw,
                            stride_rb, stride_rc, stride_rt,
                            stride_gw0, stride_gw1, stride_gb, stride_sc,
                            stride_ob, stride_oc, stride_oh, stride_ow,
                            KERNEL_SIZE: tl.constexpr, TAPS: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_W: tl.constexpr):
    """ATConv's kernel generation in registers, then the convolution: per (sample, channel) the k^2
    routed values r, K = GELU_tanh(r) @ gen_w^T + gen_b, K -= s_c * mean(K) (s = sigmoid(lambda))."""
    pid_bc = tl.program_id(0).to(tl.int64)
    b = pid_bc // C
    c = pid_bc % C
    taps = tl.arange(0, TAPS)
    taps_ok = taps < KERNEL_SIZE * KERNEL_SIZE
    r = tl.load(r_ptr + b * stride_rb + c * stride_rc + taps * stride_rt, mask=taps_ok, other=0.0).to(tl.float32)
    # GELU, tanh form: 0.5 r (1 + tanh(u)) = r sigmoid(2u), u = sqrt(2/pi) (r + 0.044715 r^3)
    g = r * tl.sigmoid(1.5957691216057308 * (r + 0.044715 * r * r * r))
    gen = tl.load(gw_ptr + taps[:, None] * stride_gw0 + taps[None, :] * stride_gw1,
                  mask=taps_ok[:, None] & taps_ok[None, :], other=0.0).to(tl.float32)  # [out tap, in tap]
    weights = tl.sum(gen * g[None, :], axis=1) + tl.load(gb_ptr + taps * stride_gb, mask=taps_ok, other=0.0).to(tl.float32)
    weights = tl.where(taps_ok, weights, 0.0)
    mean = tl.sum(weights, axis=0) / (KERNEL_SIZE * KERNEL_SIZE)
    weights = weights - tl.load(s_ptr + c * stride_sc).to(tl.float32) * mean
    _dwconv_tile(v_ptr + b * stride_vb + c * stride_vc, o_ptr + b * stride_ob + c * stride_oc, weights, taps, H, W,
                 stride_vh, stride_vw, stride_oh, stride_ow, KERNEL_SIZE, BLOCK_H, BLOCK_W)


def dynamic_dwconv(v: torch.Tensor, kernels: torch.Tensor, *,
                   config: Mapping[str, int] | None = None) -> torch.Tensor:
    """Depthwise convolution of ``v`` (B, C, H, W) with per-sample ``kernels`` (B, C, k, k), padding k // 2.

    ``v`` and ``kernels``: fp32/fp16/bf16 (the same dtype), any strides; k odd. Returns a new contiguous
    (B, C, H, W) tensor. ``config``: one of :func:`configs` (default: the first).
    """
    return dynamic_dwconv_plan(v, kernels, config=config).run((v, kernels))[0]


def dynamic_dwconv_plan(v: torch.Tensor, kernels: torch.Tensor, *,
                        config: Mapping[str, int] | None = None) -> LaunchPlan:
    """:func:`dynamic_dwconv`'s checks, then its allocation and launch as a :class:`LaunchPlan`."""
    op = "dynamic_dwconv"
    check_device(op, dynamic_dwconv_kernel, v=v, kernels=kernels)
    check_float(op, "v", v)
    check_float(op, "kernels", kernels, like=v)
    if v.dim() != 4:
        raise ValueError(f"{op}: v must have shape (B, C, H, W), got {tuple(v.shape)}")
    batch, channels, height, width = v.shape
    if kernels.dim() != 4 or kernels.shape[-1] != kernels.shape[-2] or kernels.shape[-1] % 2 == 0:
        raise ValueError(f"{op}: kernels must have shape ({batch}, {channels}, k, k) with k odd, "
                         f"got {tuple(kernels.shape)}")
    ksize = kernels.shape[-1]
    check_shape(op, "kernels", kernels, (batch, channels, ksize, ksize), "one k x k kernel per sample and channel")
    cfg = pick_config(op, configs, config)

    shape = (batch, channels, height, width)
    o = Buffer("o", shape, contiguous_strides(shape), v.dtype)
    if batch * channels * height * width == 0:
        return LaunchPlan(("v", "kernels"), (o,), (), ("o",))
    grid = (batch * channels, triton.cdiv(height, cfg["BLOCK_H"]), triton.cdiv(width, cfg["BLOCK_W"]))
    if max(grid[1:]) > 65535:
        raise ValueError(f"{op}: {height} x {width} planes need more than 65535 tiles along an axis; "
                         f"use larger BLOCK_H/BLOCK_W")
    call = KernelCall(dynamic_dwconv_kernel, grid, (Ref("v"), Ref("kernels"), Ref("o"), channels, height, width,
                                                    *v.stride(), *kernels.stride(), *o.strides),
                      (("KERNEL_SIZE", ksize), ("TAPS", next_power_of_2(ksize * ksize)), *cfg.items()))
    return LaunchPlan(("v", "kernels"), (o,), (call,), ("o",))


def generated_dwconv_plan(v: torch.Tensor, routed: torch.Tensor, gen_weight: torch.Tensor, gen_bias: torch.Tensor,
                          inhibition: torch.Tensor, *, config: Mapping[str, int] | None = None) -> LaunchPlan:
    """ATConv's kernel generation fused into the convolution, as a :class:`LaunchPlan`.

    ``v`` (B, C, H, W); ``routed`` (B, C, k^2): the routing linear's output per sample and channel,
    before its GELU; ``gen_weight`` (k^2, k^2) and ``gen_bias`` (k^2,): the shared kernel generator;
    ``inhibition`` (1, C, 1, 1): sigmoid(lambda) per channel. Computes
    ``dynamic_dwconv(v, K - inhibition * mean(K))`` with ``K = GELU_tanh(routed) @ gen_weight.T +
    gen_bias`` reshaped to (B, C, k, k), without writing K out. Any strides; one float dtype.
    """
    op = "generated_dwconv"
    check_device(op, generated_dwconv_kernel, v=v, routed=routed, gen_weight=gen_weight, gen_bias=gen_bias,
                 inhibition=inhibition)
    for name, t in (("v", v), ("routed", routed), ("gen_weight", gen_weight), ("gen_bias", gen_bias),
                    ("inhibition", inhibition)):
        check_float(op, name, t, like=None if name == "v" else v)
    if v.dim() != 4:
        raise ValueError(f"{op}: v must have shape (B, C, H, W), got {tuple(v.shape)}")
    batch, channels, height, width = v.shape
    taps = routed.shape[-1] if routed.dim() == 3 else 0
    ksize = math.isqrt(taps)
    if routed.dim() != 3 or ksize * ksize != taps or ksize % 2 == 0:
        raise ValueError(f"{op}: routed must have shape ({batch}, {channels}, k^2) with k odd, got {tuple(routed.shape)}")
    check_shape(op, "routed", routed, (batch, channels, taps), "k^2 routed values per sample and channel")
    check_shape(op, "gen_weight", gen_weight, (taps, taps), "the shared k^2 x k^2 generator")
    check_shape(op, "gen_bias", gen_bias, (taps,), "the generator's bias")
    check_shape(op, "inhibition", inhibition, (1, channels, 1, 1), "sigmoid(lambda) per channel")
    cfg = pick_config(op, configs, config)
    shape = (batch, channels, height, width)
    o = Buffer("o", shape, contiguous_strides(shape), v.dtype)
    names = ("v", "routed", "gen_weight", "gen_bias", "inhibition")
    if batch * channels * height * width == 0:
        return LaunchPlan(names, (o,), (), ("o",))
    grid = (batch * channels, triton.cdiv(height, cfg["BLOCK_H"]), triton.cdiv(width, cfg["BLOCK_W"]))
    if max(grid[1:]) > 65535:
        raise ValueError(f"{op}: {height} x {width} planes need more than 65535 tiles along an axis; "
                         f"use larger BLOCK_H/BLOCK_W")
    call = KernelCall(generated_dwconv_kernel, grid,
                      (*map(Ref, names), Ref("o"), channels, height, width, *v.stride(), *routed.stride(),
                       *gen_weight.stride(), *gen_bias.stride(), inhibition.stride(1), *o.strides),
                      (("KERNEL_SIZE", ksize), ("TAPS", next_power_of_2(taps)), *cfg.items()))
    return LaunchPlan(names, (o,), (call,), ("o",))


def generated_dwconv_reference(v: torch.Tensor, routed: torch.Tensor, gen_weight: torch.Tensor,
                               gen_bias: torch.Tensor, inhibition: torch.Tensor) -> torch.Tensor:
    """:func:`generated_dwconv_plan`'s formula in eager ops, as the ATConv pass writes it."""
    batch, channels, taps = routed.shape
    k = math.isqrt(taps)
    kernels = torch.nn.functional.linear(torch.nn.functional.gelu(routed, approximate="tanh"), gen_weight, gen_bias)
    kernels = kernels.reshape(batch, channels, k, k)
    return dynamic_dwconv_reference(v, kernels - inhibition * kernels.mean((2, 3), keepdim=True))


def configs() -> list[dict[str, int]]:
    """Output tile (rows x columns) and warps; the first is the untuned default (a 16 x 16 token grid:
    SiT/DiT-XL/2 at 256 px) and no config has a loop to pipeline, so ``num_stages`` is 1."""
    return [
        {"BLOCK_H": 16, "BLOCK_W": 16, "num_warps": 4, "num_stages": 1},
        {"BLOCK_H": 32, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1},
        {"BLOCK_H": 8, "BLOCK_W": 32, "num_warps": 2, "num_stages": 1},
        {"BLOCK_H": 16, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1},
        {"BLOCK_H": 8, "BLOCK_W": 8, "num_warps": 1, "num_stages": 1},
    ]


def lowering() -> dict[object, Any]:
    """The op this module's kernel runs in a lowered graph (:class:`graphopt.autotune.family.FamilyOp`):
    ``graphopt::dynamic_dwconv`` (ATConv), with no ``tl.dot``."""
    from ..family import FamilyOp

    return {
        torch.ops.graphopt.dynamic_dwconv.default: FamilyOp(
            "dynamic_dwconv", "dynamic_dwconv", ("dynamic_dwconv_kernel", "_dwconv_tile"), 2, lambda n: {},
            lambda v, w: (v.shape[0] * v.shape[1], v.shape[2], v.shape[3], w.shape[-1]),
            torch.ops.graphopt.dynamic_dwconv, uses_dot=False, tensor_names=("v", "kernels")),
    }
