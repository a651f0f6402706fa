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
    assert captured.guards.batch_range() == (2, None)
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


def test_example_batch_of_one_is_tiled_for_a_dynamic_capture():
    model, (x, sigma), _ = zoo.unet()
    captured = graphopt.capture(model, (x[:1], sigma[:1]))
    assert captured.example_inputs[0].shape[0] == 2
    assert captured.guards.batch_range()[0] == 2


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
