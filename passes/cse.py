"""cse: one node for each value the graph computes more than once.

Where it belongs: after folding (equal constants are one value by then) and before merge-linears,
which needs the conditioning a DiT's blocks each pass through their own ``nn.SiLU`` to be one node
before it can merge the linears that read it. Exact: a deterministic op applied to the same
arguments gives the same value, so later copies read the first one's result.

Two ``call_function`` nodes are the same computation when their target and arguments are equal, node
arguments compared after replacement (so whole repeated chains collapse, in graph order); two reads of
one parameter or buffer are one node too (fold stores equal folded values once). Random ops,
uninitialised allocations (``empty``) and anything with a side effect (asserts, in-place ops) are never
merged. ``torch.fx.passes.dialect.common.cse_pass.CSEPass`` builds a new graph instead of editing this
one and bans only listed random and in-place ops; this pass keeps the graph (and its nodes' metadata)
and asks each node whether it is impure.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from graphopt.pipeline import Pass, PassContext

from .fold import NONDETERMINISTIC


def _key(node: fx.Node) -> Any:
    """What the node computes, as a hashable value (``None`` for a node that must keep its own value)."""
    if node.op == "get_attr":  # one tensor read twice (fold stores a value its copies share once)
        return "get_attr", node.target
    if node.op != "call_function" or node.target in NONDETERMINISTIC or node.is_impure():
        return None
    try:
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        hash(key)
    except TypeError:  # an argument torch cannot hash (a list of tensors' metadata, say): left alone
        return None
    return key


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, float) and value != value:  # NaN equals no NaN: keep such nodes apart
        raise TypeError("nan")
    if isinstance(value, (bool, int, float, complex)):  # 1, 1.0 and True are equal, their results are not
        return type(value).__name__, value
    return value


def _cse(gm: fx.GraphModule, ctx: PassContext) -> None:
    seen: dict[Any, fx.Node] = {}
    for node in list(gm.graph.nodes):
        key = _key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            ctx.hit("repeated-value")
    gm.recompile()


CSE = Pass("cse", exact=True, transform=_cse, doc=__doc__ or "")
