"""The generated forward of a lowered graph, run under TRITON_INTERPRET=1, against the general path."""

import copy
import operator
import types

import pytest
import torch
from torch import fx, nn

pytest.importorskip("triton")

import graphopt  # noqa: E402
import graphopt.ops  # noqa: E402, F401 - registers torch.ops.graphopt.*
from graphopt.autotune import runtime as runtime_module  # noqa: E402
from graphopt.autotune import sites as sites_module  # noqa: E402
from graphopt.autotune.check import call_sites  # noqa: E402
from graphopt.autotune.cache import Config, TuningCache  # noqa: E402
from graphopt.autotune.configs import is_aten  # noqa: E402
from graphopt.autotune.launches import LaunchPlan  # noqa: E402
from graphopt.autotune.lower import lower  # noqa: E402
from graphopt.autotune.sites import FamilyRegion, FusedRegion, SitePlan, TuningOptions, _Tuned  # noqa: E402
from graphopt.autotune.runtime import Runtime, layout_of  # noqa: E402
from graphopt.capture import capture  # noqa: E402
from tests import zoo  # noqa: E402
from tests.autotune.standin import FakeDevice, interpreted_kernels_through_triton_run  # noqa: E402
from tests.autotune.test_launches import AXPB_PARAMS, FakeKernel, axpb_body, axpb_plan  # noqa: E402
from tests.autotune.test_lower import AdaLN, Attention, FakeTimer, Fn, LiTAttention  # noqa: E402

SLOW_ZOO = {"unet", "list_unet", "dict_unet", "uvit", "text_unet", "pixart"}  # 3-30 s each in the interpreter


def lowered_runtime(model, *args, kwargs=None, **runtime_kw):
    captured = capture(model.eval(), args, kwargs)
    result = lower(captured.graph_module, options=TuningOptions(cache=None))
    return Runtime(result.graph_module, **runtime_kw), result.graph_module, list(captured.example_inputs)


def general(gm, tensors):
    with torch.no_grad():
        return tuple(gm(*tensors))


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ZOO else n for n in zoo.ZOO])
def test_the_generated_forward_of_each_zoo_model_equals_the_general_path(name):
    model, args, kwargs = zoo.ZOO[name]()
    runtime, gm, tensors = lowered_runtime(model, *args, kwargs=kwargs)
    with torch.no_grad():
        first = runtime(tensors)  # writes the forward, on the general path
        second = runtime(tensors)  # runs it
    want = general(gm, tensors)
    assert_same(first, want)
    assert_same(second, want)
    assert (runtime.stats.generated, runtime.stats.hits, runtime.stats.general) == (1, 1, 0)
    (forward,) = runtime.forwards
    for name, site in gm.named_modules():
        if isinstance(site, FusedRegion):  # every kernel chosen is launched from the source itself
            inline = f"# {name.rsplit('.', 1)[-1]}: {site.kernel_name} -> the region's ATen ops"
            assert (inline in forward.source) if site.runs_aten() else (f"{site.fn.__name__}[(" in forward.source)


class Family(nn.Module):
    def __init__(self):
        super().__init__()
        self.lit = LiTAttention()
        self.register_buffer("level", torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]))

    def forward(self, x, kernels):
        b, n, d = x.shape
        y = self.lit(x)
        q = y.reshape(b, n, 2, d // 2).transpose(1, 2)
        z = torch.ops.graphopt.block_causal_attention(q, q, q, self.level, None)  # int64 levels: cast
        v = z.transpose(1, 2).reshape(b, n, d).transpose(1, 2).reshape(b, d, 4, 4)
        return torch.ops.graphopt.dynamic_dwconv(v, kernels)


def test_family_kernels_are_launched_from_the_generated_source():
    runtime, gm, tensors = lowered_runtime(Family(), torch.randn(2, 16, 24), torch.randn(2, 24, 3, 3))
    sites = [m for m in gm.modules() if isinstance(m, FamilyRegion)]
    assert sorted(s.kernel_name for s in sites) == ["block_causal_attention", "dynamic_dwconv", "linear_attention"]
    with torch.no_grad():
        runtime(tensors)
        got = runtime(tensors)
    assert_same(got, general(gm, tensors))
    source = runtime.forwards[0].source
    for kernel in ("linear_attention_state_kernel[(", "linear_attention_apply_kernel[(", "attention_kernel[(",
                   "dynamic_dwconv_kernel[(", ".to(torch_int32).contiguous()"):
        assert kernel in source


def test_softmax_attention_runs_sdpa_inline_until_the_flash_kernel_is_tuned_in():
    runtime, gm, tensors = lowered_runtime(Attention(), torch.randn(2, 19, 32))
    with torch.no_grad():
        runtime(tensors)
    assert "aten_scaled_dot_product_attention_default(" in runtime.forwards[0].source
    (site,) = [m for m in gm.modules() if isinstance(m, FamilyRegion)]
    (_, inputs), = call_sites(gm, tensors)
    result = site.tune(*inputs, timer=FakeTimer(), cache=None)  # the last candidate timed wins: a kernel config
    assert not is_aten(result.config) and runtime.retuned()  # what a recorded CUDA graph asks
    with torch.no_grad():
        got = runtime(tensors)  # the re-tune retired the forward: a new one is written with the kernel
    assert runtime.stats.generated == 2 and "attention_kernel[(" in runtime.forwards[0].source
    assert not runtime.retuned()
    assert_same(got, general(gm, tensors))


def test_a_lone_pointwise_op_runs_inline_until_its_kernel_is_tuned_in():
    runtime, gm, tensors = lowered_runtime(Fn(lambda x: torch.sigmoid(x) @ x), torch.randn(2, 24, 24))
    with torch.no_grad():
        runtime(tensors)
    (site,) = [m for m in gm.modules() if isinstance(m, FusedRegion)]
    assert site.runs_aten() and "aten_sigmoid_default(" in runtime.forwards[0].source
    (_, inputs), = call_sites(gm, tensors)
    assert not is_aten(site.tune(*inputs, timer=FakeTimer(), cache=None).config)  # the last timed wins
    with torch.no_grad():
        got = runtime(tensors)
    assert f"{site.fn.__name__}[(" in runtime.forwards[0].source
    assert_same(got, general(gm, tensors))


def test_another_batch_or_dtype_misses_the_guard_and_gets_its_own_forward():
    runtime, gm, (x, c) = lowered_runtime(AdaLN(), torch.randn(3, 5, 40), torch.randn(3, 40))
    with torch.no_grad():
        runtime([x, c])
        (forward,) = runtime.forwards
        other = [torch.randn(2, 5, 40), torch.randn(2, 40)]
        assert forward.fn(*other) is None  # the guard refuses, nothing runs
        assert forward.fn(*(t.half() for t in (x, c))) is None
        assert forward.fn(x.transpose(0, 1).contiguous().transpose(0, 1), c) is None  # same shape, other strides
        assert_same(runtime(other), general(gm, other))
        # (a call in another dtype never reaches a lowered graph: the module captures that dtype anew)
        third = [torch.randn(4, 5, 40), torch.randn(4, 40)]
        assert_same(runtime(third), general(gm, third))
        assert_same(runtime([x, c]), general(gm, [x, c]))  # back to the first layout: its forward
    assert [f.layout for f in runtime.forwards] == [layout_of([x, c]), layout_of(other), layout_of(third)]
    assert (runtime.stats.generated, runtime.stats.hits) == (3, 1)


def test_past_the_layout_limit_calls_take_the_general_path():
    runtime, gm, (x,) = lowered_runtime(Fn(lambda x: torch.sigmoid(x) * x), torch.randn(3, 7), max_forwards=1)
    with torch.no_grad():
        runtime([x])
        other = [torch.randn(5, 7)]
        assert_same(runtime(other), general(gm, other))
    assert (runtime.stats.generated, runtime.stats.general) == (1, 1)


def test_nothing_of_the_tuner_cache_sites_or_verifier_runs_on_the_generated_path(monkeypatch):
    runtime, gm, tensors = lowered_runtime(AdaLN(), torch.randn(3, 5, 40), torch.randn(3, 40))
    with torch.no_grad():
        runtime(tensors)
    want = general(gm, tensors)

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the generated path")

    for owner, name in ((sites_module, "choose"), (sites_module, "tune"), (TuningCache, "get"),
                        (graphopt.verify, "compare"), (_Tuned, "__call__"), (_Tuned, "plan_for"),
                        (FusedRegion, "_config"), (FusedRegion, "_layout"), (FusedRegion, "plan"),
                        (LaunchPlan, "run")):
        monkeypatch.setattr(owner, name, forbidden)
    with torch.no_grad():
        assert_same(runtime(tensors), want)
    assert runtime.stats.hits == 1


def test_an_optimized_module_calls_its_generated_forward_and_dumps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP_KERNELS", str(tmp_path / "kernels"))
    model, args = AdaLN().eval(), (torch.randn(3, 5, 40), torch.randn(3, 40))
    opt = graphopt.optimize(model, args, target="cuda")
    with torch.no_grad():
        want = model(*args)
        for _ in range(2):
            torch.testing.assert_close(opt(*args), want, atol=2e-5, rtol=2e-5)
    (runtime,) = opt._runtimes
    assert (runtime.stats.generated, runtime.stats.hits) == (1, 1)
    (forward,) = runtime.forwards
    assert forward.path is not None and forward.path.parent == tmp_path / "kernels"
    assert forward.path.read_text() == forward.source and "def forward_0(" in forward.source
    compile(forward.source, str(forward.path), "exec")  # the dumped file is the Python that runs

    twin = copy.copy(runtime)  # a copy (or a pickle) leaves the forwards behind: they hold these parameters
    assert not twin.forwards and runtime.forwards
    opt.float()  # .to() and friends may replace parameters: the forwards are written again
    assert not runtime.forwards
    with torch.no_grad():
        torch.testing.assert_close(opt(*args), want, atol=2e-5, rtol=2e-5)


def test_a_runtime_creates_the_dump_folder_it_is_given(tmp_path):
    runtime, _, tensors = lowered_runtime(Axpb(), torch.randn(4, 8), dump_dir=tmp_path / "new" / "forwards")
    with torch.no_grad():
        runtime(tensors)
    (forward,) = runtime.forwards
    assert forward.path.parent == tmp_path / "new" / "forwards" and forward.path.read_text() == forward.source


class Axpb(nn.Module):
    def forward(self, x):
        return (x * 3.0 + 1,)


class AxpbSite(_Tuned):
    """A call site launching one kernel that follows Triton's launch protocol (tests.autotune.test_launches)."""

    kernel_name = "axpb"

    def __init__(self, kernel):
        super().__init__(TuningOptions(cache=None))
        self.kernel = kernel
        self.fallback = fx.symbolic_trace(Axpb())

    def plan_for(self, x):
        return SitePlan(Config({"BLOCK": 128}), axpb_plan(self.kernel, x), (0,))

    def forward(self, x):
        return self.plan_for(x).run(self, (x,))


def axpb_graph(kernel) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.getitem, (graph.call_module("site", (x,)), 0))
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (y, x)),))
    root = nn.Module()
    root.site = AxpbSite(kernel)
    return fx.GraphModule(root, graph)


def test_compiled_kernels_are_launched_through_their_launchers_on_the_current_stream():
    device = FakeDevice(index=1)
    kernel = FakeKernel(axpb_body, AXPB_PARAMS, device)
    runtime = Runtime(axpb_graph(kernel), direct_launch=device.streams())
    x = torch.randn(2, 5)
    want = ((x * 3 + 1) * x,)
    with torch.no_grad():
        assert_same(runtime([x]), want)  # the generating run, then the check of the forward it wrote
        (forward,) = runtime.forwards
        assert (forward.launches, forward.direct_launches) == (1, 1)
        lines = forward.source.splitlines()
        assert lines.index("    if current_device() != 1 or x.data_ptr() % 16:  # the compiled launchers below were "
                           "bound for this") == lines.index("    stream = current_stream(1)") - 2
        assert ("    axpb_launcher(2, 1, 1, stream, 61453, axpb_metadata, None, None, None, x, getitem, 10, 3.0, 128)"
                "  # axpb") in lines
        launched = len(kernel.launched)
        device.current = 42  # another stream is current: the launch goes there
        assert_same(runtime([x]), want)
        assert kernel.launched[launched:] == [((2, 1, 1), 42)] and runtime.stats.hits == 1
        unaligned = torch.randn(11)[1:].view(2, 5)  # the same layout, its data 4 bytes off alignment
        assert forward.fn(unaligned) is None  # its launchers were compiled for aligned pointers
        assert_same(runtime([unaligned]), ((unaligned * 3 + 1) * unaligned,))  # the general path
        device.index = 0  # another current device: its launchers were not bound here, the general path runs
        assert forward.fn(x) is None
        assert_same(runtime([x]), want)
    assert (runtime.stats.generated, runtime.stats.hits, runtime.stats.general) == (1, 1, 2)


@pytest.mark.parametrize("fault", ["wrong", "fails"])
def test_a_forward_whose_direct_launches_differ_from_the_run_is_written_with_kernel_launches(fault):
    device = FakeDevice()
    if fault == "wrong":  # the launcher depends on state that kernel[grid] sets up around it
        kernel = FakeKernel(axpb_body, AXPB_PARAMS, device, per_call_offset=0.5)
    else:
        kernel = FakeKernel(axpb_body, AXPB_PARAMS, device)
        kernel.body = lambda k, *args: axpb_body(k, *args) if kernel.in_run else 1 / 0  # noqa: E731
    runtime = Runtime(axpb_graph(kernel), direct_launch=device.streams())
    x = torch.randn(2, 5)
    want = ((x * 3 + (1.5 if fault == "wrong" else 1)) * x,)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="direct launches of the compiled kernels") as caught:
        assert_same(runtime([x]), want)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]  # not a GC's ResourceWarning
    assert ("gave other outputs" if fault == "wrong" else "failed (ZeroDivisionError") in messages[0]
    (forward,) = runtime.forwards
    assert (forward.launches, forward.direct_launches) == (1, 0) and "_launcher(" not in forward.source
    with torch.no_grad():
        assert_same(runtime([x]), want)


@pytest.mark.parametrize("name", ["dit", "family"])
def test_every_kernel_launched_through_tritons_own_run_binds_and_computes_the_general_paths_outputs(name):
    """The installed Triton's JITFunction.run launches each kernel (the GPU stood in for, the launcher
    running the interpreter): every launch of the forward binds to its launcher, and what it computes is
    what the general path computes."""
    if name == "family":
        runtime, gm, tensors = lowered_runtime(Family(), torch.randn(2, 16, 24), torch.randn(2, 24, 3, 3))
    else:
        model, args, kwargs = zoo.ZOO[name]()
        runtime, gm, tensors = lowered_runtime(model, *args, kwargs=kwargs)
    want = general(gm, tensors)
    with interpreted_kernels_through_triton_run(FakeDevice()) as streams, torch.no_grad():
        runtime.direct_launch = streams
        first = runtime(tensors)  # writes the forward, then runs it once as its check
        second = runtime(tensors)
    (forward,) = runtime.forwards
    assert forward.launches > 0 and forward.direct_launches == forward.launches, forward.source
    assert_same(first, want)
    assert_same(second, want)


def test_direct_launch_is_off_on_the_cpu_and_when_disabled(monkeypatch):
    runtime, gm, tensors = lowered_runtime(AdaLN(), torch.randn(3, 5, 40), torch.randn(3, 40))
    assert runtime._streams(tensors) is None  # CPU tensors, interpreted kernels
    cuda_like = [types.SimpleNamespace(is_cuda=True)]
    monkeypatch.delenv("TRITON_INTERPRET")
    gpu = FakeDevice().streams()
    monkeypatch.setattr(runtime_module, "triton_streams", lambda: gpu)
    assert runtime._streams(cuda_like) is gpu  # compiled kernels on a GPU: Triton's driver
    monkeypatch.setenv("GRAPHOPT_DIRECT_LAUNCH", "0")
    assert runtime._streams(cuda_like) is None
    assert Runtime(gm, direct_launch=False)._streams(cuda_like) is None
    streams = FakeDevice().streams()
    assert Runtime(gm, direct_launch=streams)._streams(tensors) is streams
