import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.analysis import analyse, to_networkx


def _module(captured: graphopt.CapturedGraph, name: str) -> str:
    return next(n for n in captured.graph_module.graph.nodes if n.name == name).meta["graphopt_module"]


def _op(captured: graphopt.CapturedGraph, name: str) -> str:
    node = next(n for n in captured.graph_module.graph.nodes if n.name == name)
    return node.op if node.op != "call_function" else str(node.target).split(".")[1]


def _chained(blocks) -> bool:
    return all(a.exit == b.entry for a, b in zip(blocks, blocks[1:]))


def _on_decoder_side(captured: graphopt.CapturedGraph, edge) -> bool:
    """The join reads the source next to a tensor computed from it: the decoder side of the net."""
    g = to_networkx(captured.graph_module)
    return {edge.source, edge.main} <= set(g.predecessors(edge.join)) and edge.source in nx.ancestors(g, edge.main)


# ---------------------------------------------------------------- the zoo


def test_unet_blocks(analysed):
    captured, a = analysed("unet")
    b = captured.batch_symbol()
    labels = [blk.label for blk in a.residual_blocks]
    assert labels == ["enc0", "enc1", "enc1_attn", "mid.0", "mid.1", "dec1.0", "dec1.1", "dec0.0", "dec0.1"]
    blocks = dict(zip(labels, a.residual_blocks))
    # Channel changes get a 1x1 conv shortcut; the others add x itself.
    assert {k for k, blk in blocks.items() if blk.shortcut} == {"enc1", "dec1.0", "dec1.1", "dec0.0", "dec0.1"}
    assert all(_module(captured, blk.shortcut).endswith(".shortcut") for blk in blocks.values() if blk.shortcut)
    assert [len(blk.heavy_ops) for blk in a.residual_blocks] == [2, 2, 4, 2, 2, 2, 2, 2, 2]
    # The time embedding enters every ResBlock from outside its region; attention reads nothing else.
    assert [len(blk.side_inputs) for blk in a.residual_blocks] == [1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert _module(captured, blocks["enc0"].entry) == "conv_in"
    assert _module(captured, blocks["enc1"].entry) == "down"
    assert _chained([blocks[k] for k in ("enc1", "enc1_attn", "mid.0", "mid.1")])
    for blk in a.residual_blocks:
        assert blk.nodes[0] == blk.entry and blk.nodes[-1] == blk.exit and blk.branch in blk.nodes

    assert [(e.kind, _module(captured, e.source)) for e in a.skip_edges] == [
        ("concat", "enc1_attn"), ("concat", "down"), ("concat", "enc0"), ("concat", "conv_in")]
    # Each skip is concatenated into the entry of one decoder block, next to the decoder's own path.
    assert [e.join for e in a.skip_edges] == [blocks[k].entry for k in ("dec1.0", "dec1.1", "dec0.0", "dec0.1")]
    assert [e.main for e in a.skip_edges[:2]] == [blocks["mid.1"].exit, blocks["dec1.0"].exit]
    assert _module(captured, a.skip_edges[2].main) == "up"
    assert [(e.source_shape, e.join_shape) for e in a.skip_edges] == [
        ((b, 16, 4, 4), (b, 32, 4, 4)), ((b, 8, 4, 4), (b, 24, 4, 4)),
        ((b, 8, 8, 8), (b, 24, 8, 8)), ((b, 8, 8, 8), (b, 16, 8, 8))]

    (stack,) = a.stacks
    assert (stack.count, stack.period, stack.label) == (2, 1, "mid")
    assert stack.units == ((blocks["mid.0"],), (blocks["mid.1"],))


def test_dit_blocks(analysed):
    captured, a = analysed("dit")
    assert [blk.label for blk in a.residual_blocks] == [
        "blocks.0", "blocks.0.mlp", "blocks.1", "blocks.1.mlp", "blocks.2", "blocks.2.mlp"]
    assert _chained(a.residual_blocks)
    assert all(blk.shortcut is None for blk in a.residual_blocks)
    # adaLN-Zero: x + gate * f(modulate(norm(x), shift, scale)); gate, 1 + scale and shift are side inputs.
    assert [len(blk.side_inputs) for blk in a.residual_blocks] == [3] * 6
    assert [len(blk.heavy_ops) for blk in a.residual_blocks] == [3, 2] * 3
    assert a.skip_edges == ()
    (stack,) = a.stacks
    assert (stack.count, stack.period, stack.label) == (3, 2, "blocks")
    assert [[blk.label for blk in unit] for unit in stack.units] == [
        ["blocks.0", "blocks.0.mlp"], ["blocks.1", "blocks.1.mlp"], ["blocks.2", "blocks.2.mlp"]]


def test_mha_blocks(analysed):
    _, a = analysed("mha")
    assert [blk.label for blk in a.residual_blocks] == ["blocks.0.attn", "blocks.0.ff", "blocks.1.attn", "blocks.1.ff"]
    assert _chained(a.residual_blocks)
    assert [len(blk.side_inputs) for blk in a.residual_blocks] == [0] * 4
    assert a.skip_edges == ()
    (stack,) = a.stacks
    assert (stack.count, stack.period, stack.label) == (2, 2, "blocks")
    assert stack.blocks == a.residual_blocks


def test_dataclass_model_blocks(analysed):
    captured, a = analysed("dataclass")
    assert [blk.label for blk in a.residual_blocks] == ["body.0", "body.1"]
    assert _module(captured, a.residual_blocks[0].entry) == "conv_in"
    assert a.skip_edges == ()
    (stack,) = a.stacks
    assert (stack.count, stack.period, stack.label) == (2, 1, "body")


@pytest.mark.parametrize("name", ["unet", "list_unet", "dict_unet", "uvit", "text_unet"])
def test_every_skip_joins_the_decoder_side(analysed, name):
    captured, a = analysed(name)
    assert a.skip_edges
    for e in a.skip_edges:
        assert _on_decoder_side(captured, e)
        assert e.source_shape[2:] == e.main_shape[2:] and e.source_shape[0] == e.join_shape[0]
    assert {e.join for e in a.skip_edges}.isdisjoint(blk.exit for blk in a.residual_blocks)


def test_list_unet_skips(analysed):
    captured, a = analysed("list_unet")
    blocks = {blk.label: blk for blk in a.residual_blocks}
    assert list(blocks) == ["enc.0", "enc.1", "enc.2", "dec.0", "dec.1", "dec.2"]
    # Each level's output is pushed, then pooled: popped innermost first into the decoder blocks.
    assert [(e.kind, e.source) for e in a.skip_edges] == [("concat", blocks[f"enc.{i}"].exit) for i in (2, 1, 0)]
    assert [e.join for e in a.skip_edges] == [blocks[f"dec.{i}"].entry for i in range(3)]
    assert [_module(captured, e.main) for e in a.skip_edges] == ["ups.0", "ups.1", "ups.2"]
    assert a.stacks == ()


def test_dict_unet_skips(analysed):
    captured, a = analysed("dict_unet")
    blocks = {blk.label: blk for blk in a.residual_blocks}
    assert list(blocks) == ["enc.r8", "enc.r4", "mid", "mid_attn", "dec.r4", "dec.r8"]
    # The dict lookup leaves no trace in the graph: the decoder reads the encoder tensor directly.
    assert [(e.kind, e.source) for e in a.skip_edges] == [("add", blocks["enc.r4"].exit),
                                                          ("concat", blocks["enc.r8"].exit)]
    assert [_module(captured, e.main) for e in a.skip_edges] == ["up.r4", "up.r8"]
    assert a.skip_edges[0].join == blocks["dec.r4"].entry and a.skip_edges[1].join == blocks["dec.r8"].entry


def test_uvit_skips_need_no_change_of_resolution(analysed):
    captured, a = analysed("uvit")
    b = captured.batch_symbol()
    blocks = {blk.label: blk for blk in a.residual_blocks}
    assert len(blocks) == 14  # attention + MLP residuals in 3 in-blocks, the mid block, 3 out-blocks
    assert [e.kind for e in a.skip_edges] == ["add", "concat", "concat"]
    # Each source is an in-block's output and the entry of the next in-block (or the mid block).
    assert [e.source for e in a.skip_edges] == [blocks[k].exit for k in ("in_blocks.2.mlp", "in_blocks.1.mlp",
                                                                         "in_blocks.0.mlp")]
    assert [e.source for e in a.skip_edges] == [blocks[k].entry for k in ("mid_block", "in_blocks.2",
                                                                          "in_blocks.1")]
    assert [_module(captured, e.join) for e in a.skip_edges] == ["out_blocks.0", "out_blocks.1", "out_blocks.2"]
    assert [e.join_shape for e in a.skip_edges] == [(b, 17, 16), (b, 17, 32), (b, 17, 32)]
    assert {e.source_shape for e in a.skip_edges} == {(b, 17, 16)}
    # The additive skip does not break the main path: in-blocks, mid block and the first out-block
    # repeat one layer.
    (stack,) = a.stacks
    assert (stack.count, stack.period) == (5, 2)
    assert stack.blocks[-1] == blocks["out_blocks.0.mlp"]


def test_text_unet_transformer_wraps_are_blocks_not_skips(analysed):
    captured, a = analysed("text_unet")
    blocks = {blk.label: blk for blk in a.residual_blocks}
    # Exactly the four encoder-to-decoder concatenations, as in TinyUNet.
    assert [(e.kind, _module(captured, e.source)) for e in a.skip_edges] == [
        ("concat", "enc1_attn"), ("concat", "down"), ("concat", "enc0_attn"), ("concat", "conv_in")]
    assert [e.join for e in a.skip_edges] == [blocks[k].entry for k in ("dec1.0", "dec1.1", "dec0.0", "dec0.1")]
    wraps = ("enc0_attn", "enc1_attn", "dec1_attn", "dec0_attn")
    skip_joins = {e.join for e in a.skip_edges}
    for name in wraps:
        wrap = blocks[name]
        assert wrap.exit not in skip_joins and _module(captured, wrap.exit) == name
        # x + proj_out(block(proj_in(norm(x)))): the region nests the self-, cross-attention and FF
        # residuals; the cross-attention's keys and values come from outside, from the context.
        inner = [blocks[f"{name}.block.{k}"] for k in ("attn1", "attn2", "ff")]
        assert all(set(blk.nodes) <= set(wrap.nodes) for blk in inner)
        assert _chained(inner) and wrap.entry not in {blk.entry for blk in inner}
        assert [_module(captured, n) for n in wrap.side_inputs] == [f"{name}.block.attn2"] * 2
    assert [_module(captured, blocks[k].entry) for k in wraps] == ["enc0", "enc1", "dec1.1", "dec0.1"]
    assert a.stacks == ()


def test_kwargs_model_blocks(analysed):
    captured, a = analysed("kwargs")
    (blk,) = a.residual_blocks
    # x + scale * einsum(glu(proj(x)) + cond(c), mix): the entry is the input itself.
    assert _op(captured, blk.entry) == "placeholder" and blk.label == ""
    assert [_op(captured, n) for n in blk.heavy_ops] == ["linear", "einsum"]
    assert [_module(captured, n) for n in blk.side_inputs] == [""]  # cond(c)[:, None, :]
    assert a.skip_edges == () and a.stacks == ()


def test_pixart_blocks(analysed):
    captured, a = analysed("pixart")
    assert [blk.label for blk in a.residual_blocks] == [
        f"blocks.{i}.{k}" for i in range(2) for k in ("attn1", "attn2", "ff")]
    assert _chained(a.residual_blocks)
    # adaLN-single: gate, 1 + scale and shift come from the shared timestep projection plus the table
    assert [len(blk.side_inputs) for blk in a.residual_blocks] == [3, 2, 3] * 2
    assert a.skip_edges == ()
    (stack,) = a.stacks
    assert (stack.count, stack.period, stack.label) == (2, 3, "blocks")


# ---------------------------------------------------------------- the rules, on small graphs


class _MLPResidual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class _WrappedStack(nn.Module):
    """x + body(x), body a projection then residual blocks: a transformer wrap, so a block."""

    def __init__(self, project: bool = True):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(8, 8)] * project, _MLPResidual(8), _MLPResidual(8))

    def forward(self, x):
        return x + self.body(x)


def test_an_add_around_projected_residual_blocks_is_a_block():
    a = analyse(graphopt.capture(_WrappedStack().eval(), (torch.randn(2, 3, 8),)))
    inner, wrap = a.residual_blocks[:2], a.residual_blocks[2]
    assert [blk.label for blk in a.residual_blocks] == ["body.1", "body.2", "body"]
    assert wrap.entry == "tensors_0" and all(set(blk.nodes) < set(wrap.nodes) for blk in inner)
    assert a.skip_edges == ()
    (stack,) = a.stacks
    assert (stack.count, stack.period) == (2, 1) and stack.blocks == inner


def test_an_add_around_blocks_its_source_enters_is_a_skip():
    # x + blocks(x) is U-ViT's innermost additive skip around its mid block: x goes on down the path.
    a = analyse(graphopt.capture(_WrappedStack(project=False).eval(), (torch.randn(2, 3, 8),)))
    assert [blk.label for blk in a.residual_blocks] == ["body.0", "body.1"]
    (skip,) = a.skip_edges
    assert (skip.kind, skip.source, skip.main) == ("add", "tensors_0", a.residual_blocks[-1].exit)


class _DownUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + F.interpolate(self.conv(F.avg_pool2d(x, 2)), scale_factor=2.0)


class _Downsample(nn.Module):
    """A ResNet downsampling block: the resolution changes end to end, so it is a block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2)

    def forward(self, x):
        return self.shortcut(x) + self.conv(F.relu(x))


def test_down_and_back_up_is_a_skip_but_downsampling_is_a_block():
    down_up = analyse(graphopt.capture(_DownUp().eval(), (torch.randn(2, 4, 8, 8),)))
    assert down_up.residual_blocks == ()
    assert [(e.kind, e.source) for e in down_up.skip_edges] == [("add", "tensors_0")]

    down = analyse(graphopt.capture(_Downsample().eval(), (torch.randn(2, 4, 8, 8),)))
    (blk,) = down.residual_blocks
    assert blk.entry == "tensors_0" and blk.shortcut is not None and down.skip_edges == ()


class _Flat(nn.Module):
    """Three identical residual MLPs written inline, no submodules: structure, not names."""

    def __init__(self):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.randn(8, 8) * 0.1) for _ in range(6)])

    def forward(self, x):
        for i in range(3):
            x = x + torch.tanh(x @ self.w[2 * i]) @ self.w[2 * i + 1]
        return torch.cat([x, torch.relu(x) @ self.w[0]], dim=-1)  # a short cat: not a skip


def test_blocks_and_stacks_do_not_need_module_names():
    a = analyse(graphopt.capture(_Flat().eval(), (torch.randn(2, 8),)))
    assert len(a.residual_blocks) == 3 and {blk.label for blk in a.residual_blocks} == {""}
    assert _chained(a.residual_blocks)
    (stack,) = a.stacks
    assert (stack.count, stack.period) == (3, 1)
    assert a.skip_edges == ()
