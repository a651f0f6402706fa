"""A networkx view of a captured FX graph, and the small node helpers the analyses share.

The view has one vertex per FX node, keyed by the node's name, and an edge ``u -> v`` when ``v``
reads the tensor ``u`` produces. Shape-only inputs (``sym_size`` results and SymInt arithmetic fed to
``view``/``reshape``) carry no data, so they add no edge: otherwise every reshape would appear to
depend on whichever input the batch size was read from. The guard call (a ``call_module`` with no
users) is left out. Everything here reads the graph's structure; module paths are kept as labels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import networkx as nx
import sympy
import torch
from torch import fx

# Operator families, by ATen op name (the overload packet's name, so "add" covers add.Tensor).
HEAVY = frozenset({
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum",
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
})
CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                   "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
SDPA = frozenset(n for n in HEAVY if "scaled_dot_product" in n)
# Ops that only rearrange data: what the structural walks step through (the cost model tells
# copies such as contiguous and clone apart from true views).
LAYOUT = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "select", "unbind", "chunk", "split", "split_with_sizes", "getitem", "unflatten", "flatten",
    "contiguous", "clone", "expand", "expand_as", "view_as", "alias", "slice", "narrow", "detach",
})
# Ops that change spatial (or token) resolution: pooling, interpolation, pixel (un)shuffle.
RESAMPLE = frozenset({
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
    "_upsample_bilinear2d_aa", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
    "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool2d", "pixel_shuffle", "pixel_unshuffle", "interpolate",
})


def op_name(node: fx.Node) -> str:
    """``"linear"`` for ``aten.linear.default``; ``"ns::name"`` for other namespaces; the Python name
    for plain callables (``getitem``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname if target.namespace == "aten" else f"{target.namespace}::{target._opname}"
    if callable(target):
        return getattr(target, "__name__", str(target))
    return str(target)


def is_tensor_valued(node: fx.Node) -> bool:
    """True when the node produces a tensor or a list/tuple of tensors (unbind, chunk, split)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, list | tuple) and len(val) > 0 and all(isinstance(v, torch.Tensor) for v in val)


def is_parameter(node: fx.Node) -> bool:
    """A parameter or buffer read (``get_attr``)."""
    return node.op == "get_attr"


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor-valued inputs in argument order (lists such as cat's and einsum's included)."""
    return [n for n in node.all_input_nodes if is_tensor_valued(n)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call, given positionally at ``index`` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def shape(node: fx.Node) -> tuple[int | str, ...] | None:
    """The node's shape with symbolic sizes as strings (``("s87", 16, 4, 4)``); None for non-tensors."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(int(s) if not isinstance(s, torch.SymInt) else str(s.node.expr) for s in val.shape)


def dtype(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else None


def module_path(node: fx.Node) -> str:
    return node.meta.get("graphopt_module", "") or ""


def is_scalar_scale(node: fx.Node) -> bool:
    """``x * c`` or ``x / c`` with a Python number ``c``: a rescale that keeps the layout."""
    return (op_name(node) in ("mul", "div") and len(node.args) == 2
            and isinstance(node.args[1], int | float) and isinstance(node.args[0], fx.Node))


def batch_symbol(gm: fx.GraphModule) -> str | None:
    """The name of the first placeholder's leading dim when it is symbolic (the dynamic batch)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 1:
            size = val.shape[0]
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            return str(expr) if isinstance(expr, sympy.Symbol) else None
    return None


def batch_symbols(gm: fx.GraphModule, symbol: str | None = None) -> frozenset[str]:
    """The batch symbol (``symbol``, else :func:`batch_symbol`) and the leading-size symbol of every other
    input that had the batch's size when captured: torch.export gives an input whose batch nothing in
    the graph ties to the first one's a symbol of its own (diffusers' UVit2D reads its
    micro-conditioning only through a reshape to the token batch). A sampler passes one batch to all
    of them. Empty without a symbolic batch."""
    symbol = symbol if symbol is not None else batch_symbol(gm)
    if symbol is None:
        return frozenset()
    leading = [n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 1]
    hints = {s.node.expr.name: s.node.hint for s in leading
             if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol)}
    hint = hints.get(symbol)
    return frozenset({symbol} | {name for name, h in hints.items() if hint is not None and h == hint})


def _skipped(node: fx.Node) -> bool:
    # The export guard is a call_module that nothing reads; it is not part of the computation.
    return node.op == "call_module" and not node.users


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph: vertices by node name with ``op``, ``target``, ``name`` (ATen op name),
    ``shape``, ``dtype``, ``module`` (the producing module's dotted path, a label), ``parameter``,
    ``index`` (position in the FX graph, a topological order) and ``fx`` (the node itself, for its
    arguments); an edge per tensor read, from producer to reader."""
    g = nx.DiGraph()
    for index, node in enumerate(gm.graph.nodes):
        if _skipped(node):
            continue
        g.add_node(node.name, op=node.op, target=str(node.target), name=op_name(node), shape=shape(node),
                   dtype=dtype(node), module=module_path(node), index=index,
                   parameter=is_parameter(node), fx=node)
        for src in node.all_input_nodes:
            if not _skipped(src) and is_tensor_valued(src):
                g.add_edge(src.name, node.name)
    return g


def input_dependent(gm: fx.GraphModule) -> set[str]:
    """Names of nodes whose value depends on a graph input, shape arguments included; the rest are
    constants or parameters (and their functions), which constant folding can precompute."""
    dependent: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(src.name in dependent for src in node.all_input_nodes):
            dependent.add(node.name)
    return dependent


def in_graph_order(g: nx.DiGraph, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` sorted by their position in the FX graph."""
    return tuple(sorted(names, key=lambda n: g.nodes[n]["index"]))


def common_module(paths: Iterable[str]) -> str:
    """The longest dotted prefix shared by all ``paths`` (``""``, the root, when they share none)."""
    parts = [p.split(".") if p else [] for p in paths]
    if not parts:
        return ""
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)
