import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.passes import get
from graphopt.pipeline import run_passes
from tests.test_fxgraph import real_strides


class Conditioned(nn.Module):
    """Each block projects SiLU(c) with its own linear (adaLN), one without a bias; linears read through
    a product or an activation stay as they are."""

    def __init__(self, dim=8, blocks=3):
        super().__init__()
        self.ada = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=i != 1)) for i in range(blocks))
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x, c):
        for ada in self.ada:
            shift, scale = ada(c).chunk(2, dim=1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        q, k = self.q(x), self.k(x)
        return (q * k).sum(-1) + torch.nn.functional.gelu(self.gate(torch.nn.functional.silu(c))).sum(-1, keepdim=True)


def run(model, *args, passes=("cse", "merge-linears", "dce")):
    captured = graphopt.capture(model.eval(), args)
    reports = run_passes(captured, [get(p) for p in passes])
    linears = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    return captured, reports, linears


def test_the_linears_of_one_conditioning_vector_are_one_matmul():
    model = Conditioned()
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    captured, reports, linears = run(model, x, c)
    report = reports[1]
    assert dict(report.rule_hits) == {"shared-input": 3}
    assert len(linears) == 4  # the merged one, q, k and the gate
    merged = next(n for n in linears if str(n.args[1].target).startswith("_merged_"))
    assert tuple(merged.meta["val"].shape[1:]) == (48,)
    buffers = dict(captured.graph_module.named_buffers())
    assert torch.equal(buffers[str(merged.args[1].target)],
                       torch.cat([model.ada[i][1].weight for i in range(3)]).detach())
    assert torch.equal(buffers[str(merged.args[2].target)][16:32], torch.zeros(16))  # the bias-free linear
    assert not any("ada" in name for name, _ in captured.graph_module.named_parameters())  # dce dropped them
    for batch in (2, 5):  # the batch stays dynamic
        xb, cb = torch.randn(batch, 5, 8), torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(captured.run([xb, cb])[0], model(xb, cb), rtol=1e-5, atol=1e-6)


def test_linears_read_through_anything_but_views_or_one_activation_are_near_misses():
    captured, reports, _ = run(Conditioned(), torch.randn(2, 5, 8), torch.randn(2, 8))
    reasons = [m.reason for m in reports[1].near_misses]
    assert reasons == ["its output is read by aten.mul.Tensor, not through views or one activation"] * 2  # q, k


class Embeddings(nn.Module):
    """Each block embeds the same timestep features with an MLP of its own (diffusers' DiT): linear, SiLU,
    linear; one block uses GELU instead, one GELU's tanh form."""

    def __init__(self, dim=8, blocks=4):
        super().__init__()
        self.first = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(blocks + 2))
        self.second = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(blocks + 2))

    def forward(self, t):
        acts = [F.silu] * (len(self.first) - 2) + [F.gelu, lambda h: F.gelu(h, approximate="tanh")]
        return sum(second(act(first(t))) for first, second, act in zip(self.first, self.second, acts))


def test_linears_that_each_feed_the_same_activation_share_one_matmul_and_one_activation():
    model = Embeddings()
    captured, reports, linears = run(model, torch.randn(3, 8))
    assert dict(reports[1].rule_hits) == {"shared-input": 4}  # the four SiLU blocks; each GELU form stays apart
    assert any(note.endswith("64 output features, then silu") for note in reports[1].notes)
    ops = [n.target for n in captured.graph_module.graph.nodes]
    assert ops.count(torch.ops.aten.silu.default) == 1 and ops.count(torch.ops.aten.gelu.default) == 2
    assert len(linears) == 1 + 2 + 6  # the merged first layers, the two GELU blocks', the second layers
    for batch in (3, 5):
        t = torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(captured.run([t])[0], model(t), rtol=1e-5, atol=1e-6)


class SeparateProjections(nn.Module):
    """Attention with separate q, k, v projections of the tokens (diffusers' to_q/to_k/to_v); with
    ``flat``, the keys are also read flattened with the tokens, a view a column block cannot take."""

    def __init__(self, dim=8, heads=2, flat=False):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=i != 1) for i in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.heads, self.flat = heads, flat

    def forward(self, x):
        b, n, c = x.shape
        keys = self.to_k(x)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), keys, self.to_v(x)))
        out = self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return out + keys.view(b, n * c).mean(-1)[:, None, None] if self.flat else out


def test_token_wise_q_k_v_projections_are_one_matmul_in_their_graph_order():
    model = SeparateProjections()
    captured, reports, linears = run(model, torch.randn(2, 6, 8))
    assert dict(reports[1].rule_hits) == {"shared-input": 3} and len(linears) == 2  # q|k|v, to_out
    merged = next(n for n in linears if str(n.args[1].target).startswith("_merged_"))
    buffers = dict(captured.graph_module.named_buffers())
    assert torch.equal(buffers[str(merged.args[1].target)],  # the keys are projected first
                       torch.cat([model.to_k.weight, model.to_q.weight, model.to_v.weight]).detach())
    assert torch.equal(buffers[str(merged.args[2].target)][:8], torch.zeros(8))  # to_k has no bias
    slices = sorted((u.args[1:] for u in merged.users), key=lambda a: a[1])
    assert slices == [(2, 0, 8), (2, 8, 16), (2, 16, 24)]  # the last dimension of [B, N, 24]
    for batch in (2, 5):
        x = torch.randn(batch, 6, 8)
        with torch.no_grad():
            torch.testing.assert_close(captured.run([x])[0], model(x), rtol=1e-5, atol=1e-6)
    # the blocks' readers carry the strides they have now (the kernel generator reads them): rows of 24 columns
    gm = captured.graph_module
    truth = real_strides(gm, captured.example_inputs)
    values = {n.name: tuple(map(int, n.meta["val"].stride())) for n in gm.graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor) and n.name in truth}
    assert values == truth and (144, 24, 4, 1) in values.values()  # [B, 6, 2 heads, 4] of [B, 6, 24]


def test_a_view_a_column_block_cannot_take_becomes_a_reshape():
    """keys.view(b, n * c) holds on the key projection's own output but has no strides on columns 8:16
    of the merged one: it runs as a reshape (a copy there), at every batch."""
    model = SeparateProjections(flat=True)
    captured, reports, _ = run(model, torch.randn(2, 6, 8))
    assert reports[1].hits == 3
    ops = [n.target for n in captured.graph_module.graph.nodes]
    assert torch.ops.aten.view.default not in ops and torch.ops.aten.reshape.default in ops
    for batch in (2, 5):
        x = torch.randn(batch, 6, 8)
        with torch.no_grad():
            torch.testing.assert_close(captured.run([x])[0], model(x), rtol=1e-5, atol=1e-6)


def test_without_cse_each_blocks_own_silu_keeps_its_linear_apart():
    _, reports, linears = run(Conditioned(), torch.randn(2, 5, 8), torch.randn(2, 8), passes=("merge-linears",))
    assert reports[0].hits == 0 and len(linears) == 6


def test_a_bias_given_by_keyword_keeps_its_linear_apart():
    """aten.linear(x, w, bias=b): the merge reads biases positionally, so such a linear stays as it is."""
    model = Conditioned()
    captured = graphopt.capture(model.eval(), (torch.randn(2, 5, 8), torch.randn(2, 8)))
    gm = captured.graph_module
    ada = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and len(n.args) == 3
           and "ada" in str(n.args[1].target)]
    ada[0].kwargs = {"bias": ada[0].args[2]}
    ada[0].args = ada[0].args[:2]
    gm.recompile()
    reports = run_passes(captured, [get("cse"), get("merge-linears")])
    assert dict(reports[1].rule_hits) == {"shared-input": 2}
    assert any("given bias by keyword" in m.reason for m in reports[1].near_misses)
