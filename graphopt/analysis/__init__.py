"""Analyses of a captured graph: structure (residual blocks, long skips, stacks, attention sites)
found from the data flow alone, and a symbolic cost model.

``analyse(captured)`` runs them all; the submodules expose each one on a networkx view
(:func:`graph.to_networkx`) for passes that need only one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any

import sympy
from torch import fx

from .attention import AttentionSite, find_attention
from .blocks import ResidualBlock, SkipEdge, Stack, find_blocks, find_stacks
from .cost import B, Cost, GraphCost, NodeCost, evaluate, graph_cost
from .graph import batch_symbol, to_networkx

if TYPE_CHECKING:
    from ..capture import CapturedGraph

__all__ = [
    "AttentionSite", "B", "Cost", "GraphAnalysis", "GraphCost", "NodeCost", "ResidualBlock", "SkipEdge",
    "Stack", "analyse", "evaluate", "find_attention", "find_blocks", "find_stacks", "graph_cost",
    "to_networkx",
]


@dataclasses.dataclass(frozen=True)
class GraphAnalysis:
    """Everything :func:`analyse` finds in one graph; node references are FX node names."""

    residual_blocks: tuple[ResidualBlock, ...]
    skip_edges: tuple[SkipEdge, ...]
    stacks: tuple[Stack, ...]
    attention_sites: tuple[AttentionSite, ...]
    cost: GraphCost

    def summary(self) -> str:
        """A few readable lines: op counts, cost, then one table per structure."""
        ops = Counter(c.op for c in self.cost.nodes)
        lines = [f"ops: {len(self.cost.nodes)} ("
                 + ", ".join(f"{name} {n}" for name, n in ops.most_common()) + ")"]
        lines += _cost_lines(self.cost)
        lines.append(f"residual blocks: {len(self.residual_blocks)}")
        lines += _table(["label", "entry", "exit", "heavy ops", "side inputs"],
                        [[b.label or "(root)", b.entry, b.exit, len(b.heavy_ops), len(b.side_inputs)]
                         for b in self.residual_blocks])
        lines.append(f"skip edges: {len(self.skip_edges)}")
        lines += _table(["kind", "source", "join", "source shape", "join shape"],
                        [[e.kind, e.source, e.join, _shape(e.source_shape), _shape(e.join_shape)]
                         for e in self.skip_edges])
        lines.append(f"stacks: {len(self.stacks)}")
        lines += _table(["label", "units", "blocks per unit", "exits"],
                        [[s.label or "(root)", s.count, s.period, " ".join(b.exit for b in s.blocks)]
                         for s in self.stacks])
        crosses = sum(a.cross for a in self.attention_sites)
        lines.append(f"attention sites: {len(self.attention_sites)}"
                     + (f" ({len(self.attention_sites) - crosses} self, {crosses} cross)" if crosses else ""))
        lines += _table(["label", "kind", "attends", "heads", "seq", "kv", "q/k/v", "out proj"],
                        [[a.label or "(root)", a.kind, f"cross to {a.kv_input or a.k}" if a.cross else "self",
                          a.heads if a.heads is not None else "?", a.seq_len if a.seq_len is not None else "?",
                          a.kv_len if a.kv_len is not None else "?",
                          f"{a.q} (fused)" if a.fused_qkv else f"{a.q} / {a.k} / {a.v}", a.out_proj or "-"]
                         for a in self.attention_sites])
        return "\n".join(lines)


    def to_json(self) -> dict[str, Any]:
        """The analysis as plain JSON data: node names, shapes, and costs as strings of ``B``."""
        def block(b: ResidualBlock) -> dict[str, Any]:
            return {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.name != "signature"}

        return {
            "ops": dict(Counter(c.op for c in self.cost.nodes).most_common()),
            "residual_blocks": [block(b) for b in self.residual_blocks],
            "skip_edges": [dataclasses.asdict(e) for e in self.skip_edges],
            "stacks": [{"label": s.label, "count": s.count, "period": s.period,
                        "units": [[b.exit for b in unit] for unit in s.units]} for s in self.stacks],
            "attention_sites": [dataclasses.asdict(a) for a in self.attention_sites],
            "cost": {"batch_symbol": self.cost.batch_symbol, "flops": str(self.cost.flops),
                     "bytes": str(self.cost.bytes), "unknown_ops": list(self.cost.unknown),
                     "by_module": {k: {"flops": str(c.flops), "bytes": str(c.bytes)}
                                   for k, c in self.cost.by_module().items()}},
        }


def analyse(graph: CapturedGraph | fx.GraphModule) -> GraphAnalysis:
    """Run every analysis on a captured graph or a bare GraphModule (whose batch symbol is then the
    first input's leading dim, when symbolic)."""
    if isinstance(graph, fx.GraphModule):
        gm, batch = graph, batch_symbol(graph)
    else:
        gm, batch = graph.graph_module, graph.batch_symbol()
    g = to_networkx(gm)
    blocks, skips = find_blocks(g)
    return GraphAnalysis(blocks, skips, find_stacks(g, blocks, skips), find_attention(g, batch),
                         graph_cost(gm, batch))


def _cost_lines(cost: GraphCost) -> list[str]:
    flops, moved = sympy.expand(cost.flops), sympy.expand(cost.bytes)
    if B not in flops.free_symbols | moved.free_symbols:
        lines = [f"cost (static batch): {_si(evaluate(flops, 1))}FLOP, {_si(evaluate(moved, 1))}B moved"]
    else:
        lines = [f"FLOPs: {_si(evaluate(flops.coeff(B, 1), 1))}FLOP per sample"
                 f" + {_si(evaluate(flops.coeff(B, 0), 1))}FLOP independent of the batch",
                 f"bytes: {_si(evaluate(moved.coeff(B, 1), 1))}B per sample"
                 f" + {_si(evaluate(moved.coeff(B, 0), 1))}B independent of the batch (weights, constants)"]
        if sympy.degree(flops, B) > 1 or sympy.degree(moved, B) > 1:
            lines.append(f"(not linear in the batch: FLOPs = {flops}, bytes = {moved})")
    if cost.unknown:
        lines.append("ops without a cost formula (counted as 0 FLOPs): " + ", ".join(cost.unknown))
    return lines


def _si(value: int) -> str:
    for scale, prefix in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value} "


def _shape(shape: tuple | None) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if shape is not None else "?"


def _table(header: list[str], rows: list[list]) -> list[str]:
    if not rows:
        return []
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
