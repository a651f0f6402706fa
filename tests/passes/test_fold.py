import math

import torch
from torch import nn

from tests.passes.helpers import hits, run_one


class Embedding(nn.Module):
    """Sinusoidal frequencies and a weight transpose that depend on no input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float32) / 4)
        args = t[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return emb @ self.w.t().contiguous().t()


def test_fold_precomputes_parameter_only_subgraphs():
    ops, report, captured = run_one(Embedding(), (torch.rand(2),), "fold")
    assert "arange.start" not in ops and "arange.default" not in ops and "exp.default" not in ops
    assert "t.default" not in ops and "contiguous.default" not in ops
    # freqs[None] is folded too: one unsqueeze (of t) is left
    assert ops == ["slice.Tensor", "unsqueeze.default", "mul.Tensor", "cos.default", "sin.default",
                   "cat.default", "matmul.default"]
    assert hits(report) == {"fold-constant": 2}
    folded = dict(captured.graph_module.named_buffers())
    assert set(folded) == {"_folded_0", "_folded_1"}
    assert report.nodes_added == 2


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1))

    def forward(self, x):
        return x + self.bias.expand(512, 512)


def test_fold_leaves_values_that_would_grow_memory():
    ops, report, _ = run_one(Broadcast(), (torch.randn(2, 512, 512),), "fold")
    assert "expand.default" in ops and report.hits == 0
    assert "would store 262144 elements computed from 1" in report.near_misses[0].reason


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn(3) * 0


def test_fold_never_folds_random_ops():
    from graphopt.passes import get

    import graphopt
    from graphopt.pipeline import run_passes

    captured = graphopt.capture(Noisy().eval(), (torch.randn(2, 3),))
    [report] = run_passes(captured, [get("fold")])
    assert report.hits == 0
    assert any("randn" in str(n.target) for n in captured.graph_module.graph.nodes)
