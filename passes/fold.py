"""fold: precompute subgraphs that depend only on parameters and constants.

Where it belongs: after no-op removal (which exposes more constant chains) and before dce (which
removes the parameters folding leaves unused). Typical hits: the sinusoidal frequencies of a
time-step embedding (``exp(-log(1e4) * arange(d) / d)``), transposed or reshaped weights, a position
embedding that is added to nothing input-dependent. Exact: the same ops run once, ahead of time,
on the same values.

A node is constant when it is a parameter/buffer, or a deterministic op (no random ops, no side
effects) whose inputs are all constant. Only the frontier (constants used by input-dependent nodes
or returned) is evaluated and stored as a new buffer; values equal to the bit (each block's own copy
of one constant computation) are stored once, so cse can then compute once what reads them. A
frontier value much larger than the parameters it comes from (an ``expand`` of a bias to the
activation size) is left alone: storing it would cost more memory traffic than computing it.
"""

from __future__ import annotations

import torch
from torch import fx

from graphopt.pipeline import Pass, PassContext

from ._common import new_buffer

aten = torch.ops.aten

# Ops whose value is not a function of their inputs, or that must run for their side effect.
NONDETERMINISTIC = {
    aten.rand.default, aten.randn.default, aten.randint.low, aten.randint.default, aten.rand_like.default,
    aten.randn_like.default, aten.randint_like.default, aten.bernoulli.default, aten.bernoulli.p,
    aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.Tensor_Tensor, aten.multinomial.default,
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.uniform.default,
}
# Folding a value that is more than this many times larger than its parameter inputs (and above the
# small-size floor below) trades a cheap op for permanent memory traffic.
_GROWTH_LIMIT = 4
_SMALL = 1 << 16


def _is_constant_op(node: fx.Node, constant: set[fx.Node]) -> bool:
    if node.op != "call_function" or node.target in NONDETERMINISTIC or node.is_impure():
        return False
    if "val" in node.meta and isinstance(node.meta["val"], (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    return all(inp in constant for inp in node.all_input_nodes)


def _fold(gm: fx.GraphModule, ctx: PassContext) -> None:
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or _is_constant_op(node, constant):
            constant.add(node)
    frontier = [n for n in gm.graph.nodes if n in constant and n.op == "call_function"
                and any(u not in constant for u in n.users)]
    values: dict[fx.Node, object] = {}

    def evaluate(node: fx.Node) -> object:
        if node not in values:
            if node.op == "get_attr":
                obj = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                values[node] = obj
            else:
                args = fx.node.map_arg(node.args, evaluate)
                kwargs = fx.node.map_arg(node.kwargs, evaluate)
                values[node] = node.target(*args, **kwargs)
        return values[node]

    def param_numel(node: fx.Node, seen: set[fx.Node]) -> int:
        if node in seen:
            return 0
        seen.add(node)
        if node.op == "get_attr":
            t = evaluate(node)
            return t.numel() if isinstance(t, torch.Tensor) else 0
        return sum(param_numel(i, seen) for i in node.all_input_nodes)

    replaced: set[fx.Node] = set()
    folded: list[tuple[str, torch.Tensor]] = []
    for node in frontier:
        value = evaluate(node)
        if not isinstance(value, torch.Tensor):
            continue
        source = param_numel(node, set())
        if value.numel() > _SMALL and value.numel() > _GROWTH_LIMIT * max(source, 1):
            ctx.near_miss("fold-constant", node, f"would store {value.numel()} elements computed from {source}")
            continue
        name = next((n for n, t in folded if _same_bits(t, value)), None)
        if name is None:  # a value folded before (each block's own copy of one computation) is stored once
            name = new_buffer(gm, "_folded_", value.detach().clone())  # clone keeps strides: same kernels, same bits
            folded.append((name, getattr(gm, name)))
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(name)
        replacement.meta.update(node.meta)
        replacement.meta["val"] = node.meta.get("val", value)
        node.replace_all_uses_with(replacement)
        replaced.add(node)
        ctx.hit("fold-constant")
    # Remove the subgraphs folding replaced (and nothing else: other dead code is dce's), so this
    # pass's report shows what folding took out.
    for node in reversed(list(gm.graph.nodes)):
        if node in replaced and not node.users:
            replaced.update(i for i in node.all_input_nodes if i in constant and i.op == "call_function")
            gm.graph.erase_node(node)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors down to the bit (0.0 and -0.0 differ, a NaN equals itself) in the same layout."""
    if (a.dtype, a.shape, a.stride(), a.device) != (b.dtype, b.shape, b.stride(), b.device):
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


FOLD = Pass("fold", exact=True, transform=_fold, doc=__doc__ or "")
