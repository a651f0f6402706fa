"""Graph variants without some residual blocks: what a skipped block in a sampling plan runs.

AutoDiffusion skips blocks per step: a skipped residual block returns its shortcut (the entry, or
the entry's shortcut projection), a skipped attention block is the identity. Multiplying a block's
output by zero would cost as much as running it, so a skip set gets its own graph: a copy of the
optimized graph (sharing its weights) in which each skipped block's exit is replaced by what the
block returns when skipped, after which dead-code elimination drops the block's nodes and every
node only it needed (an adaLN modulation that fed only that block, say). Variants are cached per
distinct skip set.

Blocks are the residual blocks :func:`graphopt.analysis.find_blocks` finds, numbered in graph
order: the *structural block id* a plan stores next to the block's module path.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from torch import fx

from .analysis.blocks import find_blocks
from .analysis.graph import SDPA, to_networkx
from .fxgraph import copy_sharing_weights

_ATTENTION_OPS = SDPA | {"softmax", "_softmax", "_safe_softmax", "graphopt::linear_attention",
                         "graphopt::block_causal_attention", "graphopt::dynamic_dwconv"}


@dataclasses.dataclass(frozen=True)
class Block:
    """A skippable residual block: ``exit = shortcut(entry) + branch``.

    ``id`` is its position among the graph's residual blocks (graph order), ``module`` the module
    path that labels it, ``kind`` "attention" (its branch attends) or "residual", ``returns`` the
    node a skipped block yields in place of ``exit``.
    """

    id: int
    module: str
    kind: str
    entry: str
    exit: str
    returns: str

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "module": self.module, "kind": self.kind}


def find_skippable(gm: fx.GraphModule) -> tuple[Block, ...]:
    """The residual blocks of ``gm`` in graph order."""
    g = to_networkx(gm)
    blocks, _ = find_blocks(g)
    out = []
    for i, b in enumerate(blocks):
        kind = "attention" if any(g.nodes[n]["name"] in _ATTENTION_OPS for n in b.nodes) else "residual"
        out.append(Block(i, b.label, kind, b.entry, b.exit, b.shortcut or b.entry))
    return tuple(out)


def without_blocks(gm: fx.GraphModule, blocks: Iterable[Block]) -> fx.GraphModule:
    """A copy of ``gm`` (same weights) in which every block of ``blocks`` is skipped."""
    variant = copy_sharing_weights(gm)
    nodes = {n.name: n for n in variant.graph.nodes}
    for block in sorted(blocks, key=lambda b: b.id, reverse=True):  # outer blocks last: inner exits are gone
        exit_node, returns = nodes.get(block.exit), nodes.get(block.returns)
        if exit_node is None or returns is None:
            raise ValueError(f"block {block.id} ({block.module or 'root'}) is not in this graph")
        if exit_node.graph is variant.graph and exit_node.users:
            exit_node.replace_all_uses_with(returns)
    variant.graph.eliminate_dead_code()
    variant.graph.lint()
    variant.recompile()
    return variant


def same_blocks(a: tuple[Block, ...], b: tuple[Block, ...]) -> bool:
    """True when two graphs have the same blocks in the same order (ids, module paths and kinds)."""
    return [(x.id, x.module, x.kind) for x in a] == [(y.id, y.module, y.kind) for y in b]
