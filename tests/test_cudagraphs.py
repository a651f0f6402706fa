"""CUDA graphs: what runs without a GPU (errors, the fallback, the bypass); replay is in tests/autotune's GPU tests."""

import warnings

import pytest
import torch

import graphopt
from graphopt.cudagraphs import CudaGraphRunner, SamplerGraph, _Recorded, direct_launches
from graphopt.errors import UsageError
from graphopt.models import load


def test_a_layout_whose_recording_fails_runs_directly_with_one_warning(monkeypatch):
    calls = []

    def fn(x):
        calls.append(x.shape)
        return (x * 2,)

    runner = CudaGraphRunner(fn)
    monkeypatch.setattr(runner, "_record", lambda tensors: (_ for _ in ()).throw(
        RuntimeError("operation not permitted when stream is capturing\nmore")))
    x = torch.arange(6.0).reshape(2, 3)
    with pytest.warns(UserWarning, match=r"no CUDA graph for inputs \(float32\[2, 3\]\): recording failed: "
                                         r"operation not permitted when stream is capturing; these calls launch"):
        (out,) = runner([x])
    torch.testing.assert_close(out, x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layout is known now: no second warning, no second attempt
        (again,) = runner([x + 1])
    torch.testing.assert_close(again, (x + 1) * 2)
    assert len(runner) == 0
    assert list(runner.fallbacks.values()) == ["recording failed: operation not permitted when stream is capturing"]
    assert len(calls) == 2


def test_layouts_beyond_max_graphs_run_directly(monkeypatch):
    class Replayable:
        def replay(self):
            pass

    runner = CudaGraphRunner(lambda x: (x + 1,), max_graphs=2)
    monkeypatch.setattr(runner, "_record", lambda tensors: _Recorded(Replayable(), [t.clone() for t in tensors],
                                                                     (tensors[0] + 1,)))
    for n in (1, 2):
        runner([torch.zeros(n)])
    with pytest.warns(UserWarning, match=r"no CUDA graph for inputs \(float32\[3\]\): 2 input layouts are "
                                         r"recorded already \(max_graphs\)"):
        (out,) = runner([torch.zeros(3)])
    torch.testing.assert_close(out, torch.ones(3))
    assert len(runner) == 2 and len(runner.fallbacks) == 1


def test_inputs_off_the_gpu_are_a_usage_error_not_a_fallback():
    runner = CudaGraphRunner(lambda x: (x,))
    with pytest.raises(UsageError, match="CUDA graphs need every input on the GPU"):
        runner([torch.ones(2)])
    assert not runner.fallbacks and len(runner) == 0


def test_a_sampler_graph_refuses_what_it_cannot_record():
    ref = load("dit-digits")
    with pytest.raises(UsageError, match="expected a sampler with sample"):
        SamplerGraph(ref.model, object())
    whole = SamplerGraph(ref.model, ref.sampler)
    noise = ref.sampler.noise(2, 0)
    with pytest.raises(UsageError, match="noise \\(and labels\\) must be CUDA tensors"):
        whole(noise, ref.sampler.labels(2, 0))
    assert len(whole._runner) == 0 and not whole.fallbacks


def test_direct_launches_bypass_a_module_s_per_call_graphs_and_restore_them():
    class Graphed:
        _graph_runners = ["runner"]

    module = Graphed()
    with pytest.raises(RuntimeError):
        with direct_launches(module):
            assert module._graph_runners is None
            raise RuntimeError("the loop failed")
    assert module._graph_runners == ["runner"]
    plain = torch.nn.Linear(2, 2)
    with direct_launches(plain):  # any other model is left alone
        assert not hasattr(plain, "_graph_runners")


def test_without_a_gpu_the_cuda_target_launches_directly_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("on a GPU target='cuda' records CUDA graphs (tests/autotune/test_lower_gpu.py)")
    pytest.importorskip("triton")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    opt = graphopt.optimize(model, (torch.randn(2, 8),), target="cuda")
    assert not opt.report.cuda_graphs and opt._graph_runners is None
    assert "lower: kernels launched directly, no CUDA graphs" in opt.report.table()


def test_cuda_graphs_on_request_without_a_gpu_are_refused_by_optimize_and_load(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = torch.nn.Linear(4, 4).eval()
    opt = graphopt.optimize(model, (torch.randn(2, 4),))
    opt.save(tmp_path / "model")
    with pytest.raises(UsageError, match="cuda_graphs=True needs target='cuda' and a CUDA GPU"):
        graphopt.optimize(model, (torch.randn(2, 4),), cuda_graphs=True)
    with pytest.raises(UsageError, match="cuda_graphs=True needs target='cuda' and a CUDA GPU"):
        graphopt.load(tmp_path / "model", cuda_graphs=True)
    assert graphopt.load(tmp_path / "model", cuda_graphs=False)._graph_runners is None  # off: a plain load


def test_a_runner_records_again_when_what_it_recorded_went_stale(monkeypatch):
    class Replayable:
        def replay(self):
            pass

    tuned = [False]
    recordings = []
    runner = CudaGraphRunner(lambda x: (x + 1,), stale=lambda: tuned[0])

    def record(tensors):
        recordings.append(1)
        tuned[0] = False  # recording runs the function, which picks up the new configs
        return _Recorded(Replayable(), [t.clone() for t in tensors], (tensors[0] + 1,))

    monkeypatch.setattr(runner, "_record", record)
    for _ in range(2):
        runner([torch.zeros(2)])
    assert len(recordings) == 1
    tuned[0] = True  # a call site was tuned: the graph replays the old configs
    runner([torch.zeros(2)])
    runner([torch.zeros(2)])
    assert len(recordings) == 2 and len(runner) == 1


def test_moving_an_optimized_module_drops_its_recorded_graphs():
    model, sampler, (x, t, labels) = load("dit-digits")
    opt = graphopt.optimize(model, (x[:2], t[:2], labels[:2]))
    opt._graph_runners = ["a runner holding the old parameters"]
    opt.to(torch.float64)
    assert opt._graph_runners == []
    opt._graph_runners = None  # off stays off
    opt.to(torch.float32)
    assert opt._graph_runners is None
