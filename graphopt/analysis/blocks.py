"""Residual blocks, long skip edges and stacks of repeated blocks, found from the graph's structure.

Nothing here reads module names; module paths only label what the structure found.

*Residual block.* An ``add(a, b)`` is residual when one operand is an entry ``x`` and the other, the
branch ``f``, depends on ``x`` through at least one heavy op (linear, conv, matmul, bmm, einsum with
two operands, attention). The operand that is ``x`` is either ``x`` itself (an ancestor of ``f``) or
a shortcut projection of it: one linear or 1x1 conv whose input is an ancestor of ``f``. The block's
region is every node on a path from ``x`` to the add, plus the shortcut; tensors the region reads
from outside it (conditioning, time embeddings, adaLN gates in ``x + gate * f(x)``) are its side
inputs, not part of it.

*Long skip.* An add or cat joining ``s`` with ``h``, ``s`` a strict ancestor of ``h``, is a long
(encoder-to-decoder) skip when ``s`` leaves a path that goes on past it, down to a bottleneck and back
up to ``h``. Two structural signs, either enough:

- the region between them changes resolution and comes back: it holds a resampling op (pooling,
  interpolation, pixel (un)shuffle, a strided conv) while ``s`` and ``h`` have the same spatial size
  (dims 2 onward; resampling ops are channels-first);
- ``s`` continues the main path inside that region: it is the entry of another residual block whose
  exit lies there. U-ViT, whose skips never change resolution, is found this way; a source that
  goes on into a pooling or strided conv instead is caught by the first sign.

A long skip is never a residual block: ``x + unet(x)`` is not a block of the net. An add around a
wrapped branch that merely *contains* residual blocks, such as a transformer's
``x + proj_out(blocks(proj_in(norm(x))))``, is not a skip: ``x`` reaches the inner blocks only through
the norm and the projection, so it does not continue their path. Such an add is a residual block
whose region holds the inner blocks: blocks nest, and the inner ones chain among themselves while
the wrap chains with its neighbours.

*Stack.* Residual blocks chain along the main path when one's exit reaches the next one's entry
through cheap ops only, never through a skip's source operand (a decoder block is fed by the
previous decoder block, not by the encoder block whose output it concatenates). A stack is a maximal
run of a chain that repeats a unit of ``p`` blocks at least twice with identical signatures (the
ordered op names, shapes and dtypes of each block's region without its entry); the smallest
period covering the most blocks wins, so a transformer layer (attention + MLP residuals) is a unit
of 2.
"""

from __future__ import annotations

import dataclasses

import networkx as nx

from .graph import CONVS, HEAVY, RESAMPLE, arg, common_module, in_graph_order

Signature = tuple[tuple[str, tuple[int | str, ...] | None, str | None], ...]


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    """``exit = shortcut(entry) + branch`` where ``branch`` depends on ``entry`` through heavy ops.

    ``nodes`` is the region in graph order (entry first, exit last), ``heavy_ops`` the heavy nodes
    of the branch, ``side_inputs`` the input-dependent tensors the region reads from outside it,
    ``label`` the common module path of its heavy ops (``""``: the root module).
    """

    entry: str
    exit: str
    branch: str
    shortcut: str | None
    nodes: tuple[str, ...]
    heavy_ops: tuple[str, ...]
    side_inputs: tuple[str, ...]
    label: str
    signature: Signature = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class SkipEdge:
    """A long (encoder-to-decoder) connection: ``join`` (a cat or add) reads ``source`` next to
    ``main``, which descends from ``source`` through a change of resolution and back, or through
    residual blocks that ``source`` itself enters."""

    source: str
    main: str
    join: str
    kind: str  # "concat" or "add"
    source_shape: tuple[int | str, ...] | None
    main_shape: tuple[int | str, ...] | None
    join_shape: tuple[int | str, ...] | None


@dataclasses.dataclass(frozen=True)
class Stack:
    """``count`` consecutive repeats of a unit of ``period`` residual blocks."""

    units: tuple[tuple[ResidualBlock, ...], ...]

    @property
    def period(self) -> int:
        return len(self.units[0])

    @property
    def count(self) -> int:
        return len(self.units)

    @property
    def blocks(self) -> tuple[ResidualBlock, ...]:
        return tuple(b for unit in self.units for b in unit)

    @property
    def label(self) -> str:
        return common_module(b.label for b in self.blocks)


def find_blocks(g: nx.DiGraph) -> tuple[tuple[ResidualBlock, ...], tuple[SkipEdge, ...]]:
    """Residual blocks and long skip edges (adds and cats) of the data-flow graph ``g``."""
    dependent = _input_dependent(g)
    candidates = [c for n in in_graph_order(g, g.nodes) if (c := _residual_candidate(g, n, dependent))]
    blocks, skips = [], []
    for c in candidates:
        if _is_long(g, c.entry, c.branch, set(c.nodes) - {c.entry, c.exit}, candidates):
            skips.append(_skip(g, c.entry, c.branch, c.exit, "add"))
        else:
            blocks.append(c)
    for n in in_graph_order(g, g.nodes):
        if g.nodes[n]["name"] != "cat":
            continue
        operands = [p.name for p in g.nodes[n]["fx"].args[0] if hasattr(p, "name") and p.name in g]
        for h in operands:
            ancestors = nx.ancestors(g, h)
            for s in operands:
                if s != h and s in ancestors:
                    interior = (nx.descendants(g, s) & ancestors) | {h}
                    if _is_long(g, s, h, interior, candidates):
                        skips.append(_skip(g, s, h, n, "concat"))
    skips.sort(key=lambda e: g.nodes[e.join]["index"])
    return tuple(blocks), tuple(skips)


def find_stacks(g: nx.DiGraph, blocks: tuple[ResidualBlock, ...],
                skips: tuple[SkipEdge, ...] = ()) -> tuple[Stack, ...]:
    """Maximal repeated runs of residual blocks along the main path (see the module docstring)."""
    by_exit = {b.exit: b for b in blocks}
    skip_sources = {(e.join, e.source) for e in skips}
    successor: dict[str, ResidualBlock] = {}
    chains: list[list[ResidualBlock]] = []
    chain_of: dict[str, list[ResidualBlock]] = {}
    for b in blocks:
        pred = _predecessor(g, b, by_exit, skip_sources)
        if pred is not None and pred.exit not in successor:
            successor[pred.exit] = b
            chain = chain_of[pred.exit]
            chain.append(b)
        else:
            chain = [b]
            chains.append(chain)
        chain_of[b.exit] = chain
    return tuple(s for chain in chains for s in _repeats(chain))


def _residual_candidate(g: nx.DiGraph, n: str, dependent: set[str]) -> ResidualBlock | None:
    if g.nodes[n]["name"] != "add":
        return None
    operands = [p for p in g.predecessors(n) if p in dependent]
    if len(operands) != 2:
        return None
    a, b = operands
    ancestors = {a: nx.ancestors(g, a), b: nx.ancestors(g, b)}
    found = None
    for x_op, f_op in ((a, b), (b, a)):  # x itself before a projection of x
        if x_op in ancestors[f_op]:
            found = (x_op, None, f_op)
            break
    else:
        for x_op, f_op in ((a, b), (b, a)):
            src = _projection_input(g, x_op)
            if src is not None and src in ancestors[f_op]:
                found = (src, x_op, f_op)
                break
    if found is None:
        return None
    entry, shortcut, branch = found
    region = (nx.descendants(g, entry) & ancestors[branch]) | {entry, branch, n}
    heavy = [m for m in region - {entry} if _is_heavy(g, m)]
    if not heavy:
        return None
    if shortcut is not None:
        region.add(shortcut)
    nodes = in_graph_order(g, region)
    side = {p for m in region - {entry} for p in g.predecessors(m) if p not in region and p in dependent}
    signature = tuple((g.nodes[m]["name"], g.nodes[m]["shape"], g.nodes[m]["dtype"]) for m in nodes[1:])
    label = common_module(g.nodes[m]["module"] for m in heavy + ([shortcut] if shortcut else []))
    return ResidualBlock(entry, n, branch, shortcut, nodes, in_graph_order(g, heavy),
                         in_graph_order(g, side), label, signature)


def _is_heavy(g: nx.DiGraph, n: str) -> bool:
    name = g.nodes[n]["name"]
    # A one-operand einsum only permutes or sums: layout, not a projection.
    return name in HEAVY and (name != "einsum" or len(g.nodes[n]["fx"].args[1]) >= 2)


def _projection_input(g: nx.DiGraph, n: str) -> str | None:
    """The input of ``n`` when ``n`` is a linear or a (non-transposed) 1x1 conv with constant
    weights, else None."""
    name, fx_node = g.nodes[n]["name"], g.nodes[n]["fx"]
    if name != "linear" and (name not in CONVS or "transpose" in name
                             or name.endswith("convolution") and bool(arg(fx_node, 6, "transposed", False))):
        return None
    weight = fx_node.args[1].name
    if any(g.nodes[p]["op"] == "placeholder" for p in nx.ancestors(g, weight) | {weight}):
        return None
    if name != "linear" and any(k != 1 for k in g.nodes[weight]["shape"][2:]):
        return None
    return fx_node.args[0].name


def _is_resampling(g: nx.DiGraph, n: str) -> bool:
    name = g.nodes[n]["name"]
    if name in RESAMPLE:
        return True
    if name in CONVS:
        stride = arg(g.nodes[n]["fx"], 3, "stride", 1)
        return any(s != 1 for s in (stride if isinstance(stride, list | tuple) else [stride]))
    return False


def _is_long(g: nx.DiGraph, s: str, h: str, interior: set[str], candidates: list[ResidualBlock]) -> bool:
    """Whether ``s`` joined to ``h`` across ``interior`` is a long skip (see the module docstring)."""
    s_shape, h_shape = g.nodes[s]["shape"], g.nodes[h]["shape"]
    same_resolution = s_shape is not None and h_shape is not None and s_shape[2:] == h_shape[2:]
    if same_resolution and any(_is_resampling(g, m) for m in interior):
        return True
    # A residual wrap's input feeds a norm and a projection, not the inner blocks themselves.
    return any(c.entry == s and c.exit in interior for c in candidates)


def _skip(g: nx.DiGraph, s: str, h: str, join: str, kind: str) -> SkipEdge:
    return SkipEdge(s, h, join, kind, g.nodes[s]["shape"], g.nodes[h]["shape"], g.nodes[join]["shape"])


def _input_dependent(g: nx.DiGraph) -> set[str]:
    """Nodes whose data depends on a graph input: parameters and constants are not operands of note."""
    placeholders = [n for n, d in g.nodes(data=True) if d["op"] == "placeholder"]
    return set(placeholders).union(*(nx.descendants(g, p) for p in placeholders))


def _predecessor(g: nx.DiGraph, block: ResidualBlock, by_exit: dict[str, ResidualBlock],
                 skip_sources: set[tuple[str, str]]) -> ResidualBlock | None:
    """The latest block whose exit reaches ``block.entry`` through cheap ops, skip sources excluded."""
    found: list[str] = []
    stack, seen = [block.entry], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in by_exit and n != block.exit:
            found.append(n)
            continue
        if _is_heavy(g, n) or g.nodes[n]["op"] != "call_function":
            continue
        stack.extend(p for p in g.predecessors(n) if (n, p) not in skip_sources)
    if not found:
        return None
    return by_exit[max(found, key=lambda e: g.nodes[e]["index"])]


def _repeats(chain: list[ResidualBlock]) -> list[Stack]:
    """Greedy left-to-right cover of a chain by runs ``u, u, ..., u`` of at least two units."""
    sigs = [b.signature for b in chain]
    stacks, i = [], 0
    while i < len(chain):
        best_p, best_k = 0, 1
        for p in range(1, (len(chain) - i) // 2 + 1):
            k = 1
            while sigs[i + k * p:i + (k + 1) * p] == sigs[i:i + p]:
                k += 1
            if k >= 2 and k * p > best_p * best_k:
                best_p, best_k = p, k
        if best_p:
            stacks.append(Stack(tuple(tuple(chain[i + u * best_p:i + (u + 1) * best_p]) for u in range(best_k))))
            i += best_p * best_k
        else:
            i += 1
    return stacks
