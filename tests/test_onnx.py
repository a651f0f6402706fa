import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import OnnxExportError, OnnxParityError, OutputPathError, UsageError
from graphopt.verify import compare
from tests import zoo


@pytest.fixture(scope="module")
def optimized(optimized_zoo):
    return {name: opt for name, (_, opt) in optimized_zoo.items()}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_onnx_round_trip_with_dynamic_batch(optimized, tmp_path, name):
    opt = optimized[name]
    path = tmp_path / f"{name}.onnx"
    report = graphopt.export_onnx(opt, path)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert report.max_abs_error < 1e-4 and len(report.batch_sizes) == 2
    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input]
    assert inputs == list(opt.captured.call.input_names())
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch axis is symbolic in the ONNX graph"


def test_parity_grows_every_input_of_the_batch(tmp_path):
    """The second batch size is fed to each input whose batch has a symbol of its own too."""
    model, args, _ = zoo.micro_conditioned()
    report = graphopt.export_onnx(graphopt.optimize(model, args), tmp_path / "micro.onnx")
    assert report.batch_sizes == (3, 4) and report.max_abs_error < 1e-5


def test_plain_module_exports_without_passes(tmp_path):
    model, args, kwargs = zoo.kwargs_model()
    report = graphopt.export_onnx(model, tmp_path / "plain.onnx", args, kwargs)
    assert report.inputs == ("x", "cond") and report.outputs == ("eps", "energy")
    with pytest.raises(UsageError, match="needs example args"):
        graphopt.export_onnx(model, tmp_path / "other.onnx")


def test_unwritable_paths_fail_before_any_work(optimized, tmp_path):
    opt = optimized["kwargs"]
    with pytest.raises(OutputPathError, match="does not exist"):
        graphopt.export_onnx(opt, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(OutputPathError, match="is a directory"):
        graphopt.export_onnx(opt, tmp_path)
    (tmp_path / "m.onnx").write_text("old")
    with pytest.raises(OutputPathError, match="already exists"):
        graphopt.export_onnx(opt, tmp_path / "m.onnx", overwrite=False)
    assert (tmp_path / "m.onnx").read_text() == "old"


def test_parity_failure_is_clear_and_leaves_no_file(optimized, tmp_path):
    with pytest.raises(OnnxParityError, match="onnxruntime .* disagrees with torch"):
        graphopt.export_onnx(optimized["dit"], tmp_path / "m.onnx", atol=-1.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


class GuardedDivision(nn.Module):
    """A division guarded by an epsilon whose denominator is exactly zero for the first sample (Sana's
    linear attention normalises so): 0 / (0 + 1e-15) = 0, where 0 / 0 would be NaN."""

    def forward(self, x):
        q = torch.relu(x)
        return q / (q.sum(-1, keepdim=True) + 1e-15)


def test_an_epsilon_guarded_division_exports_with_parity(tmp_path):
    """onnxscript's optimizer (0.7) drops x + c for |c| < 1e-8 as an add of zero (0 / 0: NaN here);
    graphopt keeps the export without the optimizer when its file leaves the parity tolerance."""
    x = torch.stack([-torch.rand(4), torch.rand(4)])  # the first row's ReLU is all zero
    report = graphopt.export_onnx(GuardedDivision(), tmp_path / "m.onnx", (x,))
    assert report.max_abs_error < 1e-6 and (tmp_path / "m.onnx").is_file()
    assert report.graph_optimized or "without onnxscript's graph optimizer" in report.line()


def _parity_failing_first(monkeypatch, failures: int) -> list[bool]:
    """``_parity`` reporting a disagreement on its first ``failures`` calls; returns the calls' outcomes."""
    real, calls = graphopt.onnx._parity, []

    def parity(*args, **kwargs):
        provider, cmp, sizes = real(*args, **kwargs)
        if len(calls) < failures:
            cmp = compare([torch.ones(1)], [torch.zeros(1)])
        calls.append(cmp.within)
        return provider, cmp, sizes

    monkeypatch.setattr(graphopt.onnx, "_parity", parity)
    return calls


def test_an_optimized_file_that_disagrees_is_exported_again_without_the_optimizer(optimized, tmp_path, monkeypatch):
    calls = _parity_failing_first(monkeypatch, 1)
    report = graphopt.export_onnx(optimized["kwargs"], tmp_path / "m.onnx")
    assert calls == [False, True] and not report.graph_optimized
    assert "without onnxscript's graph optimizer" in report.line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_file_that_disagrees_both_ways_is_an_error_that_leaves_no_file(optimized, tmp_path, monkeypatch):
    _parity_failing_first(monkeypatch, 2)
    with pytest.raises(OnnxParityError, match="disagrees with torch.*; without onnxscript's graph optimizer: max abs"):
        graphopt.export_onnx(optimized["kwargs"], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_output_named_like_an_input_gets_a_distinct_onnx_name(optimized, tmp_path):
    report = graphopt.export_onnx(optimized["dataclass"], tmp_path / "m.onnx")
    assert report.inputs == ("sample", "timestep")
    assert report.outputs == ("out_sample", "log_variance")


def test_a_plain_module_onnx_rejects_is_exported_once_optimized(tmp_path):
    model, args, kwargs = zoo.pixart()  # squeeze(1) of 16 tokens: an identity in torch, invalid in ONNX
    with pytest.raises(OnnxExportError, match="Squeeze.*export graphopt.optimize"):
        graphopt.export_onnx(model, tmp_path / "raw.onnx", args, kwargs)
    assert not (tmp_path / "raw.onnx").exists()
    report = graphopt.export_onnx(graphopt.optimize(model, args, kwargs), tmp_path / "opt.onnx")
    assert report.max_abs_error < 1e-4


@pytest.mark.parametrize("name", sorted(zoo.DIFFUSERS))
def test_diffusers_own_denoisers_export_with_parity(tmp_path, name):
    pytest.importorskip("diffusers")
    model, args, kwargs = zoo.diffusers_model(name)
    report = graphopt.export_onnx(graphopt.optimize(model, args, kwargs), tmp_path / f"{name}.onnx")
    assert report.max_abs_error < 1e-4 and len(report.batch_sizes) == 2
