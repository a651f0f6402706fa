"""merge-linears: one matmul for the linears that read the same tensor.

Where it belongs: after cse (a DiT's blocks each apply their own ``nn.SiLU`` to the conditioning: one
node once cse ran) and before dce, which drops the weights merged away.

A DiT computes each block's adaLN modulation with a linear of its own from the same conditioning
vector (13 for DiT-S/2: 12 blocks and the final layer; 29 for DiT-XL/2), and a UNet's residual blocks
each project the time embedding. At sampling batch sizes each is a matmul of a few rows whose cost is
its launch. Attention written with separate projections (diffusers' ``to_q``, ``to_k``, ``to_v``;
``to_k`` and ``to_v`` of a cross-attention) reads the same tokens three (two) times: one matmul of
three times the width fills a GPU better and launches once. Linears of one input are merged: their
weights are concatenated along the output features once, ahead of time (W = [W_1; ...; W_n],
b = [b_1; ...; b_n]), one linear computes Y = x W^T + b, and output i is the column block
Y[..., o_i : o_i + n_i], o_i the sum of the n_j before it. That block is x W_i^T + b_i: the same dot
products, summed in whatever order the matmul kernel picks for the merged shape, so exact within the
dtype's tolerance, as any change of a matmul's shape is. The linears keep their graph order in the
merged weight, so q, k, v merged read like a fused qkv projection (columns q, then k, then v), which
the attention passes know.

Each output must be read only through views (chunk, unsqueeze, reshape, slicing), so that no
epilogue the GPU lowering fuses into a matmul ends up behind a slice, or by one elementwise
activation alone (SiLU, GELU, ReLU, sigmoid, tanh). Linears whose activations are the same op with
the same arguments merge with it: the activation runs once on the merged output, before the slices
(act(Y)[..., a:b] = act(Y[..., a:b]), elementwise), so on a GPU the merged matmul and its activation
are one GEMM-epilogue site instead of one per linear (diffusers' DiT embeds the timestep in every
block with an MLP of its own: 12 first layers, each with its SiLU, become one). Weights and biases
must be the module's own tensors, in one dtype and on one device.

A column block is not contiguous, so a ``view`` among its readers that would merge its columns with
another dimension could fail where it held on the linear's own output: every ``view`` reached from a
block through views becomes ``reshape``, the same tensor wherever a view exists and a copy where none
does. The values of those readers are recomputed (:func:`graphopt.fxgraph.refresh_values`): the
kernel generator reads their strides.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from graphopt.fxgraph import refresh_values
from graphopt.pipeline import Pass, PassContext

from ._common import new_buffer, val
from ._substitution import Builder, attribute

aten = torch.ops.aten

# Elementwise activations a group of linears may share: act(Y)[..., a:b] == act(Y[..., a:b]).
_ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.chunk.default, aten.split.Tensor,
          aten.split_with_sizes.default, aten.slice.Tensor, aten.select.int, aten.unflatten.int, aten.expand.default,
          aten.transpose.int, aten.permute.default, aten.t.default, operator.getitem}


def _refusal(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why this linear cannot join a merge, or None."""
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if node.kwargs:
        return f"it is given {', '.join(node.kwargs)} by keyword"
    if not isinstance(val(x), torch.Tensor):
        return "its input is not a tensor"
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or \
            (bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr")):
        return "its weight or bias is computed, not one of the module's tensors"
    readers = {u.target for u in node.users} - _VIEWS
    if readers and _activation(node) is None:
        return f"its output is read by {', '.join(sorted(map(str, readers)))}, not through views or one activation"
    w = attribute(gm, str(weight.target))
    if bias is not None and attribute(gm, str(bias.target)).dtype != w.dtype:
        return "its bias and weight differ in dtype"
    return None


def _activation(node: fx.Node) -> fx.Node | None:
    """The one elementwise activation (``_ACTIVATIONS``) that alone reads ``node``, or None."""
    users = list(node.users)
    if len(users) != 1 or users[0].target not in _ACTIVATIONS or users[0].args[0] is not node:
        return None
    act = users[0]
    return act if not any(isinstance(a, fx.Node) for a in (*act.args[1:], *act.kwargs.values())) else None


def _signature(node: fx.Node) -> tuple | None:
    """What a linear's readers need of a merge: None (views), or its activation's op and arguments."""
    act = _activation(node)
    return None if act is None else (act.target, tuple(act.args[1:]), tuple(sorted(act.kwargs.items())))


def _reshape_views(block: fx.Node) -> list[fx.Node]:
    """Every ``aten.view`` reached from ``block`` through views becomes ``aten.reshape`` (see the module
    docstring): a view of a column block's columns together with another dimension has no strides.
    Returns the views reached: their values are the ones that change."""
    reached, frontier = [], [block]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target not in _VIEWS or user in reached:
                continue
            if user.target is aten.view.default:
                user.target = aten.reshape.default
            reached.append(user)
            frontier.append(user)
    return reached


def _merge_linears(gm: fx.GraphModule, ctx: PassContext) -> None:
    readers: dict[fx.Node, list[fx.Node]] = defaultdict(list)  # each input's linears, in graph order
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            readers[node.args[0]].append(node)  # type: ignore[index]
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    views: list[fx.Node] = []  # the readers whose values the merge changes
    for linears in readers.values():
        for node in linears if len(linears) > 1 else ():
            why = _refusal(node, gm)
            if why is not None:
                ctx.near_miss("shared-input", node, why)
                continue
            w = attribute(gm, str(node.args[1].target))  # type: ignore[union-attr]
            groups[(node.args[0], w.dtype, w.device, _signature(node))].append(node)
    for (x, _, _, signature), linears in groups.items():
        if len(linears) < 2:
            continue
        weights = [attribute(gm, str(n.args[1].target)) for n in linears]
        biases = [attribute(gm, str(n.args[2].target)) if len(n.args) > 2 and n.args[2] is not None else None
                  for n in linears]
        merged_w = torch.cat([w.detach() for w in weights])
        merged_b = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        names = [new_buffer(gm, "_merged_", value) for value in (merged_w, merged_b) if value is not None]
        first = linears[0]
        with gm.graph.inserting_before(first):
            attrs = []
            for name in names:
                attrs.append(gm.graph.get_attr(name))
                attrs[-1].meta["val"] = val(x).fake_mode.from_tensor(getattr(gm, name), static_shapes=True) \
                    if getattr(val(x), "fake_mode", None) is not None else getattr(gm, name)
            build = Builder(gm.graph, first)
            merged = build(aten.linear.default, x, *attrs)
            if signature is not None:  # the activation once, over every linear's columns
                target, args, kwargs = signature
                merged = build(target, merged, *args, **dict(kwargs))
            start = 0
            for node, w in zip(linears, weights):
                part = build(aten.slice.Tensor, merged, val(x).dim() - 1, start, start + w.shape[0])
                start += w.shape[0]
                (node if signature is None else _activation(node)).replace_all_uses_with(part)
                views += _reshape_views(part)
        for node in linears:
            if signature is not None:
                gm.graph.erase_node(_activation(node))
            gm.graph.erase_node(node)
        ctx.hit("shared-input", len(linears))
        then = "" if signature is None else f", then {signature[0].__name__.split('.')[0]}"
        ctx.note(f"{len(linears)} linears of {x.name} as one matmul of {start} output features{then}")
    gm.recompile()
    refresh_values(gm, views)  # they still carry the strides of the linears' own outputs


MERGE_LINEARS = Pass("merge-linears", exact=True, transform=_merge_linears, doc=__doc__ or "")
