import dataclasses
import json
import os

import pytest
import torch

import graphopt
from graphopt import InputError, LoadError, OutputPathError, SignatureError, UnknownPassError, UsageError
from tests import zoo


def _assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _assert_same(got[k], want[k])
    elif dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            _assert_same(getattr(got, f.name), getattr(want, f.name))
    else:
        assert got == want


def _grow(value, size):
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 2:
        return torch.cat([value] * size)[:size] if size > 2 else value[:size]
    if isinstance(value, dict):
        return {k: _grow(v, size) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_grow(v, size) for v in value)
    return value


@pytest.fixture(scope="module")
def optimized_zoo():
    return {name: (factory(), graphopt.optimize(*factory())) for name, factory in zoo.ZOO.items()}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_optimized_module_is_a_drop_in_replacement(optimized_zoo, name):
    (model, args, kwargs), opt = optimized_zoo[name]
    if name == "mha":  # captured at batch 3
        args = (args[0][:2],)
    with torch.no_grad():
        _assert_same(opt(*args, **kwargs), model(*args, **kwargs))
        big_args, big_kwargs = _grow(args, 5), _grow(kwargs, 5)
        _assert_same(opt(*big_args, **big_kwargs), model(*big_args, **big_kwargs))
    report = opt.report
    assert [p.name for p in report.passes] == ["noop", "fold", "dce"]
    assert all(p.verified for p in report.passes)
    assert report.flops_after <= report.flops_before
    assert report.recaptures == 0
    assert "max abs err" in report.table()


def test_a_call_outside_the_range_recaptures_and_is_counted(optimized_zoo):
    (model, (x, sigma), _), opt = optimized_zoo["unet"]
    with torch.no_grad():
        torch.testing.assert_close(opt(x[:1], sigma[:1]), model(x[:1], sigma[:1]))
        torch.testing.assert_close(opt(x[1:], sigma[1:]), model(x[1:], sigma[1:]))  # reuses the batch-1 variant
    assert opt.report.recaptures == 1


def test_a_changed_constant_argument_recaptures(optimized_zoo):
    (model, args, kwargs), opt = optimized_zoo["kwargs"]
    before = opt.report.recaptures
    with torch.no_grad():
        _assert_same(opt(*args, cond=kwargs["cond"], scale=2.0), model(*args, cond=kwargs["cond"], scale=2.0))
        _assert_same(opt(*args), model(*args))  # cond=None: another structure
    assert opt.report.recaptures == before + 2


def test_wrong_calls_raise_clear_errors(optimized_zoo):
    (_, (x, sigma), _), opt = optimized_zoo["unet"]
    with pytest.raises(SignatureError, match=r"forward\(x, sigma\)"):
        opt(x)
    with pytest.raises(SignatureError):
        opt(x, sigma, unknown=1)
    with pytest.raises(InputError, match="conv_in"):  # re-capture runs the model, which rejects 3 channels
        opt(torch.randn(2, 3, 8, 8), sigma)


def test_optimize_rejects_bad_requests():
    model, args, _ = zoo.kwargs_model()
    with pytest.raises(UnknownPassError):
        graphopt.optimize(model, args, passes=["dce", "constant-folding"])
    with pytest.raises(UsageError, match="unknown target"):
        graphopt.optimize(model, args, target="tpu")
    with pytest.raises(InputError, match="example inputs"):
        graphopt.optimize(model, (torch.randn(2, 5, 7),))


# ------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_save_and_load_round_trip(optimized_zoo, tmp_path, name):
    (model, args, kwargs), opt = optimized_zoo[name]
    path = opt.save(tmp_path / "saved")
    assert sorted(p.name for p in path.iterdir()) == ["examples.safetensors", "graphopt.json", "model.pt2",
                                                      "report.json"]
    loaded = graphopt.load(path)
    with torch.no_grad():
        _assert_same(loaded(*args, **kwargs), opt(*args, **kwargs))
        big_args, big_kwargs = _grow(args, 4), _grow(kwargs, 4)
        _assert_same(loaded(*big_args, **big_kwargs), model(*big_args, **big_kwargs))
    assert [p.name for p in loaded.report.passes] == [p.name for p in opt.report.passes]
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp directories left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's owner-only mode


def test_a_loaded_module_retraces_its_graph_for_new_shapes_but_cannot_recapture(optimized_zoo, tmp_path):
    (model, (x, sigma), _), opt = optimized_zoo["unet"]
    loaded = graphopt.load(opt.save(tmp_path / "m"))
    with torch.no_grad():  # batch 1 is outside the dynamic range: the saved graph is traced again for it
        torch.testing.assert_close(loaded(x[:1], sigma[:1]), model(x[:1], sigma[:1]))
    assert loaded.report.recaptures == 1
    (_, args, kwargs), opt = optimized_zoo["kwargs"]
    loaded = graphopt.load(opt.save(tmp_path / "k"))
    with pytest.raises(InputError, match="cannot re-capture"):  # another constant needs the Python model
        loaded(*args, cond=kwargs["cond"], scale=3.0)


def test_save_never_leaves_a_partial_directory(optimized_zoo, tmp_path, monkeypatch):
    _, opt = optimized_zoo["kwargs"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="already exists"):
        opt.save(existing)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputPathError, match="does not exist"):
        opt.save(tmp_path / "missing" / "m")

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        opt.save(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        opt.save(existing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (existing / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    opt.save(existing, overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "graphopt.json").is_file()


@pytest.fixture(scope="module")
def saved(optimized_zoo, tmp_path_factory):
    _, opt = optimized_zoo["dataclass"]
    return opt.save(tmp_path_factory.mktemp("saved") / "model")


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_load_reports_missing_and_foreign_directories(saved, tmp_path):
    with pytest.raises(LoadError, match="not a directory saved by graphopt"):
        graphopt.load(tmp_path / "nothing")
    with pytest.raises(LoadError, match="graphopt.json is missing"):
        graphopt.load(tmp_path)
    copy = _copy(saved, tmp_path)
    os.remove(copy / "examples.safetensors")
    with pytest.raises(LoadError, match="incomplete: examples.safetensors is missing"):
        graphopt.load(copy)


def test_load_reports_corrupted_metadata(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "graphopt.json").write_text("{not json")
    with pytest.raises(LoadError, match="graphopt.json is corrupted"):
        graphopt.load(copy)
    meta = json.loads((saved / "graphopt.json").read_text())
    (copy / "graphopt.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LoadError, match="format version 99"):
        graphopt.load(copy)
    (copy / "graphopt.json").write_text(json.dumps({**meta, "in_spec": {"kind": "dict"}}))
    with pytest.raises(LoadError, match="inconsistent metadata"):
        graphopt.load(copy)


def test_load_reports_truncated_program_and_damaged_weights(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    data = (copy / "model.pt2").read_bytes()
    (copy / "model.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="model.pt2 is corrupted or truncated"):
        graphopt.load(copy)
    (copy / "model.pt2").write_bytes(data)
    examples = (copy / "examples.safetensors").read_bytes()
    (copy / "examples.safetensors").write_bytes(examples[:100])
    with pytest.raises(LoadError, match="examples.safetensors is corrupted"):
        graphopt.load(copy)

    # the recorded outputs no longer match what the program computes: caught at load
    import safetensors.torch

    (copy / "examples.safetensors").write_bytes(examples)
    tensors = safetensors.torch.load_file(str(copy / "examples.safetensors"))
    tensors["output_0"] = tensors["output_0"] + 1
    safetensors.torch.save_file(tensors, str(copy / "examples.safetensors"))
    with pytest.raises(LoadError, match="does not reproduce its saved outputs"):
        graphopt.load(copy)
    assert graphopt.load(copy, verify=False) is not None


class BatchBranch(torch.nn.Module):
    """Branches on the batch size: torch.export narrows the proven range instead of guessing."""

    def forward(self, x):
        if x.shape[0] > 3:
            return x * 2
        return x * 3


def test_a_branch_on_the_batch_size_never_gives_a_wrong_result():
    opt = graphopt.optimize(BatchBranch().eval(), (torch.ones(2, 4),))
    assert opt.report.batch_range == (2, 3)
    assert torch.equal(opt(torch.ones(3, 4)), torch.full((3, 4), 3.0))
    assert opt.report.recaptures == 0
    assert torch.equal(opt(torch.ones(5, 4)), torch.full((5, 4), 2.0))
    assert opt.report.recaptures == 1


# ------------------------------------------------------------------ target="cuda": lowered onto Triton kernels
# Under TRITON_INTERPRET=1 (the suite's default) the kernels run in Triton's interpreter on the CPU.


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_target_cuda_lowers_and_matches_eager_at_other_batches(name):
    pytest.importorskip("triton")
    model, args, kwargs = zoo.ZOO[name]()
    opt = graphopt.optimize(model, args, kwargs, target="cuda")
    lowering = opt.report.lowering
    assert lowering is not None and lowering["kernels"] >= 3 and lowering["max_abs_error"] < 1e-4
    kinds = {r["kind"] for r in lowering["regions"]}
    assert {"norm", "pointwise"} <= kinds and ("attention" in kinds) == (name == "dit")
    assert "lower: " in opt.report.table()
    for size in (1, 3):  # 1 is outside the captured range: re-captured and lowered again
        a, k = _grow(args, size), _grow(kwargs, size)
        with torch.no_grad():
            _assert_close(opt(*a, **k), model(*a, **k))
    assert opt.report.recaptures == 1 and len(opt.lowered) == 2


def _assert_close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_saved_model_is_lowered_again_when_loaded_for_cuda(tmp_path):
    pytest.importorskip("triton")
    model, args, kwargs = zoo.ZOO["dit"]()
    graphopt.optimize(model, args, kwargs).save(tmp_path / "dit")
    loaded = graphopt.load(tmp_path / "dit", target="cuda")
    assert loaded.report.target == "cuda" and loaded.report.lowering["regions"]
    with torch.no_grad():
        _assert_close(loaded(*args, **kwargs), model(*args, **kwargs))
    with pytest.raises(UsageError, match="unknown target"):
        graphopt.load(tmp_path / "dit", target="gpu")


def test_target_cuda_without_a_gpu_or_the_interpreter_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, args, kwargs = zoo.ZOO["dit"]()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no CUDA device"):
        graphopt.optimize(model, args, kwargs, target="cuda")


def test_cuda_graphs_need_the_cuda_target_and_a_gpu():
    model, args, kwargs = zoo.ZOO["dit"]()
    with pytest.raises(UsageError, match="cuda_graphs=True needs target='cuda'"):
        graphopt.optimize(model, args, kwargs, cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="a CUDA GPU"):
            graphopt.optimize(model, args, kwargs, target="cuda", cuda_graphs=True)
