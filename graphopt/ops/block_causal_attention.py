"""``graphopt::block_causal_attention``: VAR's block-causal softmax attention, by level ids.

q: (B, H, L, D), k: (B, H, L, D), v: (B, H, L, Dv), level: (L,) integers, one per token (its scale in
VAR's next-scale sequence). Query i attends key j iff level_j <= level_i: every token sees its own
scale and the earlier ones::

    O_i = sum_j softmax_j(s Q_i . K_j + M_ij) V_j,   M_ij = 0 if level_j <= level_i else -inf

``scale`` s defaults to D^-1/2. The reference is SDPA with the dense boolean mask; on CUDA the op runs
the flash kernel of :mod:`graphopt.autotune.kernels.attention`, which skips fully masked key blocks;
in ONNX it is :func:`block_causal_attention_onnx`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def block_causal_mask(level: torch.Tensor) -> torch.Tensor:
    """The boolean (L, L) mask of a level vector, True where query i may attend key j: level_j <= level_i."""
    return level[None, :] <= level[:, None]


def block_causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor,
                                     scale: float | None = None) -> torch.Tensor:
    """SDPA under the level vector's dense mask."""
    mask = block_causal_mask(level.to(q.device))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def block_causal_attention_onnx(q: Any, k: Any, v: Any, level: Any, scale: float | None = None) -> Any:
    """The reference in standard ONNX ops, for torch.onnx's ``custom_translation_table``.

    Traced by the exporter, so the ops land inline in the graph (no custom-domain node): the mask by
    LessOrEqual of the level vector against its transpose, scores by MatMul with K transposed times
    the scale, Where(mask, scores, -inf), Softmax over the keys, MatMul with V. No row is fully masked
    (a token always sees its own level), so the softmax never divides by zero. SDPA accumulates in
    fp32 whatever the input dtype, and so does the translation: it computes in fp32 and casts back to
    ``q``'s dtype.
    """
    from onnx import TensorProto
    from onnxscript import opset18 as op  # onnxscript loads only when a graph is exported

    rank, head_dim = len(q.shape), q.shape[-1]
    qf, kf, vf = (op.Cast(t, to=TensorProto.FLOAT) for t in (q, k, v))
    k_t = op.Transpose(kf, perm=[*range(rank - 2), rank - 1, rank - 2])
    if scale is not None:
        factor = op.Constant(value_float=scale)
    elif isinstance(head_dim, int):
        factor = op.Constant(value_float=1.0 / math.sqrt(head_dim))
    else:  # a symbolic head dim: D^-1/2 from the runtime shape
        factor = op.Reciprocal(op.Sqrt(op.Cast(op.Shape(q, start=-1), to=TensorProto.FLOAT)))
    scores = op.Mul(op.MatMul(qf, k_t), factor)
    mask = op.LessOrEqual(op.Unsqueeze(level, op.Constant(value_ints=[0])),
                          op.Unsqueeze(level, op.Constant(value_ints=[1])))  # (L, L): level_j <= level_i
    masked = op.Where(mask, scores, op.Constant(value_float=-math.inf))
    out = op.MatMul(op.Softmax(masked, axis=-1), vf)
    return op.CastLike(out, q)


@torch.library.custom_op("graphopt::block_causal_attention", mutates_args=())
def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Block-causal softmax attention; see the module docstring."""
    return block_causal_attention_reference(q, k, v, level, scale)


@block_causal_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor,
      scale: float | None = None) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@block_causal_attention.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor,
      scale: float | None = None) -> torch.Tensor:
    try:
        from graphopt.autotune.kernels import attention as kernel
    except ImportError:  # no Triton: the reference is correct everywhere, only slower
        return block_causal_attention_reference(q, k, v, level, scale)
    return kernel(q, k, v, scale=scale, level=level)
