"""A stored forward's kernel[grid] launches bound to the compiled launchers on its first call (GPU stood in for)."""

import pytest
import torch

pytest.importorskip("triton")

import graphopt  # noqa: E402
from graphopt.autotune import stored  # noqa: E402
from graphopt.autotune.rebind import bind, launches_in  # noqa: E402
from graphopt.autotune.runtime import Portable, layout_of  # noqa: E402
from tests.autotune.standin import FakeDevice, interpreted_kernels_through_triton_run  # noqa: E402
from tests.autotune.test_launches import AXPB_PARAMS, FakeKernel, axpb_body  # noqa: E402
from tests.autotune.test_runtime import assert_same  # noqa: E402
from tests.autotune.test_stored import Block  # noqa: E402

SOURCE = """
def forward_0(x):
    if x.shape != (2, 5):
        return None
    out = torch.empty_strided((2, 5), (5, 1), dtype=torch.float32)
    axpb[(2,)](x, out, 10, 3.0, BLOCK=128)  # out = 3x + 1
    y = torch.empty_strided((2, 5), (5, 1), dtype=torch.float32)
    axpb[(2,)](out, y, x.numel(), float('inf'))  # an argument no literal gives: left as it is
    z = torch.empty_strided((2, 5), (5, 1), dtype=torch.float32)
    axpb[(2,)](y, z, 10, float('-inf'), BLOCK=64)
    return (out, y, z)
"""


def axpb_portable(kernel: FakeKernel) -> Portable:
    kernel.fn, kernel.run = axpb_body, None  # what marks a Triton kernel in a namespace
    namespace = {"torch": torch, "axpb": kernel}
    exec(compile(SOURCE, "<stored>", "exec"), namespace)  # noqa: S102
    x = torch.zeros(2, 5)
    return Portable("forward_0", SOURCE, namespace, {}, layout_of([x]))


def finite_axpb(kernel, x, out, n, scale, block):
    axpb_body(kernel, x, out, n, 3.0 if scale == float("inf") else -1.0 if scale == float("-inf") else scale, block)


def test_the_launch_statements_are_read_with_their_literal_arguments():
    device = FakeDevice()
    found = launches_in(axpb_portable(FakeKernel(axpb_body, AXPB_PARAMS, device)))
    assert [launch.line for launch in found] == [5, 9]  # the x.numel() launch is not a literal one
    assert found[0].call.args[2:] == (10, 3.0) and found[0].call.constexprs == (("BLOCK", 128),)
    assert found[1].call.args[3] == float("-inf") and found[0].kernel == "axpb"


def test_a_forward_is_bound_where_it_can_be_and_computes_what_its_stored_form_does():
    device = FakeDevice(index=1)
    kernel = FakeKernel(finite_axpb, AXPB_PARAMS, device)
    portable = axpb_portable(kernel)
    x = torch.randn(2, 5)
    want = portable.namespace["forward_0"](x)
    out, forward = bind(portable, [x], device.streams())
    assert_same(out, want)
    assert forward is not None and (forward.launches, forward.direct_launches) == (2, 2)
    lines = forward.source.splitlines()
    assert lines[4:7] == ["    if current_device() != 1 or x.data_ptr() % 16:  # the compiled launchers below "
                          "were bound for this",
                          "        return None", "    stream = current_stream(1)"]
    assert ("    axpb_launcher(2, 1, 1, stream, 61453, axpb_metadata, None, None, None, x, out, 10, 3.0, 128)"
            "  # axpb") in lines
    assert "    axpb[(2,)](out, y, x.numel(), float('inf'))  # an argument no literal gives: left as it is" in lines
    assert any("float('-inf'), 64)  # axpb" in line for line in lines)
    launched = len(kernel.launched)
    device.current = 42
    assert_same(forward.fn(x), want)
    assert kernel.launched[launched:] == [((2, 1, 1), 42)] * 3  # two through the launchers, one kernel[grid]
    assert forward.fn(torch.randn(11)[1:].view(2, 5)) is None  # not aligned as x was
    device.index = 0  # launchers bound on device 1
    assert forward.fn(x) is None


def test_a_bound_forward_that_computes_otherwise_is_dropped_with_a_warning():
    device = FakeDevice()
    kernel = FakeKernel(finite_axpb, AXPB_PARAMS, device, per_call_offset=0.5)  # kernel[grid] sets up state
    portable = axpb_portable(kernel)
    x = torch.randn(2, 5)
    with pytest.warns(RuntimeWarning, match="keeps its kernel.grid. launches") as caught:
        out, forward = bind(portable, [x], device.streams())
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]  # not a GC's ResourceWarning
    assert forward is None and "gave other outputs" in messages[0]
    assert_same(out, portable.namespace["forward_0"](x))


@pytest.fixture
def entry(tmp_path):
    x = torch.randn(2, 4, 16)
    folder = graphopt.save(graphopt.optimize(Block().eval(), (x,)), tmp_path / "block")
    with torch.no_grad():
        graphopt.load(folder, target="cuda")(x)  # stores the forward for batch 2
    (name,) = [p.name for p in stored.store_dir().iterdir() if not p.name.startswith(".")]
    return name, folder / "model.pt2", x


def test_a_served_forward_binds_on_its_first_call_on_a_gpu_and_launches_through_the_launchers_after(entry):
    from triton.runtime.jit import JITFunction

    name, program, x = entry
    plain = stored.read(name, program, torch.device("cpu"))
    with torch.no_grad():
        want = plain([x])
    assert want is not None and not plain.bound  # CPU tensors, interpreted kernels: nothing to bind
    served = stored.read(name, program, torch.device("cpu"))
    with interpreted_kernels_through_triton_run(FakeDevice()) as streams, torch.no_grad():
        served.direct_launch = streams
        first = served([x])
        (forward,) = served.bound.values()
        assert forward.launches > 0 and forward.direct_launches == forward.launches, forward.source
        with pytest.MonkeyPatch.context() as patch:  # no launch goes through kernel[grid] now
            patch.setattr(JITFunction, "run", lambda *a, **k: pytest.fail("launched through kernel[grid]"))
            second = served([x])
        unaligned = torch.randn(x.numel() + 1)[1:].view(x.shape)  # x's layout, its data off alignment
        moved = served([unaligned])  # refused by the bound forward's guard: the stored form runs
    assert_same(first, want)
    assert_same(second, want)
    with torch.no_grad():
        assert_same(moved, plain([unaligned]))
