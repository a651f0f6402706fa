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

A block may also grow a cache: a graph output ``cat([past, new])`` inside its region, ``past`` a
graph input (the keys and values of a KV-cached transformer, VAR's per-scale call). A skipped block
computes nothing new, so its cache output is its cache input, unchanged: the cache stops growing.
With ``free_caches`` it is an empty tensor instead, so a caller that keeps only what the model
returns holds nothing for the block any more.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
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
    caches: tuple[tuple[str, str, int], ...] = ()  # (output cat, cache input, cat dim)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "module": self.module, "kind": self.kind}


def find_skippable(gm: fx.GraphModule) -> tuple[Block, ...]:
    """The residual blocks of ``gm`` in graph order."""
    g = to_networkx(gm)
    blocks, _ = find_blocks(g)
    nodes = {n.name: n for n in gm.graph.nodes}
    outputs = _output_names(gm)
    out = []
    for i, b in enumerate(blocks):
        kind = "attention" if any(g.nodes[n]["name"] in _ATTENTION_OPS for n in b.nodes) else "residual"
        caches = tuple(c for n in b.nodes if n in outputs and (c := _cache_growth(nodes[n])))
        out.append(Block(i, b.label, kind, b.entry, b.exit, b.shortcut or b.entry, caches))
    return tuple(out)


def _output_names(gm: fx.GraphModule) -> set[str]:
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            fx.node.map_arg(node.args, lambda a: found.add(a.name))
    return found


def _cache_growth(node: fx.Node) -> tuple[str, str, int] | None:
    """(node, cache input, dim) when ``node`` is ``cat([input, new], dim)``: a cache grown by a block."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") not in ("cat.default", "cat"):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(parts) != 2 or not isinstance(parts[0], fx.Node) or parts[0].op != "placeholder":
        return None
    return node.name, parts[0].name, int(dim)


def without_blocks(gm: fx.GraphModule, blocks: Iterable[Block], *, free_caches: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` (same weights) in which every block of ``blocks`` is skipped; a skipped
    block's cache outputs return its cache inputs, or empty tensors with ``free_caches``."""
    variant = copy_sharing_weights(gm)
    nodes = {n.name: n for n in variant.graph.nodes}
    output = next(n for n in variant.graph.nodes if n.op == "output")
    for block in sorted(blocks, key=lambda b: b.id, reverse=True):  # outer blocks last: inner exits are gone
        exit_node, returns = nodes.get(block.exit), nodes.get(block.returns)
        if exit_node is None or returns is None:
            raise ValueError(f"block {block.id} ({block.module or 'root'}) is not in this graph")
        for grown, past, dim in block.caches:
            kept = nodes[past]
            if free_caches:
                with variant.graph.inserting_before(output):
                    empty = variant.graph.call_function(torch.ops.aten.slice.Tensor, (kept, dim, 0, 0))
                    kept = variant.graph.call_function(torch.ops.aten.clone.default, (empty,))
            output.replace_input_with(nodes[grown], kept)
        if exit_node.graph is variant.graph and exit_node.users:
            exit_node.replace_all_uses_with(returns)
    variant.graph.eliminate_dead_code()
    variant.graph.lint()
    variant.recompile()
    return variant


def same_blocks(a: tuple[Block, ...], b: tuple[Block, ...]) -> bool:
    """True when two graphs have the same blocks in the same order (ids, module paths and kinds)."""
    return [(x.id, x.module, x.kind) for x in a] == [(y.id, y.module, y.kind) for y in b]


@dataclasses.dataclass(frozen=True)
class Routing:
    """Which blocks a call skips, decided from the call's inputs: ``skipped`` whenever flat input
    ``input`` has at least ``at_least`` entries along ``dim`` (on every call when ``input`` is None).

    A subnet for VAR routes by the length of the cache: once the bridge scales are in it, later
    scales run only the kept blocks. ``free_caches``: skipped blocks return empty caches.
    """

    skipped: frozenset[int]
    free_caches: bool = False
    input: int | None = None
    dim: int = 0
    at_least: int = 0
    pass_name: str = "subnet"

    def applies(self, tensors: Sequence[torch.Tensor]) -> bool:
        if self.input is None:
            return True
        return self.input < len(tensors) and tensors[self.input].dim() > self.dim \
            and tensors[self.input].shape[self.dim] >= self.at_least

    def to_json(self) -> dict[str, object]:
        return {"skipped": sorted(self.skipped), "free_caches": self.free_caches, "input": self.input,
                "dim": self.dim, "at_least": self.at_least, "pass": self.pass_name}

    @staticmethod
    def from_json(data: dict[str, object]) -> "Routing":
        return Routing(frozenset(int(b) for b in data["skipped"]), bool(data["free_caches"]),  # type: ignore[union-attr]
                       None if data["input"] is None else int(data["input"]), int(data["dim"]),  # type: ignore[arg-type]
                       int(data["at_least"]), str(data["pass"]))  # type: ignore[arg-type]
