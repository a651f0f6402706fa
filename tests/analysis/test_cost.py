import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphopt
from graphopt.analysis import B, analyse, evaluate, graph_cost
from graphopt.analysis.cost import einsum_flops
from tests import zoo

ZOO = ("unet", "dit", "mha", "dataclass", "kwargs")


class _Call(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, *xs):
        return self.fn(self, *xs)


def _cost(model: nn.Module, *inputs: torch.Tensor, op: str):
    """The one node of ``op`` in the captured graph, and the whole graph's cost."""
    captured = graphopt.capture(model.eval(), inputs)
    cost = graph_cost(captured.graph_module, captured.batch_symbol())
    (node,) = [c for c in cost.nodes if c.op == op]
    return node, cost


def test_linear():
    # y[B, 4, 16] = x[B, 4, 8] W^T + b: 2*64*8 multiply-adds per sample, 64 bias adds.
    node, _ = _cost(nn.Linear(8, 16), torch.randn(2, 4, 8), op="linear")
    assert node.flops == (2 * 4 * 16 * 8 + 4 * 16) * B
    # float32 reads x (32 values per sample), W (128), b (16); writes y (64 per sample).
    assert node.bytes == 4 * (32 + 64) * B + 4 * (128 + 16)


@pytest.mark.parametrize("conv, shape, per_sample", [
    # y[8, 4, 4]: 128 outputs, each 3 * 3x3 multiply-adds, plus bias.
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 8, 8), 2 * 128 * 3 * 9 + 128),
    # groups=2: each output sees 4/2 channels.
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), (4, 6, 6), 2 * 288 * 2 * 9 + 288),
    # transposed: each of the 100 inputs meets a (6/2) x 2x2 slice; y is [6, 10, 10].
    (nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (4, 5, 5), 2 * 100 * 3 * 4 + 600),
])
def test_conv(conv, shape, per_sample):
    op = "conv_transpose2d" if isinstance(conv, nn.ConvTranspose2d) else "conv2d"
    node, _ = _cost(conv, torch.randn(2, *shape), op=op)
    assert node.flops == per_sample * B


def test_sdpa():
    # q[B, 2, 5, 4], k[B, 2, 7, 4], v[B, 2, 7, 3]: M = 10 queries per sample, S = 7 keys.
    sdpa = _Call(lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v))
    node, _ = _cost(sdpa, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 3),
                    op="scaled_dot_product_attention")
    assert node.flops == (2 * 10 * 7 * 4 + 2 * 10 * 7 * 3 + 6 * 10 * 7) * B


def test_einsum():
    bmm = _Call(lambda self, a, b: torch.einsum("bij,bjk->bik", a, b))
    node, _ = _cost(bmm, torch.randn(2, 3, 5), torch.randn(2, 5, 2), op="einsum")
    assert node.flops == 2 * (3 * 5 * 2) * B
    # Broadcast dims under "..." against a weight: P = 4*3*5*2 per sample.
    proj = _Call(lambda self, x: torch.einsum("...ij,jk->...ik", x, self.w.weight), w=nn.Linear(2, 5, bias=False))
    node, _ = _cost(proj, torch.randn(2, 4, 3, 5), op="einsum")
    assert node.flops == 2 * (4 * 3 * 5 * 2) * B


def test_einsum_formula():
    assert einsum_flops("ij,jk->ik", [(3, 5), (5, 2)]) == 60
    assert einsum_flops("ij,jk", [(3, 5), (5, 2)]) == 60  # implicit output "ik"
    assert einsum_flops("ij,ij->ij", [(3, 5), (3, 5)]) == 15  # elementwise: no contraction
    assert einsum_flops("nhwc->nchw", [(2, 3, 4, 5)]) == 0  # a permutation
    assert einsum_flops("ii->", [(4, 4)]) == 4  # trace
    assert einsum_flops("bij,bjk->bik", [(B, 3, 5), (1, 5, 2)]) == 60 * B  # broadcast batch


def test_cross_check_with_torch_flop_counter():
    """Bias-free linear, conv and transposed conv against torch's own counter on the same graph."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False),
                          nn.Flatten(1), nn.Linear(4 * 16 * 16, 10, bias=False)).eval()
    captured = graphopt.capture(model, (torch.randn(3, 3, 8, 8),))
    with FlopCounterMode(display=False) as counter:
        captured.run(captured.example_inputs)
    cost = graph_cost(captured.graph_module, captured.batch_symbol())
    heavy = sum(evaluate(c.flops, 3) for c in cost.nodes if c.op in ("conv2d", "conv_transpose2d", "linear"))
    assert heavy == counter.get_total_flops()


def test_views_are_free_and_copies_move_bytes(analysed):
    _, a = analysed("dit")
    views = [c for c in a.cost.nodes if c.op in ("reshape", "permute", "transpose", "getitem", "unsqueeze", "chunk")]
    assert views and all(c.flops == 0 and c.bytes == 0 for c in views)
    (unpatchify,) = [c for c in a.cost.nodes if c.op == "einsum"]  # "nhwpqc->nchpwq": a copy
    assert unpatchify.flops == 0 and unpatchify.bytes == 2 * 4 * 128 * B  # read + write 128 floats per sample


@pytest.mark.parametrize("name", ZOO)
def test_zoo_costs_are_known_and_add_up(analysed, name):
    _, a = analysed(name)
    cost = a.cost
    assert cost.unknown == ()
    for depth in (None, 1):
        modules = cost.by_module(depth)
        assert sympy.expand(sympy.Add(*(m.flops for m in modules.values())) - cost.flops) == 0
        assert sympy.expand(sympy.Add(*(m.bytes for m in modules.values())) - cost.bytes) == 0
    assert cost.flops.free_symbols == {B}
    flops_1, bytes_1 = cost.at(1)
    assert flops_1 > 0 and bytes_1 > 0


@pytest.mark.parametrize("name", ["mha", "kwargs"])
def test_flops_scale_with_the_batch(analysed, name):
    # Every op of these models reads the batch, so FLOPs are proportional to B.
    _, a = analysed(name)
    assert evaluate(a.cost.flops, 4) == 4 * evaluate(a.cost.flops, 1)
    assert a.cost.flops.coeff(B, 0) == 0


def test_per_module_sums(analysed):
    _, a = analysed("dit")
    modules = a.cost.by_module(depth=1)
    blocks = a.cost.by_module(depth=2)
    assert sympy.expand(modules["blocks"].flops - sum(blocks[f"blocks.{i}"].flops for i in range(3))) == 0
    # The three DiT blocks are identical, so they cost the same.
    assert blocks["blocks.0"] == blocks["blocks.1"] == blocks["blocks.2"]


def test_unknown_ops_are_listed_with_zero_flops():
    model = _Call(lambda self, x: torch.sort(x, dim=-1).values * 2)
    captured = graphopt.capture(model.eval(), (torch.randn(2, 5),))
    cost = analyse(captured).cost
    assert cost.unknown == ("sort",)
    (sort,) = [c for c in cost.nodes if c.op == "sort"]
    assert sort.flops == 0 and not sort.known
    # values and int64 indices written, values read.
    assert sort.bytes == (5 * 4 + 5 * 4 + 5 * 8) * B


def test_evaluate_refuses_other_symbols():
    assert evaluate(3 * B + 1, 2) == 7
    with pytest.raises(ValueError, match="s1"):
        evaluate(B * sympy.Symbol("s1"), 2)


def test_every_input_of_the_batchs_size_counts_as_the_batch():
    model, args, _ = zoo.micro_conditioned()
    captured = graphopt.capture(model, args)
    symbols = {str(p.meta["val"].shape[0]) for p in captured.graph_module.graph.nodes if p.op == "placeholder"}
    assert len(symbols) == 2  # two batch symbols: what the cost must read as one
    cost = graph_cost(captured.graph_module, captured.batch_symbol())
    assert cost.flops.free_symbols == {B}
    assert cost.at(3)[0] == 3 * 2 * 14 * 8 + 3 * 8 + 3 * 5 * 2  # the linear and its bias, sin and cos
    opt = graphopt.optimize(model, args)  # the report's FLOPs read the cost at the example batch
    assert opt.report.passes[0].flops_before > 0
    x5 = (torch.randn(5, 4), torch.randn(5, 5))
    with torch.no_grad():
        torch.testing.assert_close(opt(*x5), model(*x5))
