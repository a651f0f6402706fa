import torch
from torch import nn

import graphopt
from graphopt.passes import get
from graphopt.pipeline import run_passes


class Conditioned(nn.Module):
    """Each block projects SiLU(c) with its own linear (adaLN), one without a bias; the token-wise
    linears of x and a linear read through an activation stay as they are."""

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


def test_token_wise_linears_and_linears_read_through_an_activation_are_near_misses():
    captured, reports, _ = run(Conditioned(), torch.randn(2, 5, 8), torch.randn(2, 8))
    reasons = {m.reason for m in reports[1].near_misses}
    assert "its input is not a row per sample (2-D)" in reasons  # q and k of the tokens
    assert any("aten.gelu.default" in r and "not through views alone" in r for r in reasons)


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
