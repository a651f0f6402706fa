"""target="cuda" on a real GPU: compiled kernels in each dtype, and tuning with CUDA events.

Run with ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/autotune``; skipped without a GPU or when
the kernels are interpreted.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import graphopt  # noqa: E402
from graphopt.autotune import TuningCache, gpu_device_key  # noqa: E402
from graphopt.autotune.model_tuning import tune_model  # noqa: E402
from tests import zoo  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted; set TRITON_INTERPRET=0"),
]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("name", ["dit", "unet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lowered_models_match_eager_in_each_dtype(name, dtype):
    model, args, kwargs = zoo.ZOO[name]()
    model = model.to("cuda", dtype)
    args = tuple(a.to("cuda", dtype) if a.is_floating_point() else a.to("cuda") for a in args)
    opt = graphopt.optimize(model, args, kwargs, target="cuda")
    assert opt.report.lowering["regions"]
    with torch.no_grad():
        got, want = opt(*args, **kwargs), model(*args, **kwargs)
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < TOLERANCE[dtype]


def _on_gpu(name):
    """A zoo model and its example call on the GPU (optimize copies a CPU model and leaves it there)."""
    model, args, kwargs = zoo.ZOO[name]()
    return model.to("cuda"), tuple(a.to("cuda") for a in args), kwargs


def test_tuning_a_lowered_model_on_the_gpu(tmp_path):
    model, args, kwargs = _on_gpu("dit")
    opt = graphopt.optimize(model, args, kwargs, target="cuda")
    store = TuningCache(gpu_device_key(), tmp_path)
    rows = tune_model(opt, [1, 4], cache=store, progress=False)
    assert rows and all(r.source == "tuned" and r.time_ms > 0 and r.configs_timed >= 1 for r in rows)

    def forbidden(fn, *, warmup, repeats):
        raise AssertionError("a tuned kernel was timed again")

    again = tune_model(opt, [1, 4], cache=store, timer=forbidden, progress=False)  # a warm start: all cached
    assert [(r.kernel, r.config) for r in again] == [(r.kernel, r.config) for r in rows]
    assert {r.source for r in again} == {"cache"}
    with torch.no_grad():  # the tuned configs still compute the model
        got, want = opt(*args, **kwargs), model(*args, **kwargs)
    assert (got - want).abs().max() < TOLERANCE[torch.float32] * want.abs().max()


def test_cuda_graphs_replay_the_lowered_model():
    model, args, kwargs = _on_gpu("dit")
    opt = graphopt.optimize(model, args, kwargs, target="cuda", cuda_graphs=True)
    assert opt.report.cuda_graphs
    for batch in (2, 3, 2):  # the second batch-2 call replays the recorded graph
        a = tuple(t[torch.arange(batch, device=t.device) % t.shape[0]] for t in args)
        with torch.no_grad():
            got, want = opt(*a, **kwargs), model(*a, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(opt._graph_runners[0]) == 2


def test_cuda_graphs_are_on_by_default_and_can_be_turned_off():
    model, args, kwargs = _on_gpu("dit")
    assert graphopt.optimize(model, args, kwargs, target="cuda").report.cuda_graphs
    off = graphopt.optimize(model, args, kwargs, target="cuda", cuda_graphs=False)
    assert not off.report.cuda_graphs and off._graph_runners is None
    assert "no CUDA graphs" in off.report.table()


def test_a_sampler_graph_replays_the_whole_loop_as_the_loop_computes_it():
    from graphopt.models import load

    ref = load("dit-digits")
    model = ref.model.to("cuda")
    opt = graphopt.optimize(model, tuple(a.to("cuda") for a in ref.example_inputs), target="cuda")
    sampler = ref.sampler.with_steps(4, "euler")
    whole = graphopt.SamplerGraph(opt, sampler)
    for seed in (0, 1):  # the second call replays the graph recorded by the first on new noise
        noise, labels = sampler.noise(6, seed).cuda(), sampler.labels(6, seed).cuda()
        with torch.no_grad():
            want = sampler.sample(model, noise, labels)
        torch.testing.assert_close(whole(noise, labels), want, atol=1e-3, rtol=1e-3)
    assert len(whole._runner) == 1 and not whole.fallbacks
    assert len(opt._graph_runners) == 0  # the module's per-call graphs were bypassed inside the loop's graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm_epilogue_candidates_on_the_gpu(dtype):
    from graphopt.autotune.cache import Config
    from graphopt.autotune.check import call_sites
    from graphopt.autotune.gemm import GemmRegion, is_template
    from tests.autotune.test_gemm import MLP

    torch.manual_seed(0)
    model = MLP(width=384, hidden=1536).to("cuda", dtype).eval()
    args = (torch.randn(16, 256, 384, device="cuda", dtype=dtype), torch.randn(16, 1, 384, device="cuda", dtype=dtype))
    opt = graphopt.optimize(model, args, target="cuda", cuda_graphs=False)
    (lowered,) = opt.lowered
    sites = [(s, a) for s, a in call_sites(lowered, opt.captured.example_inputs) if isinstance(s, GemmRegion)]
    assert len(sites) == 2
    for site, inputs in sites:
        want = site.reference(*inputs)[0].float()
        for config in site.prune([Config(c) for c in site.configs()], site.tuning_shape(*inputs)):
            got = site.launch(config, *inputs)[0].float()
            assert ((got - want).abs().max() / want.abs().max()) < TOLERANCE[dtype], dict(config)
        result = site.tune(*inputs, cache=None)
        assert result.time_ms > 0 and any(is_template(t.config) and not t.failed for t in result.timings)


def test_generated_forwards_launch_every_compiled_kernel_through_its_launcher():
    import warnings

    from graphopt.autotune.runtime import Runtime

    model, args, kwargs = _on_gpu("dit")
    opt = graphopt.optimize(model, args, kwargs, target="cuda", cuda_graphs=False)
    inputs = list(opt.captured.example_inputs)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (runtime,) = opt._runtimes
        first = runtime(inputs)  # writes the forward (and checks its direct launches)
        second = runtime(inputs)
        plain = Runtime(runtime.graph_module, direct_launch=False)
        plain(inputs)
        third = plain(inputs)
    assert not [w for w in caught if "direct launches" in str(w.message)]  # the forward's own check passed
    (forward,) = runtime.forwards
    assert forward.launches > 0 and forward.direct_launches == forward.launches
    assert plain.forwards[0].direct_launches == 0 and "_launcher(" not in plain.forwards[0].source
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        torch.testing.assert_close(c, a, atol=0, rtol=0)


def test_generated_forwards_reuse_buffers_on_the_gpu_and_compute_what_a_buffer_per_allocation_does():
    import warnings

    from graphopt.autotune.runtime import Runtime

    model, args, kwargs = _on_gpu("dit")
    opt = graphopt.optimize(model, args, kwargs, target="cuda", cuda_graphs=False)
    inputs = list(opt.captured.example_inputs)
    (runtime,) = opt._runtimes
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reusing = Runtime(runtime.graph_module)
        reusing(inputs)  # writes the forward and, on the GPU, checks it against that run
        got = reusing(inputs)
        plain = Runtime(runtime.graph_module, reuse_buffers=False)
        plain(inputs)
        want = plain(inputs)
    assert not [w for w in caught if "buffer reuse" in str(w.message)]
    assert reusing.forwards[0].buffers.reused > 0 and plain.forwards[0].buffers.reused == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_second_gpu_load_serves_from_the_forwards_the_first_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model, args, kwargs = zoo.ZOO["dit"]()
    folder = graphopt.save(graphopt.optimize(model, args, kwargs), tmp_path / "dit")
    cuda_args = tuple(a.to("cuda") for a in args)
    first = graphopt.load(folder, target="cuda")
    with torch.no_grad():
        want = first(*cuda_args, **kwargs)
    again = graphopt.load(folder, target="cuda")
    assert set(again.report.load_s) == {"files", "forwards"} and again._served is not None
    with torch.no_grad():
        got = again(*cuda_args, **kwargs)
        twice = again(*cuda_args, **kwargs)  # replayed from its CUDA graph
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(twice, want)


def test_a_served_load_without_cuda_graphs_launches_through_the_compiled_launchers(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model, args, kwargs = zoo.ZOO["dit"]()
    folder = graphopt.save(graphopt.optimize(model, args, kwargs), tmp_path / "dit")
    cuda_args = tuple(a.to("cuda") for a in args)
    with torch.no_grad():
        want = graphopt.load(folder, target="cuda", cuda_graphs=False)(*cuda_args, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = graphopt.load(folder, target="cuda", cuda_graphs=False)  # the examples' forward binds on its check
        with torch.no_grad():
            got = again(*cuda_args, **kwargs)
    assert not [w for w in caught if "kernel[grid] launches" in str(w.message)]
    assert again._served is not None and again._served.bound
    for forward in again._served.bound.values():
        assert forward.launches > 0 and forward.direct_launches == forward.launches, forward.source
    torch.testing.assert_close(got, want, atol=0, rtol=0)
