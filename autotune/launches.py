"""A launcher's work as values: the buffers it allocates and the kernels it launches.

Where it belongs: between a kernel launcher's checks and its launches. Each launcher (the hand-written
ones in :mod:`.kernels`, the generated ones' call sites in :mod:`.sites`) computes a
:class:`LaunchPlan` for the given tensors and config: grids, sizes, strides and constexprs, all
concrete. The launcher runs it at once (:meth:`LaunchPlan.run`); :mod:`.runtime` writes the same plan
into a generated forward as straight-line source, so that the checks and the config choice run once
per input layout instead of once per call. On a GPU, :class:`LaunchBinder` also binds each launch to the
launcher Triton compiled for it (:class:`DirectLaunch`), so that the forward skips ``JITFunction.run``'s
argument binding and cache lookup. Plain Python: no Triton needed to import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
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

    def run(self, tensors: Sequence[torch.Tensor], binder: LaunchBinder | None = None) -> tuple[torch.Tensor, ...]:
        """Allocate, launch, return the outputs; ``tensors`` in the order of :attr:`inputs`.

        ``binder``: records, for each :class:`KernelCall` in order, its :class:`DirectLaunch` (or ``None``).
        """
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
                compiled = call.kernel[call.grid](*args, **dict(call.constexprs))
                if binder is not None:
                    binder.bind(call, args, compiled)
        return tuple(env[name] for name in self.outputs)


@dataclasses.dataclass(frozen=True)
class Streams:
    """Where launches go: the current device and its current stream, as Triton's driver reads them.

    ``side()`` enters a fresh stream of the current device and yields its handle (recording a launch under
    it tells the stream argument apart from any other integer argument).
    """

    device: Callable[[], int]
    stream: Callable[[int], int]
    side: Callable[[], contextlib.AbstractContextManager[int]]


def triton_streams() -> Streams:
    """Triton's driver on this process's GPU (what ``JITFunction.run`` asks for the device and stream)."""
    from triton.runtime import driver  # imported here: the plans themselves need no Triton

    @contextlib.contextmanager
    def side() -> Iterator[int]:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            yield stream.cuda_stream

    return Streams(driver.active.get_current_device, driver.active.get_current_stream, side)


@dataclasses.dataclass(frozen=True)
class DirectLaunch:
    """A :class:`KernelCall` bound to the launcher Triton compiled for it.

    ``launcher(*grid, stream, function, metadata, None, None, None, *args)`` launches the kernel as
    ``kernel[grid](...)`` would, without ``JITFunction.run``'s argument binding, specialisation key and
    cache lookup; ``args`` are the bound arguments in the kernel's parameter order, tensors as
    :class:`Ref` values. Valid on ``device`` only, and only for arguments specialised as at recording
    (the plan's layout guard ensures that). The three ``None`` are the launch hooks' metadata and the
    enter and exit hooks: a launch is bound only while no launch hook (a profiler's) is installed, and
    skips any installed later.
    """

    launcher: Callable[..., Any]
    grid: tuple[int, int, int]
    function: Any
    metadata: Any
    args: tuple[Any, ...]
    device: int
    compiled: Any = dataclasses.field(default=None, compare=False)
    """The compiled kernel: whoever launches through ``launcher`` keeps it (and its loaded module) alive."""


def _no_hook(hook: Any) -> bool:
    """Whether a launch hook Triton passed does nothing: ``None``, or an empty chain of hooks."""
    return hook is None or (callable(hook) and getattr(hook, "calls", None) == [])


class LaunchBinder:
    """Binds kernel calls, as they run, to the launchers Triton compiled for them (:class:`DirectLaunch`).

    After a call's first (real) launch has compiled its kernel, :meth:`bind` runs the call once more with
    the compiled kernel's launcher swapped for a recorder, under a fresh stream: that gives exactly the
    arguments ``JITFunction.run`` passes, in its order, and launches nothing. A call is left unbound
    (``None``) when what was recorded is not exactly one launch of this grid on that stream, when a launch
    hook is installed (Triton passes its hook chains, empty unless a profiler added to them), or when the
    arguments passed are not the call's own, in its order, followed by constexprs and defaults: its forward
    line then launches through ``kernel[grid]`` as before. ``launches`` holds one entry per call bound, in
    order.
    """

    def __init__(self, streams: Streams):
        self.streams = streams
        self.launches: list[DirectLaunch | None] = []

    def bind(self, call: KernelCall, args: Sequence[Any], compiled: Any) -> None:
        self.launches.append(self._record(call, args, compiled))

    def _record(self, call: KernelCall, args: Sequence[Any], compiled: Any) -> DirectLaunch | None:
        launcher = getattr(compiled, "_run", None)  # the compiled kernel's launcher, set by its first launch
        if launcher is None or not callable(launcher):
            return None
        seen: list[tuple[Any, ...]] = []
        compiled._run = lambda *launch_args: seen.append(launch_args)
        try:
            with self.streams.side() as stream:
                call.kernel[call.grid](*args, **dict(call.constexprs))
        finally:
            compiled._run = launcher
        if len(seen) != 1 or len(seen[0]) < 9:
            return None
        *grid, got_stream, function, metadata, _, enter, leave = seen[0][:9]  # _: what the hooks would get
        want_grid = (tuple(call.grid) + (1, 1))[:3]
        if (tuple(grid) != want_grid or got_stream != stream or function != getattr(compiled, "function", None)
                or not (_no_hook(enter) and _no_hook(leave))):
            return None
        # the call's positional arguments bind to the kernel's first parameters, in order: each keeps its own
        # Ref (two Refs may name one tensor on this run and two on the next); the rest are constexprs and
        # defaults, never tensors
        values = seen[0][9:]
        if len(values) < len(args):
            return None
        bound: list[Any] = []
        for i, value in enumerate(values):
            if i < len(args):
                if value is not args[i] and (isinstance(value, torch.Tensor) or value != args[i]):
                    return None
                bound.append(call.args[i])
            elif isinstance(value, torch.Tensor):
                return None
            else:
                bound.append(value)
        return DirectLaunch(launcher, want_grid, function, metadata, tuple(bound), self.streams.device(), compiled)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a new contiguous tensor of ``shape`` (as ``torch.empty`` gives it)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
