import torch
from torch import nn

from tests.passes.helpers import hits, run_one


class Repeated(nn.Module):
    """The same SiLU applied by two modules, and a chain written twice."""

    def __init__(self):
        super().__init__()
        self.act_a, self.act_b = nn.SiLU(), nn.SiLU()

    def forward(self, x, c):
        a = self.act_a(c) + self.act_b(c)
        return (x * 2 + 1) * (x * 2 + 1) + a.sum()


def test_cse_computes_each_repeated_value_once():
    ops, report, _ = run_one(Repeated(), (torch.randn(2, 3), torch.randn(2, 4)), "cse")
    assert ops.count("silu.default") == 1 and ops.count("mul.Tensor") == 2 and ops.count("add.Tensor") == 3
    assert hits(report) == {"repeated-value": 3}  # a silu, a mul and an add


class Typed(nn.Module):
    """1 and 1.0 compare equal but promote differently."""

    def forward(self, x):
        n = x.int()
        return (n * 1).float() + n * 1.0


def test_cse_keeps_differently_typed_constants_apart():
    ops, report, _ = run_one(Typed(), (torch.randn(2, 3) * 4,), "cse")
    assert ops.count("mul.Tensor") == 2 and report.hits == 0


class Noisy(nn.Module):
    def forward(self, x):
        return torch.rand_like(x) - torch.rand_like(x)


def test_cse_keeps_each_random_draw_its_own():
    import graphopt
    from graphopt.passes import get
    from graphopt.pipeline import PassContext

    gm = graphopt.capture(Noisy().eval(), (torch.randn(2, 3),)).graph_module  # not verifiable: random
    ctx = PassContext("cse", gm)
    get("cse").transform(gm, ctx)
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.rand_like.default") == 2 and not ctx.hits


class PerBlockFrequencies(nn.Module):
    """Each block builds the same sinusoidal frequencies itself (diffusers' DiT embeds the timestep in every
    block); one block's are written with a negative zero, which is a different constant."""

    def forward(self, t):
        outs = []
        for sign in (1.0, 1.0, 1.0, -1.0):
            freqs = torch.exp(-9.2 * torch.arange(4, dtype=torch.float32) / 4) * sign
            arg = t[:, None] * (freqs * 0.0 if sign < 0 else freqs)
            outs.append(torch.cat([torch.sin(arg), torch.cos(arg)], -1))
        return torch.stack(outs).sum(0)


def test_constants_folded_per_block_are_stored_once_and_the_chains_reading_them_computed_once():
    from graphopt.passes import get
    from graphopt.pipeline import run_passes

    import graphopt

    captured = graphopt.capture(PerBlockFrequencies().eval(), (torch.rand(2),))
    fold, cse = run_passes(captured, [get("fold"), get("cse")])
    gm = captured.graph_module
    folded = sorted(name for name, _ in gm.named_buffers() if name.startswith("_folded_"))
    assert len(folded) == 2  # the frequencies, and the block whose zeros are -0.0
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.sin.default) == 2 and ops.count(torch.ops.aten.cat.default) == 2
    assert sum(n.op == "get_attr" for n in gm.graph.nodes) == 2
    t = torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(captured.run([t])[0], PerBlockFrequencies()(t), rtol=0, atol=0)
