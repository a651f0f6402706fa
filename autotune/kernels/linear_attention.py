"""ReLU linear attention (LiT, arXiv 2501.12976), with its depthwise-conv branch fused into the epilogue.

Per (batch, head), with Q in R^{Nq x D}, K in R^{Nk x D}, V in R^{Nk x Dv} and phi = ReLU::

    S = sum_j phi(K_j)^T V_j     (D x Dv)        z = sum_j phi(K_j)     (D)
    O_i = phi(Q_i) S / (phi(Q_i) . z + eps)

which equals sum_j (phi(Q_i) . phi(K_j)) V_j / (sum_j phi(Q_i) . phi(K_j) + eps): softmax attention with
the kernel exp(q . k) replaced by phi(q) . phi(k), reassociated so that it costs O(N D Dv), not O(N^2 D).
``eps`` keeps a query whose phi(Q_i) . z is 0 (every feature <= 0) at an output of 0 instead of 0/0.

Two stages, both tiled over the head dimensions so that any D, Dv fit (LiT's few-head models have
D = 288 and a D x Dv state no program could hold):

1. ``linear_attention_state_kernel``, grid (D/BLOCK_D, Dv/BLOCK_DV, B*H): one program reduces its
   (BLOCK_D x BLOCK_DV) tile of S over all keys, ``BLOCK_N`` at a time; the programs of the first Dv tile
   also reduce their slice of z. The state is fp32 in a (B, H, D, Dv) workspace.
2. ``linear_attention_apply_kernel``, grid (Nq/BLOCK_M, Dv/BLOCK_DV, B*H): one program computes the
   numerator phi(Q) S and the denominator phi(Q) . z for ``BLOCK_M`` queries and one Dv tile, walking D
   ``BLOCK_D`` at a time, and divides; with the branch (below) its epilogue adds the conv of V.

Products accumulate in fp32. Stage 1 multiplies in the input dtype (IEEE for fp32); stage 2 multiplies
phi(Q) by the fp32 state, in IEEE fp32 for fp32 inputs and in TF32 for fp16/bf16 inputs, whose output
rounding is coarser than TF32's anyway (casting the state to fp16 instead could overflow: it is a sum
over all tokens).

With ``dwc_weight`` the apply kernel's epilogue also adds LiT's depthwise-conv branch
(:mod:`graphopt.ops.linear_attention`): V read as an s x s image per head channel, N = s*s. Output
token m sits at (y, x) = (m // s, m % s); for each of the k x k taps the epilogue loads the
(BLOCK_M x BLOCK_DV) tile of V at the shifted tokens (masked where the shift leaves the grid: zero
padding k // 2) and multiplies it by the tap's weight per channel, in fp32, then adds the bias, all
before the single rounding to the output dtype. What this buys: one launch and no V permute/reshape
copies for a separate conv2d (V is read in its (B, H, N, Dv) layout, any strides); neighbouring taps
hit the cache. Its speed against ATen's depthwise conv2d + add has not been measured (no GPU yet).

Not supported: causal masking (linear attention over a prefix needs a scan, not a sum), other feature
maps than ReLU, a branch on a non-square or cross-attention token grid, backward (the op's autograd
differentiates its reference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from graphopt.ops.linear_attention import check_dwc
from graphopt.ops.linear_attention import linear_attention_reference  # noqa: F401 - the op's formula, re-exported

from ._launch import (Buffer, KernelCall, LaunchPlan, Ref, check_device, check_dot_blocks, check_float, check_shape,
                      contiguous_strides, pick_config)


@triton.jit
def linear_attention_state_kernel(k_ptr, v_ptr, kv_ptr, ksum_ptr,
                                  H, N_K, D, D_V,
                                  stride_kb, stride_kh, stride_kn, stride_kd,
                                  stride_vb, stride_vh, stride_vn, stride_vd,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_dv = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    k_base = k_ptr + (pid_bh // H) * stride_kb + (pid_bh % H) * stride_kh
    v_base = v_ptr + (pid_bh // H) * stride_vb + (pid_bh % H) * stride_vh
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V

    kv = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N_K, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        # phi(K)^T loaded transposed (BLOCK_D x BLOCK_N); masked entries are 0 and relu(0) = 0
        k_t = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                      mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        # exact in the input dtype, but Triton 3.6 promotes a half tile to fp32 against the Python 0.0 and
        # then rejects tl.dot's mixed operands: cast back so both are the input dtype in every release
        k_t = tl.maximum(k_t, 0.0).to(k_ptr.dtype.element_ty)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        kv = tl.dot(k_t, v, kv, input_precision="ieee")
        ksum += tl.sum(k_t.to(tl.float32), axis=1)

    kv_base = kv_ptr + pid_bh * D * D_V
    tl.store(kv_base + offs_d[:, None] * D_V + offs_dv[None, :], kv, mask=d_ok[:, None] & dv_ok[None, :])
    if pid_dv == 0:
        tl.store(ksum_ptr + pid_bh * D + offs_d, ksum, mask=d_ok)


@triton.jit
def linear_attention_apply_kernel(q_ptr, kv_ptr, ksum_ptr, o_ptr, v_ptr, w_ptr, bias_ptr,
                                  H, N_Q, D, D_V, SIDE, eps,
                                  stride_qb, stride_qh, stride_qm, stride_qd,
                                  stride_ob, stride_oh, stride_om, stride_od,
                                  stride_vb, stride_vh, stride_vn, stride_vd,
                                  stride_wc, stride_wi, stride_wj,
                                  DOT_PRECISION: tl.constexpr, DWC_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_dv = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    q_base = q_ptr + (pid_bh // H) * stride_qb + (pid_bh % H) * stride_qh
    kv_base = kv_ptr + pid_bh * D * D_V
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    dv_ok = offs_dv < D_V

    num = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q = tl.maximum(q.to(tl.float32), 0.0)
        kv = tl.load(kv_base + offs_d[:, None] * D_V + offs_dv[None, :], mask=d_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        ksum = tl.load(ksum_ptr + pid_bh * D + offs_d, mask=d_ok, other=0.0)
        num = tl.dot(q, kv, num, input_precision=DOT_PRECISION)
        den += tl.sum(q * ksum[None, :], axis=1)

    out = num / (den + eps)[:, None]
    if DWC_SIZE > 0:  # LiT's depthwise conv over V's s x s token grid, channel h * D_V + e, zero padding
        v_base = v_ptr + (pid_bh // H) * stride_vb + (pid_bh % H) * stride_vh
        w_rows = w_ptr + ((pid_bh % H) * D_V + offs_dv) * stride_wc
        y = offs_m // SIDE
        x = offs_m % SIDE
        for i in tl.static_range(DWC_SIZE):
            src_y = y + (i - DWC_SIZE // 2)
            y_ok = m_ok & (src_y >= 0) & (src_y < SIDE)
            for j in tl.static_range(DWC_SIZE):
                src_x = x + (j - DWC_SIZE // 2)
                ok = y_ok & (src_x >= 0) & (src_x < SIDE)
                tap = tl.load(v_base + (src_y * SIDE + src_x)[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                              mask=ok[:, None] & dv_ok[None, :], other=0.0)
                weight = tl.load(w_rows + i * stride_wi + j * stride_wj, mask=dv_ok, other=0.0)
                out += weight.to(tl.float32)[None, :] * tap.to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + (pid_bh % H) * D_V + offs_dv, mask=dv_ok, other=0.0).to(tl.float32)[None, :]
    o_base = o_ptr + (pid_bh // H) * stride_ob + (pid_bh % H) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                     dwc_weight: torch.Tensor | None = None, dwc_bias: torch.Tensor | None = None,
                     config: Mapping[str, int] | None = None) -> torch.Tensor:
    """ReLU linear attention per (batch, head): phi(Q) S / (phi(Q) . z + eps), S = phi(K)^T V, z = sum phi(K),
    plus, with ``dwc_weight``, LiT's depthwise conv of V on its s x s token grid and ``dwc_bias``.

    ``q``: (B, H, Nq, D); ``k``: (B, H, Nk, D); ``v``: (B, H, Nk, Dv); one fp32/fp16/bf16 dtype, any
    strides. ``dwc_weight``: (H*Dv, 1, k, k), k odd, ``dwc_bias``: (H*Dv,), the same dtype, any strides;
    the branch needs Nq = Nk = s*s. Returns a new contiguous (B, H, Nq, Dv) tensor. ``config``: one of
    :func:`configs` (default: the first).
    """
    tensors = (q, k, v) + tuple(t for t in (dwc_weight, dwc_bias) if t is not None)
    plan = linear_attention_plan(q, k, v, eps=eps, dwc_weight=dwc_weight, dwc_bias=dwc_bias, config=config)
    return plan.run(tensors)[0]


def linear_attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                          dwc_weight: torch.Tensor | None = None, dwc_bias: torch.Tensor | None = None,
                          config: Mapping[str, int] | None = None) -> LaunchPlan:
    """:func:`linear_attention`'s checks, then its allocations and launches as a :class:`LaunchPlan`."""
    op = "linear_attention"
    check_device(op, linear_attention_apply_kernel, q=q, k=k, v=v, dwc_weight=dwc_weight, dwc_bias=dwc_bias)
    for name, t in (("q", q), ("k", k), ("v", v), ("dwc_weight", dwc_weight), ("dwc_bias", dwc_bias)):
        if t is None:
            continue
        check_float(op, name, t, like=q)
        if t.dim() != 4 and name in ("q", "k", "v"):
            raise ValueError(f"{op}: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    batch, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    check_shape(op, "k", k, (batch, heads, n_k, d), "q's batch, heads and head dim")
    check_shape(op, "v", v, (batch, heads, n_k, d_v), "k's batch, heads and length")
    check_dwc(q, k, v, dwc_weight, dwc_bias)  # the op's own checks: kernel shape, bias, a square token grid
    if batch * heads > 65535:
        raise ValueError(f"{op}: batch * heads = {batch * heads} exceeds the grid's third axis (65535)")
    cfg = pick_config(op, configs, config)
    check_dot_blocks(op, cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")
    blocks = (("BLOCK_D", cfg["BLOCK_D"]), ("BLOCK_DV", cfg["BLOCK_DV"]))
    launch = (("num_warps", cfg["num_warps"]), ("num_stages", cfg["num_stages"]))
    inputs = ("q", "k", "v") + tuple(name for name, t in (("dwc_weight", dwc_weight), ("dwc_bias", dwc_bias))
                                     if t is not None)

    shape = (batch, heads, n_q, d_v)
    empty = batch * heads * n_q * d_v == 0
    no_state = (d == 0 or n_k == 0) and dwc_weight is None
    o = Buffer("o", shape, contiguous_strides(shape), q.dtype, zero=no_state and not empty)
    if empty or no_state:  # S = 0 and z = 0: every output is 0 / eps = 0
        return LaunchPlan(inputs, (o,), (), ("o",))
    kv = Buffer("kv", (batch, heads, d, d_v), contiguous_strides((batch, heads, d, d_v)), torch.float32)
    ksum = Buffer("ksum", (batch, heads, d), contiguous_strides((batch, heads, d)), torch.float32)
    calls = []
    if d > 0:  # with no features the apply kernel's loop over D is empty: the branch alone
        state_grid = (triton.cdiv(d, cfg["BLOCK_D"]), triton.cdiv(d_v, cfg["BLOCK_DV"]), batch * heads)
        calls.append(KernelCall(linear_attention_state_kernel, state_grid, (
            Ref("k"), Ref("v"), Ref("kv"), Ref("ksum"), heads, n_k, d, d_v, *k.stride(), *v.stride()),
            (("BLOCK_N", cfg["BLOCK_N"]), *blocks, *launch)))
    # without a branch the DWC pointers are never read (DWC_SIZE = 0 removes that code): pass q for them
    weight, weight_ref = (dwc_weight, Ref("dwc_weight")) if dwc_weight is not None else (q, Ref("q"))
    bias_ref = Ref("dwc_bias") if dwc_bias is not None else weight_ref
    apply_grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(d_v, cfg["BLOCK_DV"]), batch * heads)
    calls.append(KernelCall(linear_attention_apply_kernel, apply_grid, (
        Ref("q"), Ref("kv"), Ref("ksum"), Ref("o"), Ref("v"), weight_ref, bias_ref, heads, n_q, d, d_v,
        math.isqrt(n_k), eps, *q.stride(), *o.strides, *v.stride(), weight.stride(0), weight.stride(-2),
        weight.stride(-1)),
        (("DOT_PRECISION", "ieee" if q.dtype == torch.float32 else "tf32"),
         ("DWC_SIZE", 0 if dwc_weight is None else dwc_weight.shape[-1]), ("HAS_BIAS", dwc_bias is not None),
         ("BLOCK_M", cfg["BLOCK_M"]), *blocks, *launch)))
    return LaunchPlan(inputs, (o, kv, ksum), tuple(calls), ("o",))


def configs() -> list[dict[str, int]]:
    """Tile sizes of both stages (keys per step, queries per program, D and Dv tiles), warps, stages.

    The first is the untuned default. Every block is at least 16 (``tl.dot``).
    """
    return [
        {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DV": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_DV": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_DV": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DV": 32, "num_warps": 2, "num_stages": 2},
        {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_DV": 16, "num_warps": 1, "num_stages": 1},
    ]


def lowering() -> dict[object, Any]:
    """The op this module's kernels run in a lowered graph (:class:`graphopt.autotune.family.FamilyOp`):
    ``graphopt::linear_attention``, its depthwise-conv branch passed when the graph gives one."""
    from ..family import FamilyOp, heads_shape
    from ..regions import node_arg

    def shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dwc_weight: torch.Tensor | None = None,
              dwc_bias: torch.Tensor | None = None) -> tuple[int, ...]:
        """The heads' shape and the branch's kernel size (0: none), which the timing depends on."""
        return (*heads_shape(q, k, v), 0 if dwc_weight is None else dwc_weight.shape[-1])

    return {
        torch.ops.graphopt.linear_attention.default: FamilyOp(
            "linear_attention", "linear_attention", ("linear_attention_state_kernel", "linear_attention_apply_kernel"),
            3, lambda n: {"eps": float(node_arg(n, 3, "eps", 1e-6))}, shape,
            lambda q, k, v, eps=1e-6, dwc_weight=None, dwc_bias=None: torch.ops.graphopt.linear_attention(
                q, k, v, eps, dwc_weight, dwc_bias),
            optional_tensors=((4, "dwc_weight"), (5, "dwc_bias"))),
    }
