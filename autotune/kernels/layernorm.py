"""LayerNorm over the last dimension, with an optional fused adaLN modulate epilogue.

For one row x in R^N (one token of sample b)::

    mu    = (1/N) sum_n x_n
    var   = (1/N) sum_n (x_n - mu)^2                      (biased, as F.layer_norm)
    xhat  = (x - mu) / sqrt(var + eps)
    y     = ((xhat * w + b) * (1 + scale_b) + shift_b)

w and b (length N) are the optional elementwise affine; scale_b and shift_b (length N) are the optional
adaLN modulation of sample b, shared by all of its tokens: DiT/SiT's ``modulate(norm(x), shift, scale)``
and VAR's ``LN(x) * (1 + scale) + shift`` (both with a non-affine LN, eps 1e-6). Fusing the modulation
saves writing LN(x) to memory and reading it back.

One program normalises one row in three passes over it, ``BLOCK_N`` columns at a time: the mean, the
variance of the centred values (not E[x^2] - mu^2, which cancels catastrophically when |mu| >> std),
then the output. Looping rather than holding the row in registers makes every ``BLOCK_N`` valid for
every N; when ``BLOCK_N >= N`` each pass is one step and the second and third reads hit the cache.
Statistics and the epilogue are computed in fp32 whatever the input dtype.

Not supported: a normalised shape of more than the last dimension, non-contiguous x (rows must be
evenly strided; call ``.contiguous()``), per-token (rather than per-sample) modulation, and backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from ._launch import check_contiguous, check_device, check_float, check_shape, pick_config


@triton.jit
def layernorm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                     N, TOKENS, eps,
                     stride_xm, stride_ym, stride_scale_b, stride_scale_n, stride_shift_b, stride_shift_n,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2**31 elements
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * stride_ym
    cols = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        x = tl.load(x_row + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
        acc += x
    mean = tl.sum(acc, axis=0) / N

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)  # the padding would otherwise add mean^2 per masked column
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)

    batch = row // TOKENS
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + batch * stride_scale_b + offs * stride_scale_n, mask=mask, other=0.0)
            y = y * (1.0 + s.to(tl.float32))
        if HAS_SHIFT:
            t = tl.load(shift_ptr + batch * stride_shift_b + offs * stride_shift_n, mask=mask, other=0.0)
            y = y + t.to(tl.float32)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def layernorm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, eps: float = 1e-5,
              config: Mapping[str, int] | None = None) -> torch.Tensor:
    """LayerNorm of ``x`` over its last dimension N, then ``* (1 + scale) + shift`` per sample.

    ``x``: contiguous, fp32/fp16/bf16, shape (B, ..., N); the first dimension is the sample that
    ``scale``/``shift`` index. ``weight``, ``bias``: (N,). ``scale``, ``shift``: (B, N) or (B, 1, N)
    (any strides; a ``chunk`` of an adaLN projection needs no copy). Parameters may be in another
    float dtype than ``x`` (fp32 weights with bf16 activations). Returns a new tensor like ``x``.
    ``config``: one of :func:`configs` (default: the first).
    """
    op = "layernorm"
    check_device(op, layernorm_kernel, x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    check_contiguous(op, "x", x)
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float(op, name, p)
            check_shape(op, name, p, (n,), "the last dimension of x")
            check_contiguous(op, name, p)
    scale2, shift2 = (_per_sample(op, name, t, x) for name, t in (("scale", scale), ("shift", shift)))
    cfg = pick_config(op, configs, config)

    y = torch.empty_like(x)
    rows = x.numel() // n if n else 0
    if rows == 0:
        return y
    tokens = rows // x.shape[0] if x.dim() >= 2 else rows
    # an absent operand is passed as x with zero strides: its constexpr flag is off, so it is never read
    scale_args = (scale2, *scale2.stride()) if scale2 is not None else (x, 0, 0)
    shift_args = (shift2, *shift2.stride()) if shift2 is not None else (x, 0, 0)
    layernorm_kernel[(rows,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, scale_args[0], shift_args[0],
        n, tokens, eps, n, n, *scale_args[1:], *shift_args[1:],  # contiguous: rows are n apart
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale2 is not None,
        HAS_SHIFT=shift2 is not None, **cfg)
    return y


def _per_sample(op: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A (B, N) view of a per-sample modulation given as (B, N) or (B, 1, N)."""
    if t is None:
        return None
    check_float(op, name, t)
    if x.dim() < 2:
        raise ValueError(f"{op}: {name} needs x of shape (B, ..., N), got {tuple(x.shape)}")
    b, n = x.shape[0], x.shape[-1]
    if not (t.dim() in (2, 3) and t.shape[0] == b and t.shape[-1] == n and (t.dim() == 2 or t.shape[1] == 1)):
        raise ValueError(f"{op}: {name} must have shape ({b}, {n}) or ({b}, 1, {n}) (one row per sample of x), "
                         f"got {tuple(t.shape)}")
    return t if t.dim() == 2 else t[:, 0]


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                        scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                        eps: float = 1e-5) -> torch.Tensor:
    """The module docstring's formula in plain torch, in fp32, cast back to ``x.dtype``."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    # (B, N) -> (B, 1, ..., 1, N): one row per sample, broadcast over its tokens
    per_token = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if scale is not None:
        y = y * (1 + scale.float().reshape(per_token))
    if shift is not None:
        y = y + shift.float().reshape(per_token)
    return y.to(x.dtype)


def configs() -> list[dict[str, int]]:
    """Columns per loop step and warps; the first is the untuned default (one step for N <= 1024)."""
    return [
        {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 2048, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 4096, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 512, "num_warps": 2, "num_stages": 1},
        {"BLOCK_N": 256, "num_warps": 1, "num_stages": 1},
        {"BLOCK_N": 1024, "num_warps": 8, "num_stages": 2},
    ]
