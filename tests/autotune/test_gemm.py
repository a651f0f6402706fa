"""GEMM epilogue fusion: a linear and its pointwise consumers as one call site, run under TRITON_INTERPRET=1."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from graphopt.autotune.cache import Config  # noqa: E402
from graphopt.autotune.check import call_sites  # noqa: E402
from graphopt.autotune.configs import is_aten, pointwise_configs  # noqa: E402
from graphopt.autotune.gemm import GemmRegion, is_template, template_configs  # noqa: E402
from graphopt.autotune.launches import AtenCall  # noqa: E402
from graphopt.autotune.lower import FusedRegion, TuningOptions, lower  # noqa: E402
from graphopt.autotune.model_tuning import site_kind  # noqa: E402
from graphopt.autotune.runtime import Runtime  # noqa: E402
from graphopt.capture import capture  # noqa: E402
from tests.autotune.kernels.helpers import close  # noqa: E402
from tests.autotune.test_lower import FakeTimer, lowered  # noqa: E402


class MLP(nn.Module):
    """A DiT MLP without a norm after it: fc1 + GELU, then fc2 + the adaLN gate + the residual."""

    def __init__(self, width=40, hidden=72, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x, gate):
        return x + gate * self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def gemm_sites(model, *args):
    result, captured = lowered(model, *args)
    return result, [(s, a) for s, a in call_sites(result.graph_module, captured.example_inputs)
                    if isinstance(s, GemmRegion)]


def test_a_linear_and_its_pointwise_consumers_are_one_call_site():
    torch.manual_seed(0)
    result, sites = gemm_sites(MLP(), torch.randn(2, 37, 40), torch.randn(2, 1, 40))
    assert [(r.kind, r.ops) for r in result.regions] == [("gemm", ("linear", "gelu")),
                                                         ("gemm", ("linear", "mul", "add"))]
    assert dict(result.left_on_aten).get("linear") is None  # both linears run inside their call sites
    assert len(sites) == 2 and all(site_kind(s) == "gemm" for s, _ in sites)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_every_candidate_matches_the_eager_ops(dtype, bias):
    torch.manual_seed(0)
    model = MLP(bias=bias).to(dtype)
    # 74 rows, K = 40 and 72, N = 72 and 40: no side a multiple of any tile, so every mask is exercised
    _, sites = gemm_sites(model, torch.randn(2, 37, 40, dtype=dtype), torch.randn(2, 1, 40, dtype=dtype))
    for site, args in sites:
        want = site.reference(*args)
        candidates = [Config(c) for c in site.configs()]
        assert sum(is_template(c) for c in candidates) == len(template_configs())
        for config in candidates:
            got = site.launch(config, *args)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
                close(g, w)  # the template keeps the product in fp32: within the dtype's tolerance


def test_the_untuned_default_is_cublas_then_the_epilogue_kernel_and_tuning_can_pick_the_template(tmp_path):
    torch.manual_seed(0)
    _, sites = gemm_sites(MLP(), torch.randn(2, 37, 40), torch.randn(2, 1, 40))
    (lone, lone_args), (site, args) = sites  # fc1 + GELU, then fc2 + the gate + the residual
    assert lone.epilogue.fuses_nothing and is_aten(lone.default_config(*lone_args))  # nothing to gain untuned
    default = site.default_config(*args)
    assert "XBLOCK" in default and not is_template(default)  # what lowering ran before the fusion existed
    plan = site.plan_for(*args).plan
    assert isinstance(plan.calls[0], AtenCall) and plan.calls[0].op is torch.ops.aten.linear.default
    assert plan.calls[1].kernel is site.epilogue.fn
    order = site.prune([Config(c) for c in site.configs()], site.tuning_shape(*args))
    assert is_aten(order[-1]) and any(is_template(c) for c in order)  # eager last, so the FakeTimer picks it
    result = site.tune(*args, timer=FakeTimer(), cache=None)
    assert is_aten(result.config) and len(result.timings) == len(order)
    template = next(c for c in order if is_template(c))
    site._chosen[next(iter(site._chosen))] = template
    (call,) = site.plan_for(*args).plan.calls
    assert call.kernel is site.fn and call.grid[0] >= 1


def test_the_generated_forward_launches_the_template_and_the_aten_matmul():
    torch.manual_seed(0)
    captured = capture(MLP().eval(), (torch.randn(2, 37, 40), torch.randn(2, 1, 40)))
    result = lower(captured.graph_module, options=TuningOptions(cache=None))
    first, second = [m for m in result.graph_module.modules() if isinstance(m, GemmRegion)]
    tensors = list(captured.example_inputs)
    with torch.no_grad():
        call_sites(result.graph_module, tensors)  # each site picks its default per shape bucket
    first._chosen[next(iter(first._chosen))] = Config(pointwise_configs()[0])  # cuBLAS, then the GELU kernel
    key = next(iter(second._chosen))
    second._chosen[key] = Config(template_configs()[5])  # 32 x 64 tiles
    runtime = Runtime(result.graph_module)
    with torch.no_grad():
        want = captured.reference_outputs
        runtime(tensors)
        got = runtime(tensors)
    assert runtime.stats.hits == 1
    close(got[0], want[0])
    source = runtime.forwards[0].source
    assert "aten_linear_default(" in source  # the first site: cuBLAS, then its epilogue kernel
    assert f"{first.epilogue.fn.__name__}[(" in source and f"{second.fn.__name__}[(" in source


def test_a_linear_whose_output_is_read_elsewhere_is_not_absorbed():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 24)

        def forward(self, x):
            y = self.fc(x)
            return F.silu(y), y.sum()

    result, sites = gemm_sites(Both(), torch.randn(3, 16))
    assert not sites and [r.kind for r in result.regions] == ["pointwise"]
    assert dict(result.left_on_aten)["linear"] == 1


def test_a_linear_on_rows_that_do_not_merge_into_one_index_is_not_absorbed():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 24)

        def forward(self, x):
            return F.gelu(self.fc(x.transpose(0, 1)))  # (5, 3, 16) read from (3, 5, 16): no single row stride

    result, sites = gemm_sites(Strided(), torch.randn(3, 5, 16))
    assert not sites and [r.kind for r in result.regions] == ["pointwise"]


def test_inputs_laid_out_otherwise_run_the_eager_ops():
    torch.manual_seed(0)
    _, sites = gemm_sites(MLP(), torch.randn(2, 37, 40), torch.randn(2, 1, 40))
    site, args = sites[1]  # fc2 + gate + residual: the residual is an input of the epilogue
    residual = args[-1] if args[-1].shape == (2, 37, 40) else next(a for a in args[3:] if a.shape == (2, 37, 40))
    moved = [a.transpose(0, 1).contiguous().transpose(0, 1) if a is residual else a for a in args]
    before = site.fallbacks
    close(site(*moved)[0], site.reference(*moved)[0])
    assert site.fallbacks == before + 1 and site.plan_for(*moved).plan is None


def test_bf16_is_not_fused_under_the_interpreter_and_the_report_says_why():
    model = MLP().to(torch.bfloat16)
    captured = capture(model.eval(), (torch.randn(2, 5, 40, dtype=torch.bfloat16),
                                      torch.randn(2, 1, 40, dtype=torch.bfloat16)))
    result = lower(captured.graph_module, options=TuningOptions(cache=None))
    assert [r.kind for r in result.regions] == ["pointwise", "pointwise"]
    assert not result.declined and len(result.unfused) == 2 and all("bf16" in why for _, why in result.unfused)
    assert not any(isinstance(m, GemmRegion) for m in result.graph_module.modules())
    assert sum(isinstance(m, FusedRegion) for m in result.graph_module.modules()) == 2


def test_the_report_counts_gemm_call_sites_and_says_why_a_linear_was_not_fused():
    import graphopt

    torch.manual_seed(0)
    args = (torch.randn(2, 5, 40), torch.randn(2, 1, 40))
    text = graphopt.optimize(MLP().eval(), args, target="cuda").report.table()
    assert "2 kernel calls (2 gemm)" in text and "left on ATen: nothing" in text
    half = graphopt.optimize(MLP().eval().to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), target="cuda")
    assert "2 linear(s) on cuBLAS apart from their epilogue kernel" in half.report.table()
