"""A launcher's work as values: the buffers it allocates and the kernels it launches.

Where it belongs: between a kernel launcher's checks and its launches. Each launcher (the hand-written
ones in :mod:`.kernels`, the generated ones' call sites in :mod:`.sites`) computes a
:class:`LaunchPlan` for the given tensors and config: grids, sizes, strides and constexprs, all
concrete. The launcher runs it at once (:meth:`LaunchPlan.run`); :mod:`.runtime` writes the same plan
into a generated forward as straight-line source, so that the checks and the config choice run once
per input layout instead of once per call. Plain Python: no Triton needed to import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Ref:
    """A tensor argument of a kernel call, by its name in the plan (an input, a cast or a buffer)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A tensor the plan allocates on the inputs' device: an output or a scratch workspace."""

    name: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    zero: bool = False
    """Filled with zeros (an output no kernel writes, e.g. attention over no keys)."""


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One launch: ``kernel[grid](*args, **constexprs)``; tensor arguments are :class:`Ref` values."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class AtenCall:
    """One ATen op in a plan (a cuBLAS matmul before an epilogue kernel): ``result = op(*args)``, tensor
    arguments as :class:`Ref` values, ``None`` passed as it is."""

    op: Any
    args: tuple[Any, ...]
    result: str


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What a launcher does for one set of input layouts and one config, as values.

    ``inputs``: the names of the tensors the caller hands to :meth:`run`; ``casts``: (name, input,
    dtype), a contiguous copy of an input in another dtype (e.g. VAR's levels as int32); ``buffers``:
    the allocations; ``calls``: the launches (and ATen ops), in order; ``outputs``: the names
    returned. Valid only for inputs with the shapes, strides, dtypes and device the plan was made for:
    strides and sizes are baked into the arguments.
    """

    inputs: tuple[str, ...]
    buffers: tuple[Buffer, ...]
    calls: tuple[KernelCall | AtenCall, ...]
    outputs: tuple[str, ...]
    casts: tuple[tuple[str, str, torch.dtype], ...] = ()

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Allocate, launch, return the outputs; ``tensors`` in the order of :attr:`inputs`."""
        env: dict[str, torch.Tensor] = dict(zip(self.inputs, tensors))
        device = tensors[0].device
        for name, source, dtype in self.casts:
            env[name] = env[source].to(dtype).contiguous()
        for b in self.buffers:
            t = torch.empty_strided(b.shape, b.strides, dtype=b.dtype, device=device)
            env[b.name] = t.zero_() if b.zero else t
        for call in self.calls:
            args = [env[a.name] if isinstance(a, Ref) else a for a in call.args]
            if isinstance(call, AtenCall):
                env[call.result] = call.op(*args)
            else:
                call.kernel[call.grid](*args, **dict(call.constexprs))
        return tuple(env[name] for name in self.outputs)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a new contiguous tensor of ``shape`` (as ``torch.empty`` gives it)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
