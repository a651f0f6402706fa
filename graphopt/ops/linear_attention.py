"""``graphopt::linear_attention``: LiT's ReLU linear attention (arXiv 2501.12976), with its locality branch.

Per (batch, head), with phi = ReLU::

    A_i = phi(Q_i) S / (phi(Q_i) . z + eps),     S = sum_j phi(K_j)^T V_j,   z = sum_j phi(K_j)

q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv). With ``dwc_weight`` (and
optionally ``dwc_bias``) the op adds LiT's depthwise-conv branch on V: V laid out as a
(B, H*Dv, s, s) image of its N = s*s tokens (channel c = h*Dv + e, token n = y*s + x), convolved with
one k x k kernel per channel (k odd, zero padding k // 2, cross-correlation as in torch), plus the bias::

    O[b, h, n, e] = A[b, h, n, e] + bias[c] + sum_{i, j < k} W[c, 0, i, j] V[b, h, (y+i-k//2) s + (x+j-k//2), e]

so it needs Nq = Nk = s*s (self-attention on a square token grid); cross-attention passes no weight.
``dwc_weight``: (H*Dv, 1, k, k), ``dwc_bias``: (H*Dv,), the layout of
``conv2d(..., groups=H*Dv)``.

What fusing the branch into the op buys: on the GPU the branch adds no launch
(:func:`graphopt.autotune.kernels.linear_attention`: its state and apply kernels, the conv in the
apply kernel's output-tile epilogue) instead of V's permute/reshape copies, a depthwise conv2d, the permute back and an
add. On the CPU the op runs its reference, the same ATen ops as before, at the same cost. The GPU
speed-up has not been measured. In ONNX the op is :func:`linear_attention_onnx`, the same formula in
standard ONNX ops (the branch as a grouped Conv).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for halves and fp32 (the state is a sum over all tokens), fp64 kept (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def check_dwc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dwc_weight: torch.Tensor | None,
              dwc_bias: torch.Tensor | None) -> None:
    """The branch's arguments fit q, k and v (``ValueError`` naming what is wrong); nothing to check without one.

    Symbolic token counts (export with a dynamic length) are not checked here: the reference's reshape
    is, at run time.
    """
    if dwc_weight is None:
        if dwc_bias is not None:
            raise ValueError("linear_attention: dwc_bias given without dwc_weight")
        return
    heads, n_q, n_k, d_v = q.shape[1], q.shape[-2], v.shape[-2], v.shape[-1]
    channels = heads * d_v
    size = dwc_weight.shape[-1]
    if dwc_weight.dim() != 4 or tuple(dwc_weight.shape[:3]) != (channels, 1, size) or \
            (isinstance(size, int) and size % 2 == 0):
        raise ValueError(f"linear_attention: dwc_weight must have shape ({channels}, 1, k, k) with k odd "
                         f"(one kernel per head channel, H*Dv = {heads}*{d_v}), got {tuple(dwc_weight.shape)}")
    if dwc_bias is not None and tuple(dwc_bias.shape) != (channels,):
        raise ValueError(f"linear_attention: dwc_bias must have shape ({channels},), got {tuple(dwc_bias.shape)}")
    if isinstance(n_q, int) and isinstance(n_k, int) and (n_q != n_k or math.isqrt(n_k) ** 2 != n_k):
        raise ValueError(f"linear_attention: the depthwise-conv branch needs the queries and keys on one square "
                         f"token grid (Nq = Nk = side*side), got Nq = {n_q}, Nk = {n_k}")


def dwc_reference(v: torch.Tensor, dwc_weight: torch.Tensor, dwc_bias: torch.Tensor | None) -> torch.Tensor:
    """The branch alone, (B, H, N, Dv): V as a (B, H*Dv, s, s) image, depthwise conv2d, back, in V's dtype."""
    batch, heads, tokens, d_v = v.shape
    side = math.isqrt(tokens)
    image = v.permute(0, 1, 3, 2).reshape(-1, heads * d_v, side, side)
    local = torch.nn.functional.conv2d(image, dwc_weight, dwc_bias, padding=dwc_weight.shape[-1] // 2,
                                       groups=heads * d_v)
    return local.reshape(-1, heads, d_v, tokens).permute(0, 1, 3, 2)


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                               dwc_weight: torch.Tensor | None = None,
                               dwc_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The formula above in plain torch: the attention in fp32 (fp64 stays fp64), cast back to ``q.dtype``,
    plus the branch as the ATen ops the linear-attention pass used to emit (a depthwise conv2d in V's dtype)."""
    check_dwc(q, k, v, dwc_weight, dwc_bias)
    work = _work_dtype(q.dtype)
    phi_q, phi_k = torch.relu(q.to(work)), torch.relu(k.to(work))
    state = phi_k.transpose(-2, -1) @ v.to(work)  # (B, H, D, Dv)
    z = phi_k.sum(dim=-2)  # (B, H, D)
    den = (phi_q * z[..., None, :]).sum(-1, keepdim=True)
    out = ((phi_q @ state) / (den + eps)).to(q.dtype)
    if dwc_weight is None:
        return out
    return out + dwc_reference(v, dwc_weight, dwc_bias)


def linear_attention_onnx(q: Any, k: Any, v: Any, eps: float = 1e-6, dwc_weight: Any = None,
                          dwc_bias: Any = None) -> Any:
    """The reference in standard ONNX ops, for torch.onnx's ``custom_translation_table``.

    Traced by the exporter, so the ops land inline in the graph (no custom-domain node): Relu, the
    ``phi(K)^T V`` state by Transpose + MatMul, ``z`` by ReduceSum over the tokens, the denominator by
    Mul + ReduceSum over the features, then MatMul / (den + eps). Like the reference it computes in
    fp32 and casts back to ``q``'s dtype. The branch: V Transposed and Reshaped to (B, H*Dv, s, s)
    (the batch stays symbolic: -1), one Conv with ``group`` = H*Dv (static: the weight's first axis),
    Reshaped and Transposed back and added, in fp32 too (onnxruntime's CPU Conv has no fp16).
    """
    from onnx import TensorProto
    from onnxscript import opset18 as op  # onnxscript loads only when a graph is exported

    rank = len(q.shape)
    phi_q = op.Relu(op.Cast(q, to=TensorProto.FLOAT))
    phi_k = op.Relu(op.Cast(k, to=TensorProto.FLOAT))
    phi_k_t = op.Transpose(phi_k, perm=[*range(rank - 2), rank - 1, rank - 2])
    v32 = op.Cast(v, to=TensorProto.FLOAT)
    state = op.MatMul(phi_k_t, v32)  # (B, H, D, Dv)
    z = op.ReduceSum(phi_k, op.Constant(value_ints=[-2]), keepdims=1)  # (B, H, 1, D)
    den = op.ReduceSum(op.Mul(phi_q, z), op.Constant(value_ints=[-1]), keepdims=1)
    out = op.Div(op.MatMul(phi_q, state), op.Add(den, op.Constant(value_float=eps)))
    if dwc_weight is not None:
        heads, tokens, d_v = q.shape[1], v.shape[2], v.shape[3]
        size = dwc_weight.shape[-1]
        if not all(isinstance(d, int) for d in (heads, tokens, d_v, size)):
            raise ValueError("linear_attention's depthwise-conv branch needs static heads, tokens, Dv and kernel "
                             f"size for ONNX, got {heads}, {tokens}, {d_v}, {size}")
        channels, side = heads * d_v, math.isqrt(tokens)
        image = op.Reshape(op.Transpose(v32, perm=[0, 1, 3, 2]), op.Constant(value_ints=[-1, channels, side, side]))
        bias = [op.Cast(dwc_bias, to=TensorProto.FLOAT)] if dwc_bias is not None else []
        local = op.Conv(image, op.Cast(dwc_weight, to=TensorProto.FLOAT), *bias, group=channels,
                        kernel_shape=[size, size], pads=[size // 2] * 4)
        local = op.Transpose(op.Reshape(local, op.Constant(value_ints=[-1, heads, d_v, tokens])), perm=[0, 1, 3, 2])
        out = op.Add(out, local)
    return op.CastLike(out, q)


@torch.library.custom_op("graphopt::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     dwc_weight: torch.Tensor | None = None, dwc_bias: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU linear attention, plus the depthwise-conv branch when ``dwc_weight`` is given; see the module docstring."""
    return linear_attention_reference(q, k, v, eps=eps, dwc_weight=dwc_weight, dwc_bias=dwc_bias)


@linear_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
      dwc_weight: torch.Tensor | None = None, dwc_bias: torch.Tensor | None = None) -> torch.Tensor:
    check_dwc(q, k, v, dwc_weight, dwc_bias)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@linear_attention.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
      dwc_weight: torch.Tensor | None = None, dwc_bias: torch.Tensor | None = None) -> torch.Tensor:
    try:
        from graphopt.autotune.kernels import linear_attention as kernel
    except ImportError:  # no Triton: the reference is correct everywhere, only slower
        return linear_attention_reference(q, k, v, eps=eps, dwc_weight=dwc_weight, dwc_bias=dwc_bias)
    return kernel(q, k, v, eps=eps, dwc_weight=dwc_weight, dwc_bias=dwc_bias)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, eps, dwc_weight, dwc_bias = inputs
    ctx.save_for_backward(q, k, v, dwc_weight, dwc_bias)
    ctx.eps = eps


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients through the reference formula: distillation trains the projections around the op and the
    branch's weight and bias (``graphopt.distill``)."""
    q, k, v, dwc_weight, dwc_bias = ctx.saved_tensors
    with torch.enable_grad():
        given = [t.detach().requires_grad_(True) if t is not None else None
                 for t in (q, k, v, dwc_weight, dwc_bias)]
        out = linear_attention_reference(*given[:3], eps=ctx.eps, dwc_weight=given[3], dwc_bias=given[4])
        leaves = [t for t in given if t is not None]
        grads = iter(torch.autograd.grad(out, leaves, grad, allow_unused=True))
    q_grad, k_grad, v_grad, w_grad, b_grad = (next(grads) if t is not None else None for t in given)
    return q_grad, k_grad, v_grad, None, w_grad, b_grad


linear_attention.register_autograd(_backward, setup_context=_setup_context)
