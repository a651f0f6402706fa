"""ATConv's dynamic depthwise convolution: one k x k kernel per (sample, channel), shared by all positions.

With V in R^{B x C x H x W}, kernels K in R^{B x C x k x k} (k odd; ATConv uses k = 3), zero padding
p = k // 2 and no bias::

    Y[b, c, y, x] = sum_{i, j < k} K[b, c, i, j] V[b, c, y + i - p, x + j - p]      (V = 0 outside the image)

i.e. ``conv2d(V.reshape(1, B*C, H, W), K.reshape(B*C, 1, k, k), padding=p, groups=B*C)`` (a
cross-correlation, as every torch conv). ATen runs that as a grouped convolution with B*C groups and
per-group weights; here it is one pass: a program owns a ``BLOCK_H x BLOCK_W`` output tile of one
(sample, channel) plane, loads its k^2 weights once, and accumulates k^2 shifted, masked loads of the
input tile (neighbouring taps hit the cache, so V is read from memory about once). Accumulation is fp32.

Not supported: even kernel sizes, stride or dilation other than 1, other paddings, a bias, the
pooling and kernel generation that precede the convolution in ATConv (they run as ATen ops), backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from graphopt.ops.dynamic_dwconv import dynamic_dwconv_reference  # noqa: F401 - the op's formula, re-exported

from ._launch import Buffer, KernelCall, LaunchPlan, Ref, check_device, check_float, check_shape, contiguous_strides, pick_config


@triton.jit
def dynamic_dwconv_kernel(v_ptr, w_ptr, o_ptr, C, H, W,
                          stride_vb, stride_vc, stride_vh, stride_vw,
                          stride_wb, stride_wc, stride_wi, stride_wj,
                          stride_ob, stride_oc, stride_oh, stride_ow,
                          KERNEL_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_bc = tl.program_id(0).to(tl.int64)
    b = pid_bc // C
    c = pid_bc % C
    v_plane = v_ptr + b * stride_vb + c * stride_vc
    w_plane = w_ptr + b * stride_wb + c * stride_wc
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
            weight = tl.load(w_plane + i * stride_wi + j * stride_wj).to(tl.float32)
            acc += weight * x.to(tl.float32)

    o_plane = o_ptr + b * stride_ob + c * stride_oc
    tl.store(o_plane + rows[:, None] * stride_oh + cols[None, :] * stride_ow, acc.to(o_ptr.dtype.element_ty),
             mask=(rows < H)[:, None] & (cols < W)[None, :])


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
                      (("KERNEL_SIZE", ksize), *cfg.items()))
    return LaunchPlan(("v", "kernels"), (o,), (call,), ("o",))


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
            "dynamic_dwconv", "dynamic_dwconv", ("dynamic_dwconv_kernel",), 2, lambda n: {},
            lambda v, w: (v.shape[0] * v.shape[1], v.shape[2], v.shape[3], w.shape[-1]),
            torch.ops.graphopt.dynamic_dwconv, uses_dot=False, tensor_names=("v", "kernels")),
    }
