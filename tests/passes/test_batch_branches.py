import torch
from torch import nn

import graphopt
from graphopt.passes import get
from graphopt.pipeline import run_passes
from tests import zoo

aten = torch.ops.aten


def run(model, args, passes=("noop", "cse", "merge-linears", "batch-branches", "dce")):
    captured = graphopt.capture(model.eval(), args)
    reports = run_passes(captured, [get(p) for p in passes])
    ops = [n.target for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    return captured, reports[passes.index("batch-branches")], ops


def assert_matches_eager(model, captured, args, batches=(2, 3)):
    for batch in batches:
        inputs = [torch.cat([a] * 2)[:batch] for a in args]
        with torch.no_grad():
            torch.testing.assert_close(captured.run(inputs)[0], model(*inputs), rtol=1e-5, atol=1e-6)


def test_the_blocks_conditioning_runs_once_for_all_blocks():
    model, args, _ = zoo.per_block_conditioning()
    captured, report, ops = run(model, args)
    hits = dict(report.rule_hits)
    assert hits["linear"] == 6 and hits["embedding"] == 3 and hits["silu"] == 3  # mlp2 and ada of 3 blocks
    assert ops.count(aten.bmm.default) == 2 and ops.count(aten.embedding.default) == 1
    assert ops.count(aten.linear.default) == 4  # the merged first MLP layer and the blocks' token projections
    assert aten.stack.default not in ops  # mlp2 reads merge-linears' column blocks as they are
    assert "batched: 2 x linear (3 branches), 1 x embedding (3 branches)" in report.notes[0]
    buffers = dict(captured.graph_module.named_buffers())
    bmm = next(n for n in captured.graph_module.graph.nodes if n.target is aten.bmm.default)
    torch.testing.assert_close(buffers[str(bmm.args[1].target)],
                               torch.stack([m.weight.detach().t() for m in model.mlp2]))
    assert not any("mlp2" in name or "table" in name for name, _ in captured.graph_module.named_parameters())
    assert_matches_eager(model, captured, args)


def test_the_token_paths_read_one_branch_of_the_batch_each():
    model, args, _ = zoo.per_block_conditioning()
    captured, _, _ = run(model, args)
    graph = captured.graph_module.graph
    selects = [n for n in graph.nodes if n.target is aten.select.int]
    assert len(selects) == 9  # shift, 1 + scale and gate of each of the 3 blocks
    assert {n.args[2] for n in selects} == {0, 1, 2}
    assert all(len(n.meta["val"].shape) == 3 for n in selects)  # (batch, 1, dim): unsqueezed once, batched


class Heads(nn.Module):
    """Independent projections of three different inputs, each through a sigmoid."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 4, bias=i != 1) for i in range(3))

    def forward(self, a, b, c):
        outs = [head(v).sigmoid() for head, v in zip(self.heads, (a, b, c))]
        return outs[0] * outs[1] - outs[2]


def test_linears_of_different_inputs_stack_them_and_share_one_matmul():
    torch.manual_seed(0)
    model, args = Heads(), tuple(torch.randn(2, 8) for _ in range(3))
    captured, report, ops = run(model, args)
    assert dict(report.rule_hits) == {"linear": 3, "sigmoid": 3}
    assert ops.count(aten.stack.default) == 1 and ops.count(aten.bmm.default) == 1
    assert aten.linear.default not in ops
    buffers = [b for name, b in captured.graph_module.named_buffers() if name.startswith("_batched_")]
    assert any(b.shape == (3, 1, 4) and not b[1].any() for b in buffers)  # the bias-free head adds zeros
    assert_matches_eager(model, captured, args)


class Stack(nn.Module):
    """Two layers of one shape, the second reading the first: no two branches to batch."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, a):
        return self.second(torch.relu(self.first(a)))


def test_a_layer_that_reads_another_is_not_its_branch():
    torch.manual_seed(0)
    model, args = Stack(), (torch.randn(2, 8),)
    captured, report, ops = run(model, args)
    assert not report.rule_hits and ops.count(aten.linear.default) == 2
    assert_matches_eager(model, captured, args)


class Uneven(nn.Module):
    """Two branches chunk alike, but only the first reads its second chunk; embeddings of different
    labels stay apart."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.e0, self.e1 = nn.Embedding(5, 4), nn.Embedding(5, 4)

    def forward(self, c0, c1, x, y0, y1):
        a0, b0 = self.l0(c0).chunk(2, 1)
        a1, _ = self.l1(c1).chunk(2, 1)
        return x * a0 + x * a1 + b0 + self.e0(y0) * self.e1(y1)


def test_a_branch_read_apart_from_the_batch_keeps_its_own_view():
    torch.manual_seed(0)
    model = Uneven()
    args = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4), torch.tensor([0, 4]), torch.tensor([2, 1]))
    captured, report, ops = run(model, args)
    hits = dict(report.rule_hits)
    assert hits["linear"] == 2 and hits["chunk"] == 2 and hits["getitem"] == 2 and "embedding" not in hits
    assert ops.count(aten.chunk.default) == 2  # the batched one, and branch 0's for its second chunk
    assert ops.count(aten.embedding.default) == 2
    for batch in (2, 3):
        inputs = [torch.cat([a] * 2)[:batch] for a in args]
        with torch.no_grad():
            torch.testing.assert_close(captured.run(inputs)[0], model(*inputs), rtol=1e-5, atol=1e-6)


def test_the_default_pipeline_batches_and_verifies():
    model, args, _ = zoo.per_block_conditioning()
    opt = graphopt.optimize(model, args)
    report = next(p for p in opt.report.passes if p.name == "batch-branches")
    assert report.hits and report.tolerance
    with torch.no_grad():
        torch.testing.assert_close(opt(*args), model(*args), rtol=1e-5, atol=1e-6)


class Partial(nn.Module):
    """Three branches chunk alike; the first reads only its second chunk, the others only their first."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, a, b, c, x):
        parts = [head(v).chunk(2, 1) for head, v in zip(self.heads, (a, b, c))]
        return x * parts[0][1] + x * parts[1][0].exp() + parts[2][0].exp()


def test_some_branches_of_a_list_batch_read_from_their_own_views():
    """A slice of a batch of lists (chunks) is no batch: the getitems of two of three chunks stay apart."""
    torch.manual_seed(0)
    model = Partial()
    args = (*(torch.randn(2, 8) for _ in range(3)), torch.randn(2, 4))
    captured, report, ops = run(model, args)
    hits = dict(report.rule_hits)
    assert hits["linear"] == 3 and hits["chunk"] == 3 and "getitem" not in hits
    assert_matches_eager(model, captured, args)
