"""Softmax attention forward, flash style: non-causal or block-causal (VAR), never materialising L x L.

Per (batch, head), with Q in R^{Lq x D}, K in R^{Lk x D}, V in R^{Lk x Dv} and a scale s::

    O_i = sum_j softmax_j(s Q_i . K_j + M_ij) V_j,    M_ij = 0 if allowed(i, j) else -inf

Non-causal: every pair is allowed (also VAR inference with a KV cache: the current scale's queries
against every cached key, Lq != Lk). Block-causal (VAR's training mask, one level id per token of a
sequence of length L = Lq = Lk): allowed(i, j) iff level_j <= level_i, so a token sees every token of
its own and of earlier scales.

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the keys ``BLOCK_N`` at a time
with the online softmax: it keeps the running row maximum m, the running denominator l and the
unnormalised output acc, and for each key block with scores S::

    m'  = max(m, rowmax S)          p = exp(S - m')          alpha = exp(m - m')
    l  <- alpha l + rowsum p        acc <- alpha acc + p V    m <- m'

and writes acc / l. Exponentials are exp2 with log2(e) folded into the scale. A key block in which
every pair is masked (block-causal, min key level > max query level of the block) is skipped after
reading its levels, so with VAR's sorted levels a query block computes only on the keys it sees. m
starts at -inf and a row with every score masked so far keeps it: the exponent offsets then use 0
instead of m', which yields p = 0 and alpha = 0 rather than exp(-inf - -inf) = NaN, and a row that
saw no key at all writes 0, not 0/0. With a level vector every token sees itself, so only padding rows
(never stored) see no key; with no keys at all (Lk = 0) the launcher returns zeros (SDPA: NaN).

Tails: L not a multiple of the blocks and D, Dv not powers of two (DiT-XL: D = 72) are masked; the
head dimensions are padded to ``BLOCK_D = max(16, next_pow2(D))`` (``tl.dot``'s minimum), D, Dv <= 256.
Products run in the input dtype with fp32 accumulation; fp32 inputs use IEEE fp32 products (not TF32)
so that fp32 results match the reference to rounding. Q, K, V may have any strides (a permuted QKV
projection needs no copy); the output is contiguous (B, H, Lq, Dv).

Not supported: a general boolean/additive mask, plain causal as such (levels 0..L-1 express it, without
the triangular loop bound a causal kernel would use), a level vector with Lq != Lk, dropout, returning
the log-sum-exp, backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from graphopt.ops.block_causal_attention import block_causal_mask  # noqa: F401 - the op's mask, re-exported

from ._launch import (Buffer, KernelCall, LaunchPlan, Ref, check_device, check_dot_blocks, check_float, check_shape,
                      contiguous_strides, next_power_of_2, pick_config)

LOG2E = 1.4426950408889634


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, level_ptr,
                     H, L_Q, L_K, D, D_V, qk_scale,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     BLOCK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    q_level = tl.zeros((BLOCK_M,), dtype=tl.int32)
    q_level_max = 0
    if BLOCK_CAUSAL:
        # the padding values only steer block skipping (rows and keys past L are masked anyway):
        # a padding row must not raise the block's max level, a padding key not lower a block's min
        q_level = tl.load(level_ptr + offs_m, mask=row_ok, other=-2147483647)
        q_level_max = tl.max(q_level, axis=0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, L_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BLOCK_CAUSAL:
            k_level = tl.load(level_ptr + offs_n, mask=offs_n < L_K, other=2147483647)
            if tl.min(k_level, axis=0) <= q_level_max:
                allowed = k_level[None, :] <= q_level[:, None]
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, offs_n, offs_d, offs_dv, allowed,
                                              L_K, D, D_V, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd)
        else:
            allowed = (offs_n < L_K)[None, :]
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, offs_n, offs_d, offs_dv, allowed,
                                          L_K, D, D_V, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < D_V))


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_base, v_base, offs_n, offs_d, offs_dv, allowed,
                  L_K, D, D_V, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd):
    """One online-softmax step over the keys ``offs_n``; ``allowed`` (broadcast to M x N) is the mask."""
    key_ok = offs_n < L_K
    k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=key_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    s = tl.dot(q, k_t, input_precision="ieee") * qk_scale
    s = tl.where(allowed & key_ok[None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p and alpha become 0, not NaN
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


MAX_HEAD_DIM = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              level: torch.Tensor | None = None, config: Mapping[str, int] | None = None) -> torch.Tensor:
    """softmax(scale Q K^T + mask) V per (batch, head); block-causal when ``level`` is given.

    ``q``: (B, H, Lq, D); ``k``: (B, H, Lk, D); ``v``: (B, H, Lk, Dv); one fp32/fp16/bf16 dtype, any
    strides, D and Dv at most 256. ``scale`` defaults to D^-1/2. ``level``: (L,) integer level id per
    token (Lq = Lk = L); query i attends key j iff ``level[j] <= level[i]``. Returns a new contiguous
    (B, H, Lq, Dv) tensor. ``config``: one of :func:`configs` (default: the first).
    """
    plan = attention_plan(q, k, v, scale=scale, level=level, config=config)
    return plan.run((q, k, v) if level is None else (q, k, v, level))[0]


def attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   level: torch.Tensor | None = None, config: Mapping[str, int] | None = None) -> LaunchPlan:
    """:func:`attention`'s checks, then its allocation and launch as a :class:`LaunchPlan` for these layouts."""
    op = "attention"
    check_device(op, attention_kernel, q=q, k=k, v=v, level=level)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t, like=q)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    batch, heads, l_q, d = q.shape
    l_k, d_v = k.shape[2], v.shape[3]
    check_shape(op, "k", k, (batch, heads, l_k, d), "q's batch, heads and head dim")
    check_shape(op, "v", v, (batch, heads, l_k, d_v), "k's batch, heads and length")
    if max(d, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dims D={d}, Dv={d_v} must be at most {MAX_HEAD_DIM}")
    inputs, casts = ("q", "k", "v"), ()
    if level is not None:
        if level.dtype.is_floating_point or level.dtype.is_complex or level.dtype == torch.bool:
            raise ValueError(f"{op}: level must be an integer tensor, got {level.dtype}")
        if l_q != l_k:
            raise ValueError(f"{op}: a level vector needs Lq == Lk (one sequence), got Lq={l_q}, Lk={l_k}")
        check_shape(op, "level", level, (l_q,), "one level id per token")
        inputs += ("level",)
        if level.dtype != torch.int32 or not level.is_contiguous():  # levels are small: the copy is cheap
            casts = (("level32", "level", torch.int32),)
    if batch * heads > 65535:
        raise ValueError(f"{op}: batch * heads = {batch * heads} exceeds the grid's second axis (65535)")
    cfg = pick_config(op, configs, config)
    check_dot_blocks(op, cfg, "BLOCK_M", "BLOCK_N")

    shape = (batch, heads, l_q, d_v)
    empty = batch * heads * l_q * d_v == 0
    o = Buffer("o", shape, contiguous_strides(shape), q.dtype, zero=l_k == 0 and not empty)
    if empty or l_k == 0:  # no keys: the kernel's empty-row convention, zeros
        return LaunchPlan(inputs, (o,), (), ("o",))
    qk_scale = (d ** -0.5 if scale is None else scale) * LOG2E
    grid = (triton.cdiv(l_q, cfg["BLOCK_M"]), batch * heads)
    # no level: BLOCK_CAUSAL is off, q is never read as one
    levels = Ref("q") if level is None else Ref(casts[0][0] if casts else "level")
    call = KernelCall(attention_kernel, grid, (
        Ref("q"), Ref("k"), Ref("v"), Ref("o"), levels, heads, l_q, l_k, d, d_v, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *o.strides),
        (("BLOCK_CAUSAL", level is not None), ("BLOCK_D", max(16, next_power_of_2(d))),
         ("BLOCK_DV", max(16, next_power_of_2(d_v))), *cfg.items()))
    return LaunchPlan(inputs, (o,), (call,), ("o",), casts)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        level: torch.Tensor | None = None) -> torch.Tensor:
    """The module docstring's formula in plain torch (materialised scores), in fp32, cast back to ``q.dtype``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if level is not None:
        s = s.masked_fill(~block_causal_mask(level), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def configs() -> list[dict[str, int]]:
    """Query rows and keys per step, warps and pipeline stages; the first is the untuned default.

    Every block is at least 16 (``tl.dot``); larger query blocks amortise K/V loads on long
    sequences, the small ones fill the GPU on short ones (VAR's early scales, batch 1).
    """
    return [
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 2, "num_stages": 2},
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1},
    ]



def lowering() -> dict[object, Any]:
    """The ops this module's kernel runs in a lowered graph (:class:`graphopt.autotune.family.FamilyOp`):
    softmax attention (SDPA, whose own backends stay the untuned default) and VAR's block-causal attention."""
    from ..family import FamilyOp, heads_shape
    from ..regions import node_arg

    return {
        torch.ops.aten.scaled_dot_product_attention.default: FamilyOp(
            "attention", "attention", ("attention_kernel", "_attend_block"), 3,
            lambda n: {"scale": n.kwargs.get("scale")}, heads_shape,
            lambda q, k, v, scale=None: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
            aten_first=True),
        torch.ops.graphopt.block_causal_attention.default: FamilyOp(
            "attention", "attention", ("attention_kernel", "_attend_block"), 4,
            lambda n: {"scale": node_arg(n, 4, "scale")}, lambda q, k, v, level: heads_shape(q, k, v),
            lambda q, k, v, level, scale=None: torch.ops.graphopt.block_causal_attention(q, k, v, level, scale),
            launch=lambda fn, t, options, config: fn(t[0], t[1], t[2], level=t[3], **options, config=config),
            tensor_names=("q", "k", "v", "level")),
    }
