import pytest
import torch
from torch import nn

import graphopt
from graphopt import CaptureError, InputError, SignatureError, UsageError
from tests import zoo


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_capture_reproduces_the_model_with_dynamic_batch(name):
    model, args, kwargs = zoo.ZOO[name]()
    captured = graphopt.capture(model, args, kwargs)
    outputs = captured.run(captured.example_inputs)
    for out, ref in zip(outputs, captured.reference_outputs):
        torch.testing.assert_close(out, ref)
    assert captured.guards.batch_range() == (1, None)  # batch 1 included, whatever the example batch
    # every computing node knows its shape and the module that produced it
    for node in captured.graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
            assert "graphopt_module" in node.meta
    paths = {n.meta["graphopt_module"] for n in captured.graph_module.graph.nodes if n.op == "call_function"}
    assert any(p for p in paths), "module paths were recorded"


def test_batch_is_symbolic_and_other_batches_run():
    model, (x, t, y), _ = zoo.dit()
    captured = graphopt.capture(model, (x, t, y))
    assert captured.batch_symbol() is not None
    x5, t5, y5 = torch.randn(5, 1, 8, 8), torch.rand(5), torch.randint(0, 11, (5,))
    assert captured.guards.mismatch([x5, t5, y5]) is None
    torch.testing.assert_close(captured.run([x5, t5, y5])[0], model(x5, t5, y5))


def test_example_batch_of_one_is_tiled_for_a_dynamic_capture_whose_range_keeps_one():
    model, (x, sigma), _ = zoo.unet()
    captured = graphopt.capture(model, (x[:1], sigma[:1]))
    assert captured.example_inputs[0].shape[0] == 2
    assert captured.guards.batch_range() == (1, None)
    assert captured.guards.mismatch([x[:1], sigma[:1]]) is None
    torch.testing.assert_close(captured.run([x[:1], sigma[:1]])[0], model(x[:1], sigma[:1]))


def test_an_input_whose_batch_has_a_symbol_of_its_own_takes_batch_one_too():
    """torch.export cannot tie the second input's batch to the first's (two symbols): both ranges
    start at 1 once the graph matches the model there, and ``batch_symbols`` names both."""
    model, args, _ = zoo.micro_conditioned()
    captured = graphopt.capture(model, args)
    assert len(captured.batch_symbols()) == 2
    assert {captured.guards.ranges[s] for s in captured.batch_symbols()} == {(1, None)}
    one = [a[:1] for a in args]
    assert captured.guards.mismatch(one) is None
    torch.testing.assert_close(captured.run(one)[0], model(*one))


class BranchOnOne(nn.Module):
    """Treats batch 1 differently; torch.export traces the other branch for a symbolic batch."""

    def forward(self, x):
        return x * 3 if x.shape[0] == 1 else x * 2


class ViewOnOne(nn.Module):
    def forward(self, x):
        return x.flatten() if x.shape[0] == 1 else x.view(-1, 3)


@pytest.mark.parametrize("model", [BranchOnOne(), ViewOnOne()], ids=["value", "shape"])
def test_a_model_that_treats_batch_one_differently_keeps_the_range_torch_export_proves(model):
    captured = graphopt.capture(model.eval(), (torch.randn(2, 3),))
    assert captured.guards.batch_range() == (2, None)
    assert "outside the captured range [2, inf]" in captured.guards.mismatch([torch.randn(1, 3)])


def test_capture_leaves_a_training_mode_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        graphopt.capture(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_static_capture_pins_the_batch():
    model, args, _ = zoo.mha()
    captured = graphopt.capture(model, args, dynamic_batch=False)
    assert captured.guards.batch_range() is None
    assert "dim 0" in captured.guards.mismatch([torch.randn(4, 6, 4)])


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor's value: torch.export cannot capture this
            return x * 2
        return x


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.lin(x))


def test_uncapturable_model_names_module_and_line():
    with pytest.raises(CaptureError) as info:
        graphopt.capture(DataDependent().eval(), (torch.randn(2, 4),))
    err = info.value
    assert err.module_path == "gate"
    assert "test_capture.py" in err.source and "x.sum() > 0" in err.source
    assert "torch.where" in err.hint
    assert "module 'gate'" in str(err) and len(str(err).splitlines()) == 1


class SequenceLengths(nn.Module):
    """Per-sample lengths read into Python and hashed (diffusers' Lumina2 does ``set(seq_lengths)``)."""

    def forward(self, x, mask):
        lengths = mask.sum(dim=1).tolist()
        return x * (len(set(lengths)) > 1)


def test_values_read_into_python_get_the_data_dependent_hint():
    with pytest.raises(CaptureError, match="non-nested SymInt") as info:
        graphopt.capture(SequenceLengths(), (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)))
    assert "reads a tensor's value in Python" in info.value.hint


def test_wrong_example_shape_is_an_input_error_naming_the_module():
    model, (x, sigma), _ = zoo.unet()
    with pytest.raises(InputError, match="conv_in"):
        graphopt.capture(model, (torch.randn(2, 3, 8, 8), sigma))


def test_wrong_argument_count_and_non_module():
    model, (x, sigma), _ = zoo.unet()
    with pytest.raises(SignatureError, match="forward"):
        graphopt.capture(model, (x,))
    with pytest.raises(SignatureError):
        graphopt.capture(model, (x, sigma, sigma))
    with pytest.raises(UsageError, match="nn.Module"):
        graphopt.capture(lambda x: x, (x,))
    with pytest.raises(InputError, match="no tensor"):
        graphopt.capture(nn.Identity().eval(), (3,))


def test_kwargs_and_constants_are_part_of_the_call_spec():
    model, args, kwargs = zoo.kwargs_model()
    captured = graphopt.capture(model, args, kwargs)
    assert captured.call.input_names() == ["x", "cond"]
    assert captured.call.output_names() == ["eps", "energy"]
    spec, tensors, _ = captured.call.flatten_call(args, kwargs)
    assert spec == captured.call.in_spec and len(tensors) == 2
    other, _, _ = captured.call.flatten_call(args, {**kwargs, "scale": 2.0})
    assert other != captured.call.in_spec


def test_input_guards_round_trip_through_json_and_compare_up_to_symbol_names():
    from graphopt.capture import InputGuards, TensorGuard

    guards = InputGuards((TensorGuard("float32", "cpu", ("s0", 4, 8)), TensorGuard("int64", "cpu", ("s0",))),
                         {"s0": (1, None)})
    assert InputGuards.from_json(guards.to_json()) == guards
    renamed = InputGuards((TensorGuard("float32", "cpu", ("s77", 4, 8)), TensorGuard("int64", "cpu", ("s77",))),
                          {"s77": (1, None)})
    assert renamed != guards and renamed.same_as(guards)
    narrower = InputGuards(renamed.tensors, {"s77": (2, None)})
    static = InputGuards((TensorGuard("float32", "cpu", (2, 4, 8)), TensorGuard("int64", "cpu", (2,))), {})
    assert not narrower.same_as(guards) and not static.same_as(guards)
    on_gpu = guards.on("cuda")  # a graph captured on the CPU, moved to the GPU
    assert [g.device for g in on_gpu.tensors] == ["cuda", "cuda"] and on_gpu.ranges == guards.ranges
    assert not on_gpu.same_as(guards) and on_gpu.on("cpu") == guards
