"""Small graph operations shared by the layers: moving a captured graph to another device."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt.fxgraph import move_to
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
