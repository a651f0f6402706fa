"""``graphopt::block_causal_attention``: VAR's block-causal softmax attention, by level ids.

q: (B, H, L, D), k: (B, H, L, D), v: (B, H, L, Dv), level: (L,) integers, one per token (its scale in
VAR's next-scale sequence). Query i attends key j iff level_j <= level_i: every token sees its own
scale and the earlier ones::

    O_i = sum_j softmax_j(s Q_i . K_j + M_ij) V_j,   M_ij = 0 if level_j <= level_i else -inf

``scale`` s defaults to D^-1/2. The reference is SDPA with the dense boolean mask; on CUDA the op runs
the flash kernel of :mod:`graphopt.autotune.kernels.attention`, which skips fully masked key blocks.
"""

from __future__ import annotations

import torch


def block_causal_mask(level: torch.Tensor) -> torch.Tensor:
    """The boolean (L, L) mask of a level vector, True where query i may attend key j: level_j <= level_i."""
    return level[None, :] <= level[:, None]


def block_causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor,
                                     scale: float | None = None) -> torch.Tensor:
    """SDPA under the level vector's dense mask."""
    mask = block_causal_mask(level.to(q.device))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


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
