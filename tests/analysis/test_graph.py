import json

import networkx as nx
import torch

import graphopt
from graphopt.analysis import analyse
from graphopt.analysis.graph import batch_symbol, common_module, input_dependent, op_name, shape, to_networkx


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_networkx_view_has_one_vertex_per_node_without_the_guard(analysed):
    captured, _ = analysed("unet")
    gm = captured.graph_module
    g = to_networkx(gm)
    names = [n.name for n in gm.graph.nodes if n.op != "call_module"]
    assert sorted(g.nodes) == sorted(names)
    assert "_guards_fn" not in g
    assert nx.is_directed_acyclic_graph(g)
    # Vertex order attribute is the FX order, a topological order of the edges.
    assert all(g.nodes[u]["index"] < g.nodes[v]["index"] for u, v in g.edges)


def test_vertex_attributes(analysed):
    captured, _ = analysed("unet")
    g = to_networkx(captured.graph_module)
    b = captured.batch_symbol()
    conv = next(n for n, d in g.nodes(data=True) if d["module"] == "enc0.conv1" and d["op"] == "call_function")
    attrs = g.nodes[conv]
    assert (attrs["op"], attrs["name"], attrs["target"]) == ("call_function", "conv2d", "aten.conv2d.default")
    assert attrs["shape"] == (b, 8, 8, 8) and attrs["dtype"] == "float32"
    assert attrs["fx"].name == conv and not attrs["parameter"]
    weight = attrs["fx"].args[1].name
    assert g.nodes[weight]["parameter"] and g.nodes[weight]["op"] == "get_attr"
    assert list(g.predecessors(conv)) == [attrs["fx"].args[0].name, weight, attrs["fx"].args[2].name]


def test_shape_arguments_are_not_data_edges(analysed):
    # The attention reshape reads sym_size(sigma) for its batch size; that is not data flow.
    captured, _ = analysed("unet")
    gm = captured.graph_module
    g = to_networkx(gm)
    reshapes = [n for n in g if g.nodes[n]["name"] == "reshape"]
    assert reshapes
    for r in reshapes:
        assert list(g.predecessors(r)) == [_node(gm, r).args[0].name]
    sizes = [n for n in g if g.nodes[n]["name"] == "sym_size"]
    assert sizes and all(g.out_degree(n) == 0 for n in sizes)


def test_input_dependent_separates_parameters_from_data(analysed):
    captured, _ = analysed("kwargs")
    gm = captured.graph_module
    dependent = input_dependent(gm)
    by_op = {}
    for n in gm.graph.nodes:
        by_op.setdefault(op_name(n), []).append(n.name)
    assert not set(by_op["t"]) & dependent  # mix.t().t(): a function of a parameter only
    assert set(by_op["einsum"]) <= dependent and set(by_op["linear"]) <= dependent
    assert not {n.name for n in gm.graph.nodes if n.op == "get_attr"} & dependent


def test_batch_symbol_and_shapes(analysed):
    captured, _ = analysed("mha")
    gm = captured.graph_module
    b = captured.batch_symbol()
    assert batch_symbol(gm) == b
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert shape(placeholder) == (b, 6, 4)
    # nn.MultiheadAttention folds heads into the batch: sizes are expressions of the batch symbol.
    assert any(s == f"6*{b}" for n in gm.graph.nodes if (s := (shape(n) or (None,))[0]) is not None)


def test_helpers():
    assert common_module(["blocks.0.attn.qkv", "blocks.0.attn", "blocks.0.mlp"]) == "blocks.0"
    assert common_module(["proj", ""]) == ""
    assert common_module([]) == ""


def test_analyse_accepts_a_bare_graph_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    captured = graphopt.capture(model, (torch.randn(3, 4),))
    a, b = analyse(captured), analyse(captured.graph_module)
    assert a.cost.batch_symbol == b.cost.batch_symbol == captured.batch_symbol()
    assert a.cost.flops == b.cost.flops
    assert "ops:" in b.summary()


def test_summary_lists_every_analysis(analysed):
    _, a = analysed("unet")
    text = a.summary()
    for line in ("residual blocks: 9", "skip edges: 4", "stacks: 1", "attention sites: 1"):
        assert line in text.splitlines()
    assert text.startswith("ops: ") and "conv2d 27" in text.splitlines()[0]
    assert "MFLOP per sample" in text and "enc1_attn  softmax" in text


def test_json_is_plain_data(analysed):
    _, a = analysed("dit")
    data = json.loads(json.dumps(a.to_json()))
    assert [len(data[k]) for k in ("residual_blocks", "skip_edges", "stacks", "attention_sites")] == [6, 0, 1, 3]
    assert data["stacks"][0]["units"][0] == [b.exit for b in a.stacks[0].units[0]]
    assert data["cost"]["flops"] == str(a.cost.flops) and data["ops"]["scaled_dot_product_attention"] == 3

