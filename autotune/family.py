"""The row that maps an attention-family op onto its hand-written kernel, declared in the kernel's module.

Softmax attention, VAR's block-causal attention, LiT's linear attention and ATConv's dynamic depthwise
conv each have a kernel module in :mod:`.kernels`; each module's ``lowering()`` returns its rows,
keyed by the graph target they lower, and :func:`graphopt.autotune.sites.family_ops` collects them.
A new attention-family kernel adds its row beside its launcher, not in the lowering.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx


@dataclasses.dataclass(frozen=True)
class FamilyOp:
    """How one op maps onto its kernel module.

    ``module``: the module in :mod:`.kernels`; ``launcher``: its launching function; ``kernels``: its
    ``@triton.jit`` functions (their source is the tuning cache's key); ``tensors``: how many leading
    arguments are tensors; ``optional_tensors``: (position, name) of tensor arguments a call may pass
    or leave None, handed to the launcher, ``shape`` and ``reference`` by keyword when given;
    ``options(node)``: its other arguments as the launcher's keywords; ``shape(*tensors,
    **optional_tensors)``: the tuning shape; ``reference``: the eager op it replaces; ``uses_dot``:
    the kernel multiplies with ``tl.dot`` (which the interpreter gets wrong in bf16); ``aten_first``:
    the eager op is the untuned default (PyTorch's SDPA is the bar for softmax attention);
    ``tensor_names``: the launcher's names of the leading tensors, in order (the launcher's
    ``<launcher>_plan`` names its inputs so); ``launch(fn, tensors, options, config)``: calls the
    launcher, or its planner, with them.
    """

    module: str
    launcher: str
    kernels: tuple[str, ...]
    tensors: int
    options: Callable[[fx.Node], dict[str, Any]]
    shape: Callable[..., tuple[int, ...]]
    reference: Callable[..., torch.Tensor]
    uses_dot: bool = True
    aten_first: bool = False
    optional_tensors: tuple[tuple[int, str], ...] = ()
    tensor_names: tuple[str, ...] = ("q", "k", "v")
    launch: Callable[..., torch.Tensor] = lambda fn, tensors, options, config: fn(*tensors, **options, config=config)


def heads_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The tuning shape of a (B, H, N, D) attention: (B * H, Nq, Nk, D)."""
    return (q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3])
