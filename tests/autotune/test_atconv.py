"""ATConv's kernel generation fused into its convolution's call site, run under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")

import graphopt  # noqa: E402
from graphopt.autotune.atconv import ATConvRegion, match  # noqa: E402
from graphopt.autotune.cache import Config  # noqa: E402
from graphopt.autotune.check import call_sites, check_regions  # noqa: E402
from graphopt.autotune.configs import is_aten  # noqa: E402
from graphopt.autotune.kernels.dynamic_dwconv import generated_dwconv_plan, generated_dwconv_reference  # noqa: E402
from graphopt.autotune.lower import TuningOptions, lower  # noqa: E402
from graphopt.autotune.runtime import Runtime  # noqa: E402
from graphopt.models.dit import SelfAttention  # noqa: E402
from graphopt.passes.atconv import ATConvOptions, substitute_atconv  # noqa: E402
from tests.autotune.kernels.helpers import close  # noqa: E402


def atconv_graph(dtype=torch.float32, tokens=25, width=24):
    """A self-attention site with ATConv substituted (lambda made non-zero so inhibition matters)."""
    torch.manual_seed(0)
    site = SelfAttention(width, 2).eval().to(dtype)
    opt = graphopt.optimize(site, (torch.randn(2, tokens, width, dtype=dtype),))
    gm, replaced = substitute_atconv(opt.captured.graph_module, ATConvOptions())
    assert replaced == 1
    with torch.no_grad():
        for name, p in gm.graphopt_fresh.named_parameters():
            if "lambda" in name:
                p.normal_()
    return gm, list(opt.captured.example_inputs)


def test_the_kernel_generation_chain_and_the_convolution_are_one_call_site():
    gm, inputs = atconv_graph()
    result = lower(gm, options=TuningOptions(cache=None))
    (region,) = [r for r in result.regions if r.kernel == "generated_dwconv"]
    assert region.kind == "attention" and region.ops == ("gelu", "linear", "reshape", "mean", "mul", "sub",
                                                         "dynamic_dwconv")
    assert "gelu" not in [op for r in result.regions if r is not region for op in r.ops]
    assert dict(result.left_on_aten).get("mean") is None  # the generator's mean runs inside the kernel
    outputs, errors = check_regions(result.graph_module, inputs)
    assert all(c.within for c in errors.values())
    with torch.no_grad():
        close(outputs[0], gm(*inputs)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_candidate_matches_the_eager_chain(dtype):
    gm, inputs = atconv_graph(dtype)
    result = lower(gm, options=TuningOptions(cache=None))
    ((site, args),) = [(s, a) for s, a in call_sites(result.graph_module, inputs) if isinstance(s, ATConvRegion)]
    want = site.reference(*args)[0]
    close(generated_dwconv_reference(*args), want)  # the kernel's formula is the pass's chain
    for config in [Config(c) for c in site.configs()]:
        got = site.launch(config, *args)[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        close(got, want)
    assert not is_aten(site.default_config(*args))  # untuned: the kernel, as for the plain convolution


def test_the_generated_forward_launches_the_fused_kernel():
    gm, inputs = atconv_graph()
    result = lower(gm, options=TuningOptions(cache=None))
    runtime = Runtime(result.graph_module)
    with torch.no_grad():
        runtime(inputs)
        got = runtime(inputs)
        close(got[0], gm(*inputs)[0])
    assert runtime.stats.hits == 1 and "generated_dwconv_kernel[(" in runtime.forwards[0].source


def test_a_chain_whose_kernels_are_read_elsewhere_is_not_fused():
    gm, inputs = atconv_graph()
    (conv,) = [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.dynamic_dwconv.default]
    assert match(conv) is not None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], conv.args[1]),)  # the inhibited kernels become an output too
    gm.recompile()
    assert match(conv) is None
    result = lower(gm, options=TuningOptions(cache=None))
    assert [r.kernel for r in result.regions if r.kind == "attention"] == ["dynamic_dwconv"]


def test_bad_inputs_to_the_fused_launcher_are_clear_errors():
    v = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"routed must have shape \(2, 4, k\^2\) with k odd"):
        generated_dwconv_plan(v, torch.randn(2, 4, 8), torch.randn(8, 8), torch.randn(8), torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"inhibition must have shape \(1, 4, 1, 1\)"):
        generated_dwconv_plan(v, torch.randn(2, 4, 9), torch.randn(9, 9), torch.randn(9), torch.randn(4))
    with pytest.raises(ValueError, match="gen_weight must have the same dtype as the input"):
        generated_dwconv_plan(v, torch.randn(2, 4, 9), torch.randn(9, 9).half(), torch.randn(9),
                              torch.randn(1, 4, 1, 1))
