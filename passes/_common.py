"""Small node helpers the exact passes share."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx


def new_buffer(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register ``value`` on ``gm`` as the buffer ``<stem><i>``, ``i`` the first index no parameter or
    buffer of ``gm`` uses; returns the name."""
    taken = {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    index = 0
    while f"{stem}{index}" in taken:
        index += 1
    gm.register_buffer(f"{stem}{index}", value)
    return f"{stem}{index}"


def val(node: Any) -> Any:
    """The example value (a fake tensor) a node carries, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple | None:
    """The node's shape with symbolic sizes as sympy expressions, so equal shapes compare equal."""
    return value_shape(val(node))


def value_shape(v: Any) -> tuple | None:
    """A (fake) tensor's shape as :func:`shape_of` gives it; None for anything else."""
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in v.shape)


def size_bounds(size: int | torch.SymInt) -> tuple[int, int | None]:
    """The least and greatest value a size takes over the captured range (None: no upper bound).

    A symbolic size is bounded by its symbols' ranges (the batch: [1, inf], or [2, inf] for a model
    that treats batch 1 differently; the row count of ``nonzero``: [0, inf]), so
    ``x[: x.shape[0] // 2]`` has a size in [1, inf]. Only the ranges count, as in graphopt's dispatch:
    an inequality torch records beside them (``Ne(s0 // 2, 1)``) is not read, so a size it keeps
    from 1 still counts as possibly 1.
    """
    if not isinstance(size, torch.SymInt):
        return int(size), int(size)
    bounds = size.node.shape_env.bound_sympy(size.node.expr)
    lo, hi = float(bounds.lower), float(bounds.upper)
    return (max(int(lo), 0) if math.isfinite(lo) else 0), (int(hi) if math.isfinite(hi) and hi <= 2**62 else None)


def same_tensor_type(a: Any, b: Any) -> bool:
    """True when two nodes hold tensors of the same shape, dtype and device."""
    va, vb = val(a), val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device and shape_of(a) == shape_of(b))


def is_contiguous(node: Any) -> bool:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return False
    try:
        return bool(v.is_contiguous())
    except Exception:  # symbolic strides may not decide; then we do not know
        return False
