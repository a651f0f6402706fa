"""RMSNorm over the last dimension.

For one row x in R^N::

    rms = sqrt((1/N) sum_n x_n^2 + eps)
    y   = x / rms * w                                   (w optional, length N)

as ``F.rms_norm(x, (N,), w, eps)``. One program per row, two passes over it ``BLOCK_N`` columns at a
time (the sum of squares, then the output), so every ``BLOCK_N`` is valid for every N; the sum and the
scaling are in fp32 whatever the input dtype.

Not supported: a normalised shape of more than the last dimension, non-contiguous x, backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from ._launch import check_contiguous, check_device, check_float, check_shape, pick_config


@triton.jit
def rmsnorm_kernel(x_ptr, y_ptr, w_ptr, N, eps, stride_xm, stride_ym,
                   HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2**31 elements
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * stride_ym
    cols = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        x = tl.load(x_row + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
        acc += x * x
    rrms = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)

    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        y = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * rrms
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, *, eps: float = 1e-6,
            config: Mapping[str, int] | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension N, times ``weight``.

    ``x``: contiguous, fp32/fp16/bf16, at least 1-D. ``weight``: (N,), contiguous, any float dtype, or
    ``None`` for no scaling. Returns a new tensor like ``x``. ``config``: one of :func:`configs`
    (default: the first). Unlike ``F.rms_norm``, ``eps`` defaults to 1e-6 rather than the dtype's
    machine epsilon: pass the model's value.
    """
    op = "rmsnorm"
    check_device(op, rmsnorm_kernel, x=x, weight=weight)
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    check_contiguous(op, "x", x)
    n = x.shape[-1]
    if weight is not None:
        check_float(op, "weight", weight)
        check_shape(op, "weight", weight, (n,), "the last dimension of x")
        check_contiguous(op, "weight", weight)
    cfg = pick_config(op, configs, config)

    y = torch.empty_like(x)
    rows = x.numel() // n if n else 0
    if rows == 0:
        return y
    # an absent weight is passed as x: HAS_WEIGHT is off, so it is never read
    rmsnorm_kernel[(rows,)](x, y, weight if weight is not None else x, n, eps, n, n,
                            HAS_WEIGHT=weight is not None, **cfg)
    return y


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, *, eps: float = 1e-6) -> torch.Tensor:
    """The module docstring's formula in plain torch, in fp32, cast back to ``x.dtype``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def configs() -> list[dict[str, int]]:
    """Columns per loop step and warps; the first is the untuned default (one step for N <= 1024)."""
    return [
        {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 2048, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 4096, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 512, "num_warps": 2, "num_stages": 1},
        {"BLOCK_N": 256, "num_warps": 1, "num_stages": 1},
    ]
