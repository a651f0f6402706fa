"""Lowering captured graphs onto generated Triton kernels, run under TRITON_INTERPRET=1.

Every generated region is checked against the ATen ops it replaces (its eager fallback) on the same
inputs, and the lowered graph against the eager model.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from graphopt.autotune import DeviceKey, TuningCache  # noqa: E402
from graphopt.autotune.cache import Config  # noqa: E402
from graphopt.autotune.configs import ATEN, is_aten, norm_configs, pointwise_configs  # noqa: E402
from graphopt.autotune.lower import (FamilyRegion, FusedRegion, KernelLibrary, TuningOptions,  # noqa: E402
                                     call_sites, check_regions, lower)
from graphopt.autotune.regions import POINTWISE  # noqa: E402
from graphopt.capture import capture  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from tests.autotune.kernels.helpers import close  # noqa: E402

aten = torch.ops.aten
FAKE_GPU = DeviceKey("Fake GPU", (9, 0), 132, "12.4", "2.13.0", "3.9.0", "0.1.0")


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def lowered(model, *args, library=None, options=TuningOptions(cache=None)):
    captured = capture(model.eval(), args)
    result = lower(captured.graph_module, library=library, options=options)
    outputs, errors = check_regions(result.graph_module, captured.example_inputs)
    bad = {k: v.line() for k, v in errors.items() if not v.within}
    assert not bad, f"kernels differ from their ATen ops: {bad}"
    for got, want in zip(outputs, captured.reference_outputs):
        close(got, want)
    for site, inputs in call_sites(result.graph_module, captured.example_inputs):
        if not is_aten(site.default_config(*inputs)):
            continue  # the check above ran its kernel
        # a site whose untuned default is its ATen op (one op, nothing fused) still has its kernel checked
        kernel = next(c for c in site.prune([Config(c) for c in site.configs()], site.tuning_shape(*inputs))
                      if not is_aten(c))
        for got, want in zip(site.launch(kernel, *inputs), site.reference(*inputs)):
            close(got, want)
    return result, captured


POSITIVE = lambda x: x.abs() + 0.5  # noqa: E731 - log, sqrt, rsqrt, pow need a positive domain

UNARY = {
    "neg": lambda x: -x, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": torch.relu, "exp": torch.exp,
    "log": lambda x: torch.log(POSITIVE(x)), "sqrt": lambda x: torch.sqrt(POSITIVE(x)),
    "rsqrt": lambda x: torch.rsqrt(POSITIVE(x)), "reciprocal": lambda x: torch.reciprocal(POSITIVE(x)),
    "sin": torch.sin, "cos": torch.cos, "abs": torch.abs, "pow2": lambda x: x**2, "pow3": lambda x: x**3,
    "pow_half": lambda x: POSITIVE(x) ** 0.5, "pow_minus_half": lambda x: POSITIVE(x) ** -0.5,
    "pow_minus_one": lambda x: POSITIVE(x) ** -1,
}
BINARY = {
    "add": torch.add, "add_alpha": lambda x, y: torch.add(x, y, alpha=2.5), "sub": torch.sub,
    "sub_alpha": lambda x, y: torch.sub(x, y, alpha=0.5), "mul": torch.mul, "div": lambda x, y: x / POSITIVE(y),
    "rsub_scalar": lambda x, y: 1 - x * y, "scalar_ops": lambda x, y: (x + 2) * 3 / 4 - y,
    "scalar_overloads": lambda x, y: (aten.add.Scalar(x, 2) - aten.sub.Scalar(y, 1.5) * aten.mul.Scalar(x, 3)
                                      / aten.div.Scalar(POSITIVE(y), 2) + aten.rsub.Scalar(x, 1)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_every_unary_op_on_odd_sizes(name):
    result, _ = lowered(Fn(lambda x: UNARY[name](x) + 0.0 * x), torch.randn(3, 7, 13))
    assert [r.kind for r in result.regions] == ["pointwise"]


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("shapes", [((3, 5, 7), (3, 5, 7)), ((3, 5, 7), (3, 1, 7)), ((3, 5, 7), (7,)),
                                    ((3, 5, 7), ()), ((3, 1, 7), (1, 5, 1))], ids=str)
def test_every_binary_op_with_broadcasting(name, shapes):
    a, b = (torch.randn(s) for s in shapes)
    result, _ = lowered(Fn(BINARY[name]), a, b)
    assert result.regions


def test_the_op_table_is_covered_by_these_tests():
    seen = set()
    for fn, n in [*((f, 1) for f in UNARY.values()), *((f, 2) for f in BINARY.values())]:
        gm = capture(Fn(fn).eval(), tuple(torch.randn(2, 3) for _ in range(n))).graph_module
        seen |= {node.target for node in gm.graph.nodes if node.target in POINTWISE}
    assert not {str(t) for t in set(POINTWISE) - seen}


def test_transposed_inputs_and_outputs_keep_eager_strides():
    x = torch.randn(4, 6, 5).transpose(1, 2)  # (4, 5, 6), not contiguous
    result, captured = lowered(Fn(lambda x, y: torch.sigmoid(x) * y), x, torch.randn(4, 5, 6))
    out = result.graph_module(*captured.example_inputs)[0]
    assert out.stride() == captured.reference_outputs[0].stride()


class AdaLN(nn.Module):
    def __init__(self, dim=40):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 3 * dim)

    def forward(self, x, c):
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=1)
        h = self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return x + gate.unsqueeze(1) * F.gelu(h, approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adaln_block_in_each_dtype(dtype):
    model = AdaLN().to(dtype)
    result, _ = lowered(model, torch.randn(3, 5, 40, dtype=dtype) * 2 + 1, torch.randn(3, 40, dtype=dtype))
    assert [r.kind for r in result.regions] == ["pointwise", "norm"]


@pytest.mark.parametrize("module,shape", [
    (nn.LayerNorm(300), (2, 3, 300)),                              # three loop steps, a masked tail
    (nn.LayerNorm((5, 7)), (3, 5, 7)),                             # normalised over two dims
    (nn.LayerNorm(33, elementwise_affine=False), (4, 33)),
    (nn.GroupNorm(3, 6), (2, 6, 5, 7)),
    (nn.GroupNorm(1, 4, affine=False), (3, 4, 9)),
    (nn.RMSNorm(24), (2, 5, 24)),
    (nn.RMSNorm(24, eps=1e-3, elementwise_affine=False), (2, 5, 24)),
], ids=["ln-300", "ln-2d", "ln-noaffine", "gn-affine", "gn-1group-1d", "rms", "rms-noaffine"])
def test_norms_with_a_silu_epilogue(module, shape):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    result, _ = lowered(Fn(lambda x: F.silu(module(x)) * 2), torch.randn(shape) * 3 + 1)
    assert [r.kind for r in result.regions] == ["norm"]


def _single_region(model, *args):
    captured = capture(model.eval(), args)
    result = lower(captured.graph_module, options=TuningOptions(cache=None))
    (site,) = [m for m in result.graph_module.modules() if isinstance(m, FusedRegion)]
    inputs = [captured.example_inputs[0] if n.op == "placeholder" else getattr(captured.graph_module, n.target)
              for n in site.generated.region.inputs]
    return site, inputs


@pytest.mark.parametrize("config", [c for c in pointwise_configs() if not is_aten(c)], ids=str)
def test_every_pointwise_config(config):
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x + 1), torch.randn(3, 700))
    close(site.launch(config, *inputs)[0], site.fallback(*inputs)[0])


@pytest.mark.parametrize("config", [c for c in norm_configs() if not is_aten(c)], ids=str)
def test_every_norm_config(config):
    site, inputs = _single_region(nn.LayerNorm(300, elementwise_affine=False), torch.randn(3, 300))
    close(site.launch(config, *inputs)[0], site.fallback(*inputs)[0])


class Attention(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_is_a_call_site_whose_candidates_are_pytorch_sdpa_and_the_flash_kernel(dtype):
    result, captured = lowered(Attention().to(dtype), torch.randn(2, 19, 32, dtype=dtype))
    assert [r.kind for r in result.regions] == ["attention"]
    (site,) = [m for m in result.graph_module.modules() if isinstance(m, FamilyRegion)]
    configs = site.configs()
    assert is_aten(configs[0]) and not any(is_aten(c) for c in configs[1:])  # SDPA until tuned otherwise
    q, k, v = (torch.randn(2, 2, 19, 16, dtype=dtype) for _ in range(3))
    for config in configs[1:]:
        close(site.launch(config, q, k, v)[0], F.scaled_dot_product_attention(q, k, v))


class LiTAttention(nn.Module):
    """graphopt's linear attention with LiT's depthwise-conv branch fused in, as the linear-attention pass emits it."""

    def __init__(self, dim=24, heads=2, bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.dwc = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=bias)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.ops.graphopt.linear_attention(q, k, v, 1e-6, self.dwc.weight, self.dwc.bias)
        return out.transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_attention_with_its_dwc_branch_is_one_call_site_passing_the_branch_tensors(bias):
    import graphopt.ops  # noqa: F401 - registers torch.ops.graphopt.linear_attention

    result, captured = lowered(LiTAttention(bias=bias), torch.randn(2, 16, 24))  # a 4 x 4 grid, Dv = 12
    assert [(r.kind, r.kernel) for r in result.regions] == [("attention", "linear_attention")]
    (site,) = [m for m in result.graph_module.modules() if isinstance(m, FamilyRegion)]
    assert ("dwc_bias" in repr(site)) == bias and "dwc_weight" in repr(site)
    ((_, inputs),) = call_sites(result.graph_module, captured.example_inputs)
    assert site.tuning_shape(*inputs)[-1] == 5  # the branch's kernel size is part of the tuning key
    for config in site.configs():
        close(site.launch(config, *inputs)[0], site.reference(*inputs)[0])


def test_a_lone_pointwise_op_keeps_its_aten_op_until_its_kernel_is_timed_faster():
    site, inputs = _single_region(Fn(torch.sigmoid), torch.randn(3, 700))
    assert site.fuses_nothing and is_aten(site.default_config(*inputs))
    with torch.no_grad():
        site(*inputs)
    assert site.runs_aten()

    def timer(fn, *, warmup, repeats):  # a GPU on which the kernel happens to win
        fn()
        return 1.0 if is_aten(fn.args[0]) else 0.5

    assert not is_aten(site.tune(*inputs, timer=timer, cache=None).config) and not site.runs_aten()
    chain, chain_inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * 2), torch.randn(3, 700))
    assert not chain.fuses_nothing and not is_aten(chain.default_config(*chain_inputs))


def test_tuning_checks_each_candidate_and_one_that_differs_cannot_win():
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x + 1), torch.randn(3, 700))
    bad = site.prune([Config(c) for c in site.configs()], site.tuning_shape(*inputs))[1]
    planner = site.config_plan

    class Off:  # a launch plan whose kernel computes something else
        def __init__(self, planned):
            self.planned = planned

        def run(self, site, inputs):
            return tuple(o + 0.5 for o in self.planned.run(site, inputs))

    site.config_plan = lambda config, inputs: (Off(planner(config, inputs)) if config == bad
                                               else planner(config, inputs))

    def timer(fn, *, warmup, repeats):
        fn()
        return 0.1 if fn.args[0] == bad else 1.0  # the wrong one would be the fastest

    result = site.tune(*inputs, timer=timer, cache=None)
    (failed,) = [t for t in result.timings if t.config == bad]
    assert result.config != bad and failed.failed and "differs from the ATen ops it replaces" in failed.error


def test_every_site_can_fall_back_on_aten_and_a_kernel_must_beat_it():
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x + 1), torch.randn(3, 700))
    candidates = site.prune([Config(c) for c in site.configs()], site.tuning_shape(*inputs))
    assert not is_aten(candidates[0]) and is_aten(candidates[-1])  # a generated kernel by default
    close(site.launch(Config(ATEN), *inputs)[0], site.fallback(*inputs)[0])

    def timer(fn, *, warmup, repeats):  # a GPU on which the eager ops happen to win
        fn()
        return 0.5 if is_aten(fn.args[0]) else 1.0  # fn is the tuner's partial(run_config, config)

    result = site.tune(*inputs, timer=timer, cache=None)
    assert is_aten(result.config)


def test_bf16_attention_stays_on_aten_in_the_interpreter_and_says_why():
    result, _ = lowered(Attention().to(torch.bfloat16), torch.randn(2, 7, 32, dtype=torch.bfloat16))
    assert result.regions == () and "triton-lang/triton#11584" in result.declined[0][1]


def test_one_kernel_serves_every_batch():
    result, captured = lowered(AdaLN(), torch.randn(3, 5, 40), torch.randn(3, 40))
    for batch in (2, 7):
        x, c = torch.randn(batch, 5, 40), torch.randn(batch, 40)
        close(result.graph_module(x, c)[0], captured.graph_module(x, c)[0])
    sites = [m for m in result.graph_module.modules() if isinstance(m, FusedRegion)]
    assert sites and all(m.fallbacks == 0 for m in sites)


def test_inputs_laid_out_otherwise_than_at_capture_run_the_eager_fallback():
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x), torch.randn(6, 10))
    transposed = torch.randn(10, 6).t()  # same shape, other strides: the kernel's index math would be wrong
    close(site(transposed)[0], torch.sigmoid(transposed) * transposed)
    assert site.fallbacks == 1
    half = torch.randn(6, 10).half()  # same layout, another dtype: the kernel would write fp32
    (out,) = site(half)
    assert out.dtype == torch.float16 and site.fallbacks == 2
    close(out, torch.sigmoid(half) * half)


def test_dumped_kernels_are_readable_files_shared_by_identical_regions(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP_KERNELS", str(tmp_path / "kernels"))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([AdaLN(), AdaLN()])

        def forward(self, x, c):
            for b in self.blocks:
                x = b(x, c)
            return x

    result, _ = lowered(Two(), torch.randn(2, 3, 40), torch.randn(2, 40), library=KernelLibrary.from_env())
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert "regions.txt" in files and len(result.library) == len(files) - 1
    assert len(result.regions) == 4 and len(result.library) < 4  # both blocks use the same norm kernel
    index = (tmp_path / "kernels" / "regions.txt").read_text()
    assert "blocks.0" in index and "blocks.1" in index
    for name in files:
        if name.endswith(".py"):
            assert "@triton.jit" in (tmp_path / "kernels" / name).read_text()


def test_a_dump_folder_that_cannot_be_created_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="GRAPHOPT_DUMP_KERNELS"):
        KernelLibrary(tmp_path / "file" / "kernels")


class FakeTimer:
    """The n-th timed config takes 1/n ms: the last one timed wins."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, *, warmup, repeats):
        fn()
        self.calls += 1
        return 1.0 / self.calls


def test_a_tuned_config_is_stored_and_used_by_the_next_lowering(tmp_path):
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x), torch.randn(3, 700))
    store = TuningCache(FAKE_GPU, tmp_path)
    result = site.tune(*inputs, timer=FakeTimer(), cache=store)
    assert result.source == "tuned" and len(result.timings) >= 2 and result.config != site.default_config(*inputs)
    assert result.kernel == f"{site.kernel_name}:float32"  # timings depend on the dtype; the source does not
    assert store.get(result.kernel, site.source_hash, result.shape_bucket).best == result.config
    half_site, half = _single_region(Fn(lambda x: torch.sigmoid(x) * x), torch.randn(3, 700).half())
    assert half_site.source_hash == site.source_hash  # one source for every dtype
    assert half_site.tune(*half, timer=FakeTimer(), cache=store).kernel == f"{site.kernel_name}:float16"
    assert len(store.entries()) == 2

    captured = capture(Fn(lambda x: torch.sigmoid(x) * x).eval(), (torch.randn(3, 700),))
    again = lower(captured.graph_module, options=TuningOptions(cache=store))
    (fresh,) = [m for m in again.graph_module.modules() if isinstance(m, FusedRegion)]
    fresh(*inputs)
    assert list(fresh._chosen.values()) == [result.config] and fresh.cache_name(*inputs).endswith(":float32")


def test_tuning_times_each_config_as_a_generated_forward_runs_it(monkeypatch):
    site, inputs = _single_region(Fn(lambda x: torch.sigmoid(x) * x), torch.randn(3, 700))
    planned = []
    plan = FusedRegion.plan
    monkeypatch.setattr(FusedRegion, "plan", lambda self, config, tensors: planned.append(dict(config))
                        or plan(self, config, tensors))
    timer = FakeTimer()
    result = site.tune(*inputs, timer=lambda fn, **kw: [fn() for _ in range(3)] and timer(fn, **kw), cache=None)
    timed = [dict(t.config) for t in result.timings if not is_aten(t.config)]
    assert len(timed) >= 2 and sorted(map(str, planned)) == sorted(map(str, timed))  # one plan per config, reused


def test_self_attention_on_one_tensor_passes_it_three_times():
    result, _ = lowered(Fn(lambda x: F.scaled_dot_product_attention(x, x, x)), torch.randn(2, 2, 9, 16))
    assert [(r.kind, r.kernel) for r in result.regions] == [("attention", "attention")]


class Prologue(nn.Module):
    """A gated residual feeding a norm over 300 elements: several row steps with a masked tail."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, y, gate):
        x = x + gate.unsqueeze(1) * torch.log(y.abs() + 1)  # log: the masked lanes' padding must not leak
        return x, F.silu(self.norm(x))


@pytest.mark.parametrize("norm", [nn.LayerNorm(300), nn.RMSNorm(300)], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("config", [c for c in norm_configs() if not is_aten(c)][:3], ids=str)
def test_a_norm_with_a_prologue_in_every_row_step(norm, config):
    model = Prologue(norm).eval()
    args = (torch.randn(2, 3, 300) * 2 + 1, torch.randn(2, 3, 300), torch.randn(2, 300))
    result, captured = lowered(model, *args)
    ((site, inputs),) = call_sites(result.graph_module, captured.example_inputs)
    assert site.generated.region.kind == "norm" and len(site.generated.region.prologue()) >= 3
    for got, want in zip(site.launch(Config(config), *inputs), site.fallback(*inputs)):
        close(got, want)


def test_a_region_the_generator_cannot_handle_stays_on_aten_and_is_named(monkeypatch):
    import graphopt.autotune.lower as lower_module

    def broken(region):
        raise NotImplementedError("no code for this region")

    monkeypatch.setattr(lower_module, "generate", broken)
    result, _ = lowered(AdaLN(), torch.randn(2, 3, 40), torch.randn(2, 40))
    assert result.regions == () and len(result.declined) == 2
    assert all("kernel generation failed: NotImplementedError: no code" in reason for _, reason in result.declined)


SPLIT_CONFIGS = [c for c in norm_configs() if c.get("RSPLIT", 1) > 1]


@pytest.mark.parametrize("config", SPLIT_CONFIGS + [{"RBLOCK": 128, "RSPLIT": 2, "num_warps": 1, "num_stages": 1}],
                         ids=str)
@pytest.mark.parametrize("norm", ["group", "layer", "rms"])
def test_the_split_form_of_a_norm_with_few_long_rows(config, norm):
    """GroupNorm at batch 1 has B x groups rows: RSPLIT programs share a row through partial statistics."""
    module = {"group": nn.GroupNorm(2, 6), "layer": nn.LayerNorm((6, 23, 21)), "rms": nn.RMSNorm((6, 23, 21))}[norm]
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    model = Fn(lambda h, e: F.silu(module(h + e[:, :, None, None])))
    h = torch.randn(2, 6, 23, 21) * 3 + 5  # odd rows (1449 or 2898 elements): chunks end mid-block
    result, captured = lowered(model, h, torch.randn(2, 6))
    ((site, inputs),) = call_sites(result.graph_module, captured.example_inputs)
    for got, want in zip(site.launch(Config(config), *inputs), site.fallback(*inputs)):
        close(got, want)


def test_the_cost_model_splits_only_few_long_rows():
    site, inputs = _single_region(nn.LayerNorm(300, elementwise_affine=False), torch.randn(3, 300))
    family = [Config(c) for c in site.configs()]
    assert all(c.get("RSPLIT", 1) == 1 for c in site.prune(family, (3, 300)))       # short rows
    assert all(c.get("RSPLIT", 1) == 1 for c in site.prune(family, (4096, 4096)))   # rows enough to fill a GPU
    few_long = site.prune(family, (32, 4096))  # GroupNorm, 32 groups, batch 1
    assert few_long[0]["RSPLIT"] > 1 and is_aten(few_long[-1])
    assert any(c.get("RSPLIT", 1) == 1 and not is_aten(c) for c in few_long)  # the tuner times both forms
