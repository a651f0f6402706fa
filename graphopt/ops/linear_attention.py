"""``graphopt::linear_attention``: LiT's ReLU linear attention (arXiv 2501.12976), the attention part.

Per (batch, head), with phi = ReLU::

    O_i = phi(Q_i) S / (phi(Q_i) . z + eps),     S = sum_j phi(K_j)^T V_j,   z = sum_j phi(K_j)

q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv). LiT's depthwise-conv branch
on V is not part of the op: it is an ordinary depthwise conv2d that the substituting pass adds next to
it. On CUDA the op runs :func:`graphopt.autotune.kernels.linear_attention`.
"""

from __future__ import annotations

import torch


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               eps: float = 1e-6) -> torch.Tensor:
    """The formula above in plain torch, in fp32 (the state is a sum over all tokens), cast back to ``q.dtype``."""
    phi_q, phi_k = torch.relu(q.float()), torch.relu(k.float())
    state = phi_k.transpose(-2, -1) @ v.float()  # (B, H, D, Dv)
    z = phi_k.sum(dim=-2)  # (B, H, D)
    den = (phi_q * z[..., None, :]).sum(-1, keepdim=True)
    return ((phi_q @ state) / (den + eps)).to(q.dtype)


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
