"""Small graph operations shared by the layers: moving a captured graph to another device, keeping its values true."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt.analysis.graph import batch_symbol
from graphopt.fxgraph import move_to, refresh_values
from graphopt.saved import PROGRAM
from tests import zoo


class MakesTensors(nn.Module):
    """Creates a tensor on its input's device and casts its result: the exported graph names the device
    twice (``arange(device=...)``, ``_assert_tensor_metadata(device=...)``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.ones(4))

    def forward(self, x):
        return (x + torch.arange(x.shape[-1], device=x.device, dtype=torch.float32) + self.offset).to(torch.float16)


def devices_named(gm):
    return {v for n in gm.graph.nodes for v in [*n.args, *n.kwargs.values()] if isinstance(v, torch.device)}


def test_a_graph_captured_on_one_device_runs_on_another_once_moved():
    """Captured on the meta device, run on the CPU (as a graph saved on a CPU is run on a GPU)."""
    exported = torch.export.export(MakesTensors().to("meta"), (torch.randn(2, 4, device="meta"),)).module()
    assert devices_named(exported) == {torch.device("meta")}
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="device"):
        exported.to_empty(device="cpu")(x)  # the weights moved, the ops still name the meta device
    gm = torch.export.export(MakesTensors().to("meta"), (torch.randn(2, 4, device="meta"),)).module()
    gm.to_empty(device="cpu")
    gm.offset.fill_(1.0)
    assert move_to(gm, torch.device("cpu")) is gm and devices_named(gm) == {torch.device("cpu")}
    torch.testing.assert_close(gm(x), MakesTensors()(x), rtol=0, atol=0)


def test_a_saved_programs_weights_and_device_names_move_together(tmp_path):
    model, args, kwargs = zoo.ZOO["dit"]()
    folder = graphopt.save(graphopt.optimize(model, args, kwargs), tmp_path / "dit")
    gm = torch.export.load(str(folder / PROGRAM)).module()
    assert devices_named(gm) == {torch.device("cpu")}
    move_to(gm, torch.device("meta"))
    assert devices_named(gm) == {torch.device("meta")} and all(p.is_meta for p in gm.parameters())
    out = gm(*[a.to("meta") for a in args], **kwargs)
    assert out[0].is_meta


class Projects(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)

    def forward(self, x):
        return self.proj(x).view(x.shape[0], 3, 4).transpose(1, 2) * 2


def real_strides(gm, inputs):
    """Each node's strides as the graph computes them on ``inputs``."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                seen[n.name] = out.stride()
            return out

    Recorder(gm).run(*inputs)
    return seen


def test_values_downstream_of_a_rewrite_are_recomputed_with_the_strides_the_tensors_have():
    """A linear replaced by a column slice of a wider one: the view and transpose reading it keep the
    strides of the linear's output until the values are refreshed (symbolic batch kept)."""
    captured = graphopt.capture(Projects().eval(), (torch.randn(5, 8),))
    gm = captured.graph_module
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    gm.register_buffer("wide_weight", torch.randn(20, 8))
    with gm.graph.inserting_before(linear):
        weight = gm.graph.get_attr("wide_weight")
        wide = gm.graph.call_function(torch.ops.aten.linear.default, (linear.args[0], weight))
        part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (wide, 1, 4, 16))
    linear.replace_all_uses_with(part)
    gm.graph.erase_node(linear)
    gm.recompile()
    inputs = (torch.randn(5, 8),)
    before = {n.name: n.meta["val"].stride() for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    truth = real_strides(gm, inputs)
    stale = [name for name, strides in before.items() if name in truth and tuple(map(int, strides)) != truth[name]]
    assert "view" in stale  # still the (12, 1) rows of the replaced linear's output: (20, 1) really
    refresh_values(gm)
    values = {n.name: n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert {name: tuple(map(int, v.stride())) for name, v in values.items() if name in truth} == truth
    batch = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt)  # the batch is still a symbol


@pytest.mark.parametrize("factory", [zoo.unet, zoo.dit])
def test_recomputing_the_values_keeps_the_batch_a_symbol(factory):
    """Nearest upsampling's fake kernel asks about the batch; answered as a guard, that pinned the
    batch to the example's size in the shape environment, and every size read as a constant."""
    model, args, kwargs = factory()
    gm = graphopt.capture(model, args, kwargs).graph_module
    symbol = batch_symbol(gm)
    refresh_values(gm)
    refresh_values(gm, list(gm.graph.nodes))
    assert symbol is not None and batch_symbol(gm) == symbol  # not the constant 2
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert str(out.meta["val"].shape[0]) == symbol
