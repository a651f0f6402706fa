"""Triton's own launch path on a CPU, the GPU stood in for.

``JITFunction.run`` (argument binding, specialisation key, kernel cache, launch hooks, the call of the
compiled kernel's launcher) runs as the installed Triton wrote it; only the driver (current device,
stream and target) and the compilation are stood in for. What the launcher does is the test's choice:
:func:`interpreted_kernels_through_triton_run` makes it run the kernel in Triton's interpreter, so a
lowered model launches every kernel through the real ``JITFunction.run`` and computes what it would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

from graphopt.autotune.launches import Streams


@dataclasses.dataclass
class FakeDevice:
    """The current device and stream, as Triton's driver reports them; ``side()`` switches streams."""

    index: int = 0
    current: int = 7
    fresh: int = 1000

    def streams(self) -> Streams:
        @contextlib.contextmanager
        def side() -> Iterator[int]:
            before, self.fresh = self.current, self.fresh + 1
            self.current = self.fresh
            try:
                yield self.current
            finally:
                self.current = before

        return Streams(lambda: self.index, lambda index: self.current, side)


class StandInCompiled:
    """What ``JITFunction.run`` uses of a compiled kernel: a launcher made by its first launch, a function
    handle, packed metadata, and launch metadata for the hooks (made per launch, as Triton's is)."""

    packed_metadata = (4, 1, 0)

    def __init__(self, launch: Callable[..., Any], function: int = 0xBEEF):
        self.launch, self.function = launch, function
        self._run: Callable[..., Any] | None = None

    @property
    def run(self) -> Callable[..., Any]:
        if self._run is None:
            self._run = self.launch
        return self._run

    def launch_metadata(self, grid: object, stream: int, *args: object) -> dict:
        return {"stream": stream}


@contextlib.contextmanager
def triton_on_a_stand_in_gpu(device: FakeDevice, launcher: Callable[[Any], Callable[..., Any]]) -> Iterator[Streams]:
    """``JITFunction.run`` on ``device`` (an sm_90 target); each compile caches a :class:`StandInCompiled`
    whose launcher is ``launcher(kernel)``. Yields the streams a :class:`LaunchBinder` should use."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as drivers
    from triton.runtime.jit import JITFunction

    class Driver:
        def get_current_device(self) -> int:
            return device.index

        def get_current_stream(self, index: int) -> int:
            return device.current

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    def compile(self: Any, key: str, signature: object, index: int, *args: object) -> StandInCompiled:
        compiled = self.device_caches[index][0][key] = StandInCompiled(launcher(self))  # cached, as Triton does
        return compiled

    with mock.patch.object(drivers, "_active", Driver()), mock.patch.object(JITFunction, "_do_compile", compile):
        yield device.streams()


@contextlib.contextmanager
def interpreted_kernels_through_triton_run(device: FakeDevice) -> Iterator[Streams]:
    """Every interpreted kernel's ``kernel[grid](...)`` goes through ``JITFunction.run`` of a compiled twin
    on the stand-in GPU, whose launcher runs the interpreted kernel with the arguments it is handed."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpret = InterpretedFunction.run
    twins: dict[int, tuple[InterpretedFunction, JITFunction]] = {}
    interpreted: dict[int, InterpretedFunction] = {}

    def launcher(twin: Any) -> Callable[..., None]:
        kernel = interpreted[id(twin)]

        def launch(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *bound):
            interpret(kernel, *bound, grid=(gx, gy, gz), warmup=False)

        return launch

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if id(self) not in twins:
            twins[id(self)] = (self, JITFunction(self.fn))  # the pair keeps both alive: ids stay unique
            interpreted[id(twins[id(self)][1])] = self
        return twins[id(self)][1].run(*args, grid=grid, warmup=warmup, **kwargs)

    with triton_on_a_stand_in_gpu(device, launcher) as streams, mock.patch.object(InterpretedFunction, "run", run):
        yield streams
