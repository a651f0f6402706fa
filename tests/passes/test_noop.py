import torch
import torch.nn.functional as F
from torch import nn

from tests.passes.helpers import hits, run_one


class Habits(nn.Module):
    """Python habits that export as no-ops."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(self.lin(x.float()))              # eval dropout, float() of a float
        h = h.reshape(h.shape) * 1 + 0                   # same-shape view, x*1, x+0
        h = h[:, :].permute(0, 1).transpose(1, 1) / 1.0  # full slice, identity permute/transpose, x/1
        h = h.transpose(0, 1).transpose(0, 1)            # a transpose undone
        return (1 * h).clone() - 0                      # 1*x, a copy nobody needs, x-0


def test_noop_removes_every_habit_and_keeps_outputs():
    ops, report, _ = run_one(Habits(), (torch.randn(2, 4),), "noop")
    assert ops == ["linear.default"]
    assert hits(report) == {
        "add-zero": 1, "div-by-one": 1, "eval-dropout": 1, "full-slice": 1, "identity-permute": 1,
        "identity-transpose": 1, "inverse-pair": 1, "mul-by-one": 2, "redundant-copy": 1,
        "same-shape-view": 1, "same-type-conversion": 1, "sub-zero": 1}
    assert report.near_misses == ()


class NearMisses(nn.Module):
    def forward(self, x, n):
        y = F.dropout(x, 0.5, training=True) * 0 + x    # training-mode dropout stays
        z = n * 1.0                                       # int * 1.0 promotes: must stay
        w = x.transpose(0, 1).contiguous().view(-1)       # the copy a view needs stays
        return y, z, w


def test_noop_declines_with_reasons():
    ops, report, _ = run_one_near_misses()
    assert "dropout.default" in ops and "contiguous.default" in ops and "mul.Tensor" in ops
    reasons = {m.rule: m.reason for m in report.near_misses}
    assert "training mode" in reasons["eval-dropout"]
    assert "promotes torch.int64 to torch.float32" in reasons["mul-by-one"]
    assert "not contiguous" in reasons["redundant-copy"]


def run_one_near_misses():
    from graphopt.passes import get

    import graphopt
    from graphopt.pipeline import run_passes

    captured = graphopt.capture(NearMisses().eval(), (torch.randn(2, 3), torch.tensor([1, 2])))
    [report] = run_passes(captured, [get("noop")])
    ops = [str(n.target).removeprefix("aten.") for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    return ops, report, captured
