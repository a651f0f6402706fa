"""``graphopt::linear_attention``: LiT's ReLU linear attention (arXiv 2501.12976), the attention part.

Per (batch, head), with phi = ReLU::

    O_i = phi(Q_i) S / (phi(Q_i) . z + eps),     S = sum_j phi(K_j)^T V_j,   z = sum_j phi(K_j)

q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv). LiT's depthwise-conv branch
on V is not part of the op: it is an ordinary depthwise conv2d that the substituting pass adds next to
it. On CUDA the op runs :func:`graphopt.autotune.kernels.linear_attention`; in ONNX it is
:func:`linear_attention_onnx`, the same formula in standard ONNX ops.
"""

from __future__ import annotations

from typing import Any

import torch


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               eps: float = 1e-6) -> torch.Tensor:
    """The formula above in plain torch, in fp32 (the state is a sum over all tokens), cast back to ``q.dtype``."""
    phi_q, phi_k = torch.relu(q.float()), torch.relu(k.float())
    state = phi_k.transpose(-2, -1) @ v.float()  # (B, H, D, Dv)
    z = phi_k.sum(dim=-2)  # (B, H, D)
    den = (phi_q * z[..., None, :]).sum(-1, keepdim=True)
    return ((phi_q @ state) / (den + eps)).to(q.dtype)


def linear_attention_onnx(q: Any, k: Any, v: Any, eps: float = 1e-6) -> Any:
    """The reference in standard ONNX ops, for torch.onnx's ``custom_translation_table``.

    Traced by the exporter, so the ops land inline in the graph (no custom-domain node): Relu, the
    ``phi(K)^T V`` state by Transpose + MatMul, ``z`` by ReduceSum over the tokens, the denominator by
    Mul + ReduceSum over the features, then MatMul / (den + eps). Like the reference it computes in
    fp32 and casts back to ``q``'s dtype.
    """
    from onnx import TensorProto
    from onnxscript import opset18 as op  # onnxscript loads only when a graph is exported

    rank = len(q.shape)
    phi_q = op.Relu(op.Cast(q, to=TensorProto.FLOAT))
    phi_k = op.Relu(op.Cast(k, to=TensorProto.FLOAT))
    phi_k_t = op.Transpose(phi_k, perm=[*range(rank - 2), rank - 1, rank - 2])
    state = op.MatMul(phi_k_t, op.Cast(v, to=TensorProto.FLOAT))  # (B, H, D, Dv)
    z = op.ReduceSum(phi_k, op.Constant(value_ints=[-2]), keepdims=1)  # (B, H, 1, D)
    den = op.ReduceSum(op.Mul(phi_q, z), op.Constant(value_ints=[-1]), keepdims=1)
    out = op.Div(op.MatMul(phi_q, state), op.Add(den, op.Constant(value_float=eps)))
    return op.CastLike(out, q)


@torch.library.custom_op("graphopt::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ReLU linear attention; see the module docstring."""
    return linear_attention_reference(q, k, v, eps=eps)


@linear_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@linear_attention.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    try:
        from graphopt.autotune.kernels import linear_attention as kernel
    except ImportError:  # no Triton: the reference is correct everywhere, only slower
        return linear_attention_reference(q, k, v, eps=eps)
    return kernel(q, k, v, eps=eps)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, eps = inputs
    ctx.save_for_backward(q, k, v)
    ctx.eps = eps


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients through the reference formula (distillation trains the projections around the op)."""
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = linear_attention_reference(*leaves, eps=ctx.eps)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return (*grads, None)


linear_attention.register_autograd(_backward, setup_context=_setup_context)
