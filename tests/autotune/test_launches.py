"""Launch plans bound to compiled launchers (:class:`LaunchBinder`), against a kernel that follows Triton's
launch protocol on the CPU: ``kernel[grid](*args)`` binds the arguments in parameter order, finds the
compiled kernel and calls its launcher with grid, stream, function, metadata, hooks and the bound values."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from graphopt.autotune.launches import Buffer, DirectLaunch, KernelCall, LaunchBinder, LaunchPlan, Ref
from tests.autotune.standin import FakeDevice, StandInCompiled, triton_on_a_stand_in_gpu


class FakeKernel:
    """``body(kernel, *bound)`` is the kernel; ``params`` its parameters with their defaults. Its compiled
    kernel (one per device) launches the body and records the grid and stream of each launch."""

    def __init__(self, body: Callable, params: list[tuple[str, object]], device: FakeDevice, *,
                 hook: object = None, workspace: torch.Tensor | None = None, per_call_offset: float | None = None):
        self.body, self.params, self.device = body, params, device
        self.__name__ = "axpb"
        self.hook, self.workspace, self.per_call_offset = hook, workspace, per_call_offset
        self.compiled: dict[int, StandInCompiled] = {}
        self.launched: list[tuple[tuple[int, int, int], int]] = []
        self.in_run = False  # inside kernel[grid](...), as opposed to a direct call of the launcher
        self.offset = 0.0  # state kernel[grid] may set up around the launch (per_call_offset)

    def compile(self) -> StandInCompiled:
        def launch(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *args):
            assert function == compiled.function and metadata is compiled.packed_metadata
            self.launched.append(((gx, gy, gz), stream))
            self.body(self, *args)

        compiled = StandInCompiled(launch, function=0xF00D)
        return compiled

    def __getitem__(self, grid: tuple[int, ...]) -> Callable:
        def run(*args, **kwargs):
            names = [name for name, _ in self.params]
            bound = list(args) + [kwargs.get(name, default) for name, default in self.params[len(args):]]
            if self.workspace is not None:  # a tensor of the launcher's own, not one of the call's
                bound[names.index("ws")] = self.workspace
            index = self.device.index
            if index not in self.compiled:
                self.compiled[index] = self.compile()
            compiled = self.compiled[index]
            if self.per_call_offset is not None:  # state the run sets up around the launch
                self.offset = self.per_call_offset
            grid3 = (tuple(grid) + (1, 1))[:3]
            self.in_run = True
            compiled.run(*grid3, self.device.current, compiled.function, compiled.packed_metadata, self.hook,
                         self.hook, None, *bound)
            self.in_run = False
            self.offset = 0.0
            return compiled

        return run


def axpb_body(kernel, x, out, n, scale, block):
    out.copy_(x * scale + 1 + kernel.offset)


AXPB_PARAMS = [("x", None), ("out", None), ("n", None), ("scale", None), ("BLOCK", 64)]


def axpb_plan(kernel: FakeKernel, x: torch.Tensor) -> LaunchPlan:
    call = KernelCall(kernel, (2,), (Ref("x"), Ref("out"), x.numel(), 3.0), (("BLOCK", 128),))
    return LaunchPlan(("x",), (Buffer("out", tuple(x.shape), x.stride(), x.dtype),), (call,), ("out",))


def test_a_launch_is_bound_to_its_compiled_launcher_with_the_arguments_triton_passed():
    device = FakeDevice(index=1)
    kernel = FakeKernel(axpb_body, AXPB_PARAMS, device)
    x = torch.randn(8)
    binder = LaunchBinder(device.streams())
    (out,) = axpb_plan(kernel, x).run([x], binder)
    torch.testing.assert_close(out, x * 3 + 1)
    (launch,) = binder.launches
    compiled = kernel.compiled[1]
    assert launch == DirectLaunch(compiled._run, (2, 1, 1), 0xF00D, compiled.packed_metadata,
                                  (Ref("x"), Ref("out"), 8, 3.0, 128), 1)
    assert len(kernel.launched) == 1  # recording launched nothing
    again = torch.empty_like(x)
    launch.launcher(*launch.grid, 7, launch.function, launch.metadata, None, None, None, x, again, 8, 3.0, 128)
    torch.testing.assert_close(again, out)


def test_two_arguments_that_are_one_tensor_on_this_run_keep_their_own_names():
    device = FakeDevice()
    kernel = FakeKernel(lambda kernel, x, y, out, n, block: out.copy_(x * y), [("x", None), ("y", None),
                        ("out", None), ("n", None), ("BLOCK", 64)], device)
    x = torch.randn(8)
    call = KernelCall(kernel, (1,), (Ref("x"), Ref("y"), Ref("out"), 8), ())
    plan = LaunchPlan(("x", "y"), (Buffer("out", (8,), (1,), x.dtype),), (call,), ("out",))
    binder = LaunchBinder(device.streams())
    plan.run([x, x], binder)  # x * x on this run; another call may pass two tensors
    (launch,) = binder.launches
    assert launch.args == (Ref("x"), Ref("y"), Ref("out"), 8, 64)


def test_the_stream_argument_is_the_one_current_at_the_launch():
    device = FakeDevice()
    kernel = FakeKernel(axpb_body, AXPB_PARAMS, device)
    x = torch.randn(8)
    LaunchPlan.run(axpb_plan(kernel, x), [x], LaunchBinder(device.streams()))
    assert kernel.launched == [((2, 1, 1), 7)]
    assert device.current == 7  # the side stream of the recording is left again


class HookChain:
    """Triton's chain of launch hooks: always passed, called only when something was added to it."""

    def __init__(self, *calls: Callable):
        self.calls = list(calls)

    def __call__(self, metadata):
        for call in self.calls:
            call(metadata)


def test_empty_hook_chains_are_no_hooks_and_the_launch_is_bound_without_them():
    device = FakeDevice()
    kernel = FakeKernel(axpb_body, AXPB_PARAMS, device, hook=HookChain())
    x = torch.randn(8)
    binder = LaunchBinder(device.streams())
    axpb_plan(kernel, x).run([x], binder)
    (launch,) = binder.launches
    assert launch is not None and launch.args == (Ref("x"), Ref("out"), 8, 3.0, 128)


@pytest.mark.parametrize("case", ["hook", "profiler", "workspace", "interpreted", "two_launches", "other_grid",
                                  "reordered"])
def test_a_launch_that_cannot_be_reproduced_exactly_is_left_unbound(case):
    device = FakeDevice()
    params, body = AXPB_PARAMS, axpb_body
    kwargs: dict = {}
    if case == "hook":
        kwargs["hook"] = lambda metadata: None  # a launch hook is installed
    if case == "profiler":
        kwargs["hook"] = HookChain(lambda metadata: None)  # a profiler added itself to the chain
    if case == "workspace":
        params = [*AXPB_PARAMS, ("ws", None)]
        body = lambda kernel, x, out, n, scale, block, ws: axpb_body(kernel, x, out, n, scale, block)  # noqa: E731
        kwargs["workspace"] = torch.empty(4)
    kernel = FakeKernel(body, params, device, **kwargs)
    x = torch.randn(8)
    plan = axpb_plan(kernel, x)
    if case == "interpreted":  # the interpreter returns no compiled kernel

        class Interpreted:
            def __getitem__(self, grid):
                return lambda *args, **kw: kernel[grid](*args, **kw) and None

        plan = dataclasses.replace(plan, calls=(dataclasses.replace(plan.calls[0], kernel=Interpreted()),))
    if case == "two_launches":

        class Twice:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    kernel[grid](*args, **kw)
                    return kernel[grid](*args, **kw)
                return run

        plan = dataclasses.replace(plan, calls=(dataclasses.replace(plan.calls[0], kernel=Twice()),))
    if case == "reordered":  # a launch path that passes the arguments in another order than the call's

        class Reordered:
            def __getitem__(self, grid):
                return lambda x, out, *rest, **kw: kernel[grid](out, x, *rest, **kw)

        plan = dataclasses.replace(plan, calls=(dataclasses.replace(plan.calls[0], kernel=Reordered()),))
        kernel.body = lambda k, out, x, n, scale, block: axpb_body(k, x, out, n, scale, block)
    if case == "other_grid":

        class Regrid:
            def __getitem__(self, grid):
                return kernel[(grid[0] * 2,)]

        plan = dataclasses.replace(plan, calls=(dataclasses.replace(plan.calls[0], kernel=Regrid()),))
    binder = LaunchBinder(device.streams())
    (out,) = plan.run([x], binder)
    torch.testing.assert_close(out, x * 3 + 1)
    assert binder.launches == [None]
    for compiled in kernel.compiled.values():
        assert compiled._run == compiled.launch  # the launcher is put back


def test_the_binder_reproduces_what_tritons_own_run_passes_the_launcher():
    """The installed Triton's ``JITFunction.run`` (argument binding, defaults, options, grid, stream, hooks)
    drives the launch; only the device, the target and the compilation are stood in for."""
    tl = pytest.importorskip("triton.language")
    from triton.runtime.jit import JITFunction

    def axpb_kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, EVEN: tl.constexpr = True):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale + 1, mask=offs < n)

    launched = []

    def launcher(kernel):
        def launch(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, x, out, n, scale, block,
                   even):
            launched.append(((gx, gy, gz), stream, block, even))
            out.copy_(x * scale + 1)

        return launch

    device = FakeDevice()
    kernel = JITFunction(axpb_kernel)
    x = torch.randn(8)
    call = KernelCall(kernel, (2,), (Ref("x"), Ref("out"), 8, 3.0), (("BLOCK", 128), ("num_warps", 4)))
    plan = LaunchPlan(("x",), (Buffer("out", (8,), (1,), x.dtype),), (call,), ("out",))
    with triton_on_a_stand_in_gpu(device, launcher) as streams:
        binder = LaunchBinder(streams)
        (out,) = plan.run([x], binder)
    torch.testing.assert_close(out, x * 3 + 1)
    (compiled,) = kernel.device_caches[0][0].values()
    (launch,) = binder.launches
    assert launch == DirectLaunch(compiled.launch, (2, 1, 1), compiled.function, compiled.packed_metadata,
                                  (Ref("x"), Ref("out"), 8, 3.0, 128, True), 0)
    assert launched == [((2, 1, 1), 7, 128, True)]  # one real launch; the recording launched nothing
