import torch
from torch import nn

from tests.passes.helpers import hits, run_one


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x).relu()  # computed, never returned
        return self.used(x)


def test_dce_removes_dead_nodes_and_their_parameters():
    ops, report, captured = run_one(DeadBranch(), (torch.randn(2, 4),), "dce")
    assert ops == ["linear.default"]
    assert hits(report) == {"dead-node": 4, "dead-tensor": 2}  # linear, relu and two get_attr
    names = {n for n, _ in captured.graph_module.named_parameters()}
    assert names == {"model.used.weight", "model.used.bias"}
    assert report.notes == ("dropped 2 unused parameter/buffer tensors",)
