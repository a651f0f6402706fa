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


class ShapeHabits(nn.Module):
    """Shape ops that keep their input's shape, as models write them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):                                          # x: (batch, 3, 4), batch in [2, inf]
        h = self.lin(x).squeeze(1).squeeze().squeeze((1, 2))       # no dim of size 1
        h = h.squeeze(0)                                           # the batch: never 1 in the captured range
        h = h.view_as(x).reshape_as(x).expand_as(x).unflatten(1, (3,)).view(torch.float32).flatten(1, 1)
        h = h.narrow(1, 0, 3)[: h.shape[0], -3:]                   # full ranges, one of them symbolic
        h = h.swapaxes(2, 2).movedim(1, 1).movedim((0, 2), (0, 2))
        h = h.split(3, dim=1)[0] + h.chunk(1, dim=0)[0]
        h = torch.cat([h], dim=1).repeat(1, 1, 1).tile((1,))
        pad = (2 - h.shape[-1] % 2) % 2                            # pad to an even width: 0 here
        return F.pad(h, (0, pad)) * 2


def test_noop_removes_shape_ops_that_keep_the_shape():
    ops, report, _ = run_one(ShapeHabits(), (torch.randn(2, 3, 4),), "noop")
    assert ops == ["linear.default", "add.Tensor", "mul.Tensor"]
    assert hits(report) == {
        "non-unit-squeeze": 4, "same-shape-view": 6, "full-slice": 3, "identity-transpose": 1,
        "identity-movedim": 2, "whole-split": 2, "single-cat": 1, "unit-repeat": 2, "zero-pad": 1}
    assert report.near_misses == ()


class ShapeNearMisses(nn.Module):
    """Shape ops that keep the shape for the example, or keep it but not the values."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(3, 4))

    def forward(self, x):                                          # x: (batch, 3, 4), captured at batch 4
        half = x[: x.shape[0] // 2].squeeze(0)                     # size batch // 2: 1 at batch 2 and 3
        found = (x[0] > 3).nonzero().squeeze(0)                    # (count, 2): count is data, may be 1
        ones = x[:, :1].squeeze(1)                                 # a real squeeze
        square = x[:, :, :3].transpose(1, 2)                       # (3, 3): same shape, values moved
        shifted = F.pad(x, (-1, 1))                                # same shape, values moved
        return half * 2, found * 2, ones * 2, square * 2, shifted * 2, torch.cat([x]), self.table.clone()


def test_noop_keeps_shape_ops_that_can_change_something():
    ops, report, captured = run_one(ShapeNearMisses(), (torch.randn(4, 3, 4),), "noop")
    assert ops.count("squeeze.dim") == 3 and "transpose.int" in ops and "pad.default" in ops
    assert "cat.default" in ops and "clone.default" in ops
    squeezes = sorted(m.reason for m in report.near_misses if m.rule == "non-unit-squeeze")
    assert len(squeezes) == 2 and all(r.startswith("dim 0 has size") for r in squeezes)
    assert "in [1, inf] over the captured range" in squeezes[0]  # batch // 2
    assert "in [0, 12] over the captured range" in squeezes[1]  # the count
    reasons = {m.rule: m.reason for m in report.near_misses}
    assert set(reasons) == {"non-unit-squeeze", "single-cat", "redundant-copy"}
    assert "alias the input" in reasons["single-cat"]
    assert "parameter or buffer" in reasons["redundant-copy"]
    # one match: the kept squeeze drops the count's dim, as the model does
    x = torch.full((4, 3, 4), -1.0)
    x[0, 1, 2] = 5.0
    with torch.no_grad():
        assert captured.run([x])[1].shape == ShapeNearMisses()(x)[1].shape == (2,)
