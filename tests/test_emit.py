import pytest
import torch
from torch import nn

import graphopt
from graphopt import InputError, SignatureError, UnknownPassError, UsageError
from tests import zoo
from tests.calls import assert_same, grow


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_optimized_module_is_a_drop_in_replacement(optimized_zoo, name):
    (model, args, kwargs), opt = optimized_zoo[name]
    if name == "mha":  # captured at batch 3
        args = (args[0][:2],)
    with torch.no_grad():
        assert_same(opt(*args, **kwargs), model(*args, **kwargs))
        big_args, big_kwargs = grow(args, 5), grow(kwargs, 5)
        assert_same(opt(*big_args, **big_kwargs), model(*big_args, **big_kwargs))
    report = opt.report
    assert [p.name for p in report.passes] == ["noop", "fold", "cse", "merge-linears", "batch-branches", "dce"]
    assert all(p.verified for p in report.passes)
    assert report.flops_after <= report.flops_before
    assert report.recaptures == 0
    assert "max abs err" in report.table()


def test_a_call_outside_the_captured_shapes_recaptures_and_is_counted(optimized_zoo):
    (model, (x, sigma), _), opt = optimized_zoo["unet"]
    before = opt.report.recaptures
    x16 = torch.randn(2, x.shape[1], 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(opt(x16, sigma), model(x16, sigma))
        torch.testing.assert_close(opt(x16[:1], sigma[:1]), model(x16[:1], sigma[:1]))  # reuses that variant
    assert opt.report.recaptures == before + 1


def test_batch_one_runs_without_recapture_also_after_save_and_load(tmp_path):
    model, (x, sigma), _ = zoo.unet()
    opt = graphopt.optimize(model, (x[:1], sigma[:1]))  # an example at batch 1
    assert opt.report.batch_range == (1, None) and "dynamic batch [1, inf]" in opt.report.table()
    loaded = graphopt.load(opt.save(tmp_path / "b1"))
    with torch.no_grad():
        for module in (opt, loaded):
            torch.testing.assert_close(module(x[:1], sigma[:1]), model(x[:1], sigma[:1]))
            torch.testing.assert_close(module(x, sigma), model(x, sigma))
            assert module.report.recaptures == 0


def test_a_changed_constant_argument_recaptures(optimized_zoo):
    (model, args, kwargs), opt = optimized_zoo["kwargs"]
    before = opt.report.recaptures
    with torch.no_grad():
        assert_same(opt(*args, cond=kwargs["cond"], scale=2.0), model(*args, cond=kwargs["cond"], scale=2.0))
        assert_same(opt(*args), model(*args))  # cond=None: another structure
    assert opt.report.recaptures == before + 2


class ThreeAtOne(nn.Module):
    """Takes another branch at batch 1: no dynamic capture from 2 can hold batch 1."""

    def forward(self, x):
        return x * 3 if x.shape[0] == 1 else x * 2


def test_an_example_at_batch_one_always_runs_at_batch_one_also_after_loading(tmp_path):
    opt = graphopt.optimize(ThreeAtOne().eval(), (torch.ones(1, 3),))
    assert opt.report.batch_range is None  # static at the example's own batch
    loaded = graphopt.load(opt.save(tmp_path / "one"))
    assert torch.equal(loaded(torch.ones(1, 3)), torch.full((1, 3), 3.0))
    opt = graphopt.optimize(ThreeAtOne().eval(), (torch.ones(2, 3),))
    assert opt.report.batch_range == (2, None)  # batch 1 out of the range, re-captured when called
    assert torch.equal(opt(torch.ones(1, 3)), torch.full((1, 3), 3.0)) and opt.report.recaptures == 1


class SqueezeAll(nn.Module):
    """``squeeze()`` drops every dim of size 1: at batch 2 an identity, at batch 1 it drops the batch."""

    def forward(self, x):
        return x.squeeze() * 2


def test_batch_one_is_left_out_of_the_range_when_the_optimized_graph_differs_there():
    model = SqueezeAll().eval()
    opt = graphopt.optimize(model, (torch.randn(2, 3),))
    x1 = torch.randn(1, 3)
    assert opt(x1).shape == model(x1).shape == (3,)
    torch.testing.assert_close(opt(x1), model(x1))
    if opt.report.batch_range[0] == 2:  # a pass removed the squeeze (an identity at the traced batch)
        assert opt.report.recaptures == 1


def test_wrong_calls_raise_clear_errors_that_name_the_callers_input(optimized_zoo, tmp_path):
    (_, (x, sigma), _), opt = optimized_zoo["unet"]
    with pytest.raises(SignatureError, match=r"forward\(x, sigma\)"):
        opt(x)
    with pytest.raises(SignatureError):
        opt(x, sigma, unknown=1)
    # re-capture runs the model, which rejects 3 channels: the error is the call's, not the examples'
    with pytest.raises(InputError, match=r"this call does not fit the model: x dim 1 is 3, expected 1 \(shape "
                                         r"\[1, inf\]x1x8x8\); the model raised RuntimeError in module 'conv_in'"):
        opt(torch.randn(2, 3, 8, 8), sigma)
    with pytest.raises(InputError, match="x has dtype float64, expected float32") as err:
        opt(x.double(), sigma)
    assert "example inputs" not in str(err.value)
    loaded = graphopt.load(opt.save(tmp_path / "u"))
    with pytest.raises(InputError, match=r"sigma has 2 dims \(2, 1\), expected 1 \(shape \[1, inf\]\)"):
        loaded(x, sigma[:, None])
    with pytest.raises(InputError, match="sigma dim 0 is 2 but x dim 0 is 3: they must match"):
        loaded(torch.randn(3, 1, 8, 8), sigma)


class TrainSensitive(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(self.conv(x)))


def test_a_training_mode_model_is_refused_up_front_and_never_changed():
    model = TrainSensitive()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"TrainSensitive is in training mode \(norm, drop\).*model.eval\(\)"):
        graphopt.optimize(model, (x,))
    opt = graphopt.optimize(model, (x,), eval_mode=True)  # optimized as in eval mode; the model stays as it was
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x12 = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        y, y12 = opt(x), opt(x12)  # a recapture runs the model as in eval mode too, and leaves it be
    assert opt.report.recaptures == 1
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(y, model.eval()(x))
        torch.testing.assert_close(y12, model(x12))


def test_optimize_rejects_bad_requests():
    model, args, _ = zoo.kwargs_model()
    with pytest.raises(UnknownPassError):
        graphopt.optimize(model, args, passes=["dce", "constant-folding"])
    with pytest.raises(UsageError, match="unknown target"):
        graphopt.optimize(model, args, target="tpu")
    with pytest.raises(InputError, match="example inputs"):
        graphopt.optimize(model, (torch.randn(2, 5, 7),))


class BatchBranch(torch.nn.Module):
    """Branches on the batch size: torch.export narrows the proven range instead of guessing."""

    def forward(self, x):
        if x.shape[0] > 3:
            return x * 2
        return x * 3


def test_a_branch_on_the_batch_size_never_gives_a_wrong_result():
    opt = graphopt.optimize(BatchBranch().eval(), (torch.ones(2, 4),))
    assert opt.report.batch_range == (1, 3)  # batch 1 takes the same branch: checked, and included
    assert torch.equal(opt(torch.ones(1, 4)), torch.full((1, 4), 3.0))
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
    for size in (1, 3):  # in the captured range: the kernels take the batch as an argument
        a, k = grow(args, size), grow(kwargs, size)
        with torch.no_grad():
            _assert_close(opt(*a, **k), model(*a, **k))
    assert opt.report.recaptures == 0 and len(opt.lowered) == 1
    if name == "unet":  # another resolution: re-captured and lowered again
        a = (torch.randn(2, args[0].shape[1], 16, 16), args[1])
        with torch.no_grad():
            _assert_close(opt(*a), model(*a))
        assert opt.report.recaptures == 1 and len(opt.lowered) == 2


def _assert_close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_saved_model_is_lowered_again_when_loaded_for_cuda(tmp_path):
    pytest.importorskip("triton")
    model, args, kwargs = zoo.ZOO["dit"]()
    graphopt.optimize(model, args, kwargs).save(tmp_path / "dit")
    loaded = graphopt.load(tmp_path / "dit", target="cuda")
    assert loaded.report.target == "cuda" and loaded.report.lowering["regions"]
    assert list(loaded.report.load_s) == ["files", "graph", "lowering"]  # where a warm start's load goes
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
