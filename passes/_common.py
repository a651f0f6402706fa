"""Small node helpers the exact passes share."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def val(node: Any) -> Any:
    """The example value (a fake tensor) a node carries, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple | None:
    """The node's shape with symbolic sizes as sympy expressions, so equal shapes compare equal."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in v.shape)


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
