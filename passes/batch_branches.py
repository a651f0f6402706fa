"""batch-branches: one batched op for the same op repeated in independent branches.

Where it belongs: after merge-linears (whose column blocks it reads as one batched tensor without a
copy) and before dce, which drops the per-branch weights it stacked.

A third-party DiT written as diffusers writes it conditions every block on its own: each block embeds
the timestep with an MLP and the class label with a table of its own, adds them, and computes its
adaLN modulation from that (``silu``, a linear, six chunks, ``1 + scale``). After cse and merge-linears
the first MLP layer is one matmul for all blocks, but each block still runs its second layer, its
embedding lookup, the add, the SiLU, its modulation linear and the ``1 + scale`` adds: a dozen small
ops per block, 12 (DiT-S/2) to 28 (DiT-XL/2) times, each costing a launch on a GPU and a dispatch on a
CPU for a few rows of work. Those copies read different tensors, so merge-linears cannot merge them;
they are the same op on same-shaped operands in independent branches, so they can run as one op on
the branches stacked along a new leading dimension (batching, as a vectorizing compiler does it):

* linears of 2-D inputs with weights of one shape: one ``bmm`` of the stacked inputs with the weights
  stacked ahead of time, ``[G, K, N]``, then one add of the stacked biases (zeros for a linear without;
  ``baddbmm`` has no fake kernel for a symbolic batch). Inputs that are adjacent column blocks of one
  width of one tensor (merge-linears' slices) are that tensor viewed as ``[G, M, K]`` (no copy);
  inputs that are branches of an earlier batch are its value (or a slice of its branches); others
  are stacked (one copy of a few rows).
* embedding lookups of one index tensor in tables of one shape: one lookup in the tables concatenated
  along the features, viewed as ``[G, ..., D]``.
* from there, what the branches do alike with their batched values: elementwise ops (whose other
  operands are one node or constant for every branch, of no higher rank), views (chunk, split,
  getitem, unsqueeze, squeeze, slicing, select, transpose: their dimension moved by one) and further
  linears.

Branches must be independent: a batch is formed only if no branch reads another's result, directly
or through anything else (batches formed before included), which also keeps the graph acyclic.
Where a branch's value is read outside the batches (the DiT's modulation read by its block's token
path), it is ``select(batched, 0, i)``, a view; a branch whose value is a list (a chunk) read
outside is kept as it was, on its operands' selects. Each batched op computes what each branch
computed, elementwise ops bit for bit and matmuls the same dot products summed in whatever order the
batched kernel picks: exact within the dtype's tolerance, as merge-linears is. Hits count branches
by op; the note lists the batches (``2 x linear (12 branches)``).
"""

from __future__ import annotations

import heapq
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from graphopt.fxgraph import refresh_values
from graphopt.pipeline import Pass, PassContext

from ._common import new_buffer, shape_of, val, value_shape
from ._substitution import MODULE_META, attribute

aten = torch.ops.aten

_POINTWISE = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar, aten.neg.default,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.to.dtype,
    aten._to_copy.default})
"""Elementwise ops a batch runs on its branches stacked: op(stack(x_i)) == stack(op(x_i))."""

_VIEW_DIMS: dict[Any, tuple[tuple[int, int | None], ...]] = {
    aten.unsqueeze.default: ((1, None),), aten.chunk.default: ((2, 0),), aten.split.Tensor: ((2, 0),),
    aten.split_with_sizes.default: ((2, 0),), aten.slice.Tensor: ((1, 0),), aten.select.int: ((1, None),),
    aten.transpose.int: ((1, None), (2, None)), aten.squeeze.dim: ((1, None),)}
"""Views of one tensor and their dimension arguments: (position, default or None if required)."""


@dataclass
class _Batch:
    """Branches (nodes of one op) run as one batched op; branch i is ``select(value, 0, i)``."""

    members: list[fx.Node]
    value: fx.Node | None = None
    """The batched node, once written."""
    slices: dict[tuple[int, int], fx.Node] = field(default_factory=dict)


def _hashable(a: Any) -> Any:
    return tuple(_hashable(x) for x in a) if isinstance(a, (list, tuple)) else a


def _rank(node: fx.Node) -> int:
    return val(node).dim()


def _key(node: fx.Node, where: dict[fx.Node, tuple[_Batch, int]], gm: fx.GraphModule) -> tuple | None:
    """What nodes must share to be batched together (None: this node cannot be), given the batches
    formed so far: the op, each argument's kind (batched, per-branch weight, one node for all,
    constant) and the output's shape."""
    if node.op != "call_function" or not node.users or node.kwargs and node.target not in _POINTWISE:
        return None  # (an unread node is dce's to drop, not a branch to batch)
    target = node.target
    if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    seed = target in (aten.linear.default, aten.embedding.default)
    if not (seed or target in _POINTWISE or target in _VIEW_DIMS or target is operator.getitem):
        return None
    out = val(node)
    out_shape = shape_of(node) if isinstance(out, torch.Tensor) else tuple(
        value_shape(v) for v in out) if isinstance(out, (tuple, list)) else None
    if out_shape is None or (isinstance(out, torch.Tensor) and out.dim() == 0):
        return None
    parts: list[Any] = []
    batched = False
    args = node.args
    if target is aten.linear.default:  # a missing bias is a zero one: linears with and without batch together
        args = (*args[:2], args[2] if len(args) > 2 else None)
    for i, a in enumerate(args):
        if target is aten.linear.default and i == 2:  # stacked with zeros of the weights' dtype
            if a is not None and (a.op != "get_attr" or attribute(gm, str(a.target)).dtype != parts[1][2]):
                return None
            continue
        if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return None
        if not isinstance(a, fx.Node):
            parts.append(("const", _hashable(a)))
        elif a in where:
            if target in _POINTWISE and shape_of(a) != out_shape:
                return None  # a batched operand broadcast against the others would misalign the branches
            if target is aten.embedding.default or (target is aten.linear.default and i > 0):
                return None
            parts.append(("batched", id(where[a][0])))
            batched = True
        elif (target is aten.linear.default and i in (1, 2)) or (target is aten.embedding.default and i == 0):
            if a.op != "get_attr":
                return None
            w = attribute(gm, str(a.target))
            if not isinstance(w, torch.Tensor):
                return None
            parts.append(("weight", tuple(w.shape), w.dtype, w.device))
        elif target is aten.linear.default and i == 0:
            parts.append(("input", shape_of(a), val(a).dtype if isinstance(val(a), torch.Tensor) else None))
        else:
            v = val(a)
            if target in _POINTWISE and isinstance(v, torch.Tensor) and isinstance(out, torch.Tensor) \
                    and v.dim() > out.dim():
                return None
            parts.append(("shared", a))
    if target is aten.linear.default and (not isinstance(val(node.args[0]), torch.Tensor)
                                          or _rank(node.args[0]) != 2):
        return None  # a few rows per branch: the case stacking pays for, and what bmm takes
    if not (batched or seed):
        return None
    kwargs = tuple(sorted((k, _hashable(v)) for k, v in node.kwargs.items()))
    return target, tuple(parts), kwargs, out_shape


def _column_blocks(inputs: list[fx.Node]) -> tuple[fx.Node, int, int] | None:
    """(tensor, first column, width) when ``inputs`` are adjacent column blocks of one width of one
    2-D tensor, in order; else None."""
    if not all(x.op == "call_function" and x.target is aten.slice.Tensor for x in inputs):
        return None
    base = inputs[0].args[0]
    bounds = []
    for x in inputs:
        args = list(x.args) + [0, None, None, 1][len(x.args) - 1:]
        tensor, dim, start, end, step = args[:5]
        if tensor is not base or dim not in (1, -1) or step != 1 or not isinstance(start, int) \
                or not isinstance(end, int):
            return None
        bounds.append((start, end))
    width = bounds[0][1] - bounds[0][0]
    columns = val(base).shape[-1]
    if not isinstance(columns, int) or width <= 0 or any(
            s != bounds[0][0] + i * width or e != s + width or e > columns for i, (s, e) in enumerate(bounds)):
        return None
    return base, bounds[0][0], width  # type: ignore[return-value]


def _order(bucket: list[fx.Node], where: dict[fx.Node, tuple[_Batch, int]]) -> list[list[fx.Node]]:
    """The bucket's nodes in branch order, split into runs that can form one batch: consecutive
    branches of every batched operand (then a batched operand is its batch, or a slice of it)."""
    first = bucket[0]
    positions = [i for i, a in enumerate(first.args) if isinstance(a, fx.Node) and a in where]
    if not positions:
        if first.target is aten.linear.default:
            inputs = [n.args[0] for n in bucket]
            if len(set(inputs)) < len(inputs):
                return []  # one input read twice: merge-linears' case, not a batch's
            if all(x.target is aten.slice.Tensor and len(x.args) > 2 and isinstance(x.args[2], int) for x in inputs):
                blocks = sorted(bucket, key=lambda n: n.args[0].args[2])
                if _column_blocks([n.args[0] for n in blocks]) is not None:
                    return [blocks]
        return [bucket]
    p = positions[0]
    ordered = sorted(bucket, key=lambda n: where[n.args[p]][1])
    runs: list[list[fx.Node]] = []
    for node in ordered:
        run = runs[-1] if runs else None
        if run is not None and all(where[node.args[q]][1] == where[run[-1].args[q]][1] + 1 for q in positions):
            run.append(node)
        else:
            runs.append([node])
    # a slice of a batch of lists (chunks) is no batch: only a run over all of it reads one
    whole = [q for q in positions if not isinstance(val(first.args[q]), torch.Tensor)]
    return [r for r in runs if len(r) > 1 and all(len(r) == len(where[r[0].args[q]][0].members) for q in whole)]


class _Quotient:
    """The data-flow graph with each batch as one vertex, to refuse a batch that would close a cycle."""

    def __init__(self, graph: fx.Graph):
        self.g = nx.DiGraph()
        for node in graph.nodes:
            self.g.add_node(node)
            self.g.add_edges_from((src, node) for src in node.all_input_nodes)

    def _after(self, sources: set[Any]) -> set[Any]:
        """Every vertex a path from ``sources`` reaches."""
        seen: set[Any] = set()
        frontier = [n for s in sources for n in self.g.successors(s)]
        while frontier:
            node = frontier.pop()
            if node not in seen:
                seen.add(node)
                frontier.extend(self.g.successors(node))
        return seen

    def contract(self, batch: _Batch) -> bool:
        """Make ``batch`` one vertex, unless one branch depends on another (then the graph is left as
        it was and False returned): a path that leaves the batch and comes back to it leads from one
        branch to another, so this is also what keeps the graph of batches acyclic."""
        members = set(batch.members)
        if self._after(members) & members:
            return False  # one branch reads another, directly or through anything, batches included
        token = ("batch", id(batch))
        edges = [(p, token) for m in members for p in self.g.predecessors(m)]
        edges += [(token, s) for m in members for s in self.g.successors(m)]
        self.g.remove_nodes_from(members)
        self.g.add_node(token)
        self.g.add_edges_from(edges)
        return True


def _plan(gm: fx.GraphModule) -> list[_Batch]:
    """The batches, producers first: each round forms the earliest bucket of alike nodes that can
    be batched, since its batch may make its readers alike (their operands become one batch)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    where: dict[fx.Node, tuple[_Batch, int]] = {}
    batches: list[_Batch] = []
    quotient = _Quotient(gm.graph)
    refused: set[frozenset[fx.Node]] = set()
    while True:
        buckets: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node not in where:
                key = _key(node, where, gm)
                if key is not None:
                    buckets[key].append(node)
        formed = False
        for bucket in sorted((b for b in buckets.values() if len(b) > 1), key=lambda b: index[b[0]]):
            for run in _order(bucket, where):
                if frozenset(run) in refused:
                    continue
                batch = _Batch(run)
                if not quotient.contract(batch):
                    refused.add(frozenset(run))
                    continue
                batches.append(batch)
                for i, m in enumerate(run):
                    where[m] = (batch, i)
                formed = True
                break
            if formed:
                break
        if not formed:
            return batches


class _Writer:
    """Writes each batch's op (in an order that respects the data flow) and its branches' selects."""

    def __init__(self, gm: fx.GraphModule, batches: list[_Batch]):
        self.gm, self.graph = gm, gm.graph
        self.where = {m: (b, i) for b in batches for i, m in enumerate(b.members)}
        self.output = next(n for n in self.graph.nodes if n.op == "output")

    def call(self, target: Any, *args: Any, anchor: fx.Node, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.output):
            node = self.graph.call_function(target, args, kwargs)
        for key in MODULE_META:
            if key in anchor.meta:
                node.meta[key] = anchor.meta[key]
        return node

    def constant(self, stem: str, value: torch.Tensor) -> fx.Node:
        name = new_buffer(self.gm, stem, value)
        with self.graph.inserting_before(self.output):
            return self.graph.get_attr(name)

    def operand(self, branches: list[fx.Node]) -> fx.Node:
        """The batched value of ``branches`` (consecutive branches of one written batch)."""
        batch, first = self.where[branches[0]]
        assert batch.value is not None
        if len(branches) == len(batch.members):
            return batch.value
        span = (first, first + len(branches))
        if span not in batch.slices:
            batch.slices[span] = self.call(aten.slice.Tensor, batch.value, 0, *span, anchor=branches[0])
        return batch.slices[span]

    def write(self, batch: _Batch) -> None:
        members, first = batch.members, batch.members[0]
        target, g = first.target, len(batch.members)
        arg = lambda i: [m.args[i] for m in members]  # noqa: E731 - the i-th argument of every branch
        if target is aten.linear.default:
            batch.value = self._linear(members, arg)
        elif target is aten.embedding.default:
            table = self.constant("_batched_", torch.cat([attribute(self.gm, str(w.target)).detach()
                                                          for w in arg(0)], dim=-1))
            looked = self.call(aten.embedding.default, table, *first.args[1:], anchor=first)
            rank = _rank(first)
            split = self.call(aten.unflatten.int, looked, -1, [g, val(first).shape[-1]], anchor=first)
            batch.value = self.call(aten.permute.default, split, [rank - 1, *range(rank - 1), rank], anchor=first)
        else:
            args = []
            for i, a in enumerate(first.args):
                args.append(self.operand(arg(i)) if isinstance(a, fx.Node) and a in self.where else a)
            if target in _VIEW_DIMS:
                rank = _rank(first.args[0])
                for position, default in _VIEW_DIMS[target]:
                    if position >= len(args):
                        args.append(default)
                    dim = args[position]
                    limit = rank + 1 if target is aten.unsqueeze.default else rank
                    args[position] = dim + 1 if 0 <= dim < limit else dim
            batch.value = self.call(target, *args, anchor=first, **first.kwargs)

    def _linear(self, members: list[fx.Node], arg: Any) -> fx.Node:
        first, g = members[0], len(members)
        inputs = arg(0)
        if inputs[0] in self.where:
            x = self.operand(inputs)
        elif (blocks := _column_blocks(inputs)) is not None:
            base, start, width = blocks
            if start or start + g * width != val(base).shape[-1]:
                base = self.call(aten.slice.Tensor, base, -1, start, start + g * width, anchor=first)
            split = self.call(aten.unflatten.int, base, -1, [g, width], anchor=first)
            x = self.call(aten.permute.default, split, [1, 0, 2], anchor=first)
        else:
            x = self.call(aten.stack.default, inputs, 0, anchor=first)
        weights = torch.stack([attribute(self.gm, str(w.target)).detach().t() for w in arg(1)]).contiguous()
        w = self.constant("_batched_", weights)
        biases = [attribute(self.gm, str(m.args[2].target)).detach() if len(m.args) > 2 and m.args[2] is not None
                  else None for m in members]
        if any(b is not None for b in biases):
            zero = next(b for b in biases if b is not None).new_zeros(weights.shape[-1])
            bias = torch.stack([zero if b is None else b for b in biases]).unsqueeze(1)
            product = self.call(aten.bmm.default, x, w, anchor=first)
            return self.call(aten.add.Tensor, product, self.constant("_batched_", bias), anchor=first)
        return self.call(aten.bmm.default, x, w, anchor=first)


def _stable_toposort(graph: fx.Graph, rank: dict[fx.Node, float]) -> None:
    """Reorder ``graph`` so that every node follows its inputs, otherwise in ``rank``'s order."""
    nodes = list(graph.nodes)
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(rank[n], i, n) for i, n in enumerate(nodes) if not waiting[n]]
    tie = {n: i for i, n in enumerate(nodes)}
    heapq.heapify(ready)
    order = []
    while ready:
        node = heapq.heappop(ready)[2]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (rank[user], tie[user], user))
    if len(order) != len(nodes):
        raise AssertionError("batch-branches wrote a cycle")
    cursor = order[0]
    for node in order[1:]:
        cursor.append(node)
        cursor = node


def _op(node: fx.Node) -> str:
    return "getitem" if node.target is operator.getitem else str(node.target).split(".")[1]


def _batch_branches(gm: fx.GraphModule, ctx: PassContext) -> None:
    batches = _plan(gm)
    if not batches:
        return
    rank = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    writer = _Writer(gm, batches)
    written: set[int] = set()
    pending = sorted(batches, key=lambda b: min(rank[m] for m in b.members))
    while pending:  # producers first: a batch's batched operands must be written before it
        batch = next(b for b in pending if all(
            id(writer.where[a][0]) in written for m in b.members for a in m.all_input_nodes if a in writer.where))
        writer.write(batch)
        written.add(id(batch))
        pending.remove(batch)
    grouped = set(writer.where)
    # Each branch's value, where something outside the batches reads it: select(batch, 0, i). A branch
    # whose value is not a tensor (chunk's list) is kept as it was, reading its operands' selects.
    kept: set[fx.Node] = set()
    outside = lambda u: u not in grouped or u in kept  # noqa: E731
    for member in sorted(grouped, key=lambda n: -rank[n]):
        if not any(outside(u) for u in member.users):
            continue
        batch, i = writer.where[member]
        if isinstance(val(member), torch.Tensor):
            branch = writer.call(aten.select.int, batch.value, 0, i, anchor=member)
            member.replace_all_uses_with(branch, delete_user_cb=outside)
        else:
            kept.add(member)
    for member in sorted(grouped - kept, key=lambda n: -rank[n]):
        if not member.users:
            gm.graph.erase_node(member)
    for node in gm.graph.nodes:  # a new node right after its last operand
        if node not in rank:
            rank[node] = max((rank[a] for a in node.all_input_nodes), default=0.0) + 1e-3
    _stable_toposort(gm.graph, rank)
    gm.graph.lint()
    gm.recompile()
    refresh_values(gm)
    counts: dict[str, list[int]] = defaultdict(list)
    for batch in batches:
        ctx.hit(_op(batch.members[0]), len(batch.members))
        counts[_op(batch.members[0])].append(len(batch.members))
    ctx.note("batched: " + ", ".join(f"{len(sizes)} x {op} ({'/'.join(map(str, sorted(set(sizes))))} branches)"
                                     for op, sizes in counts.items()))


BATCH_BRANCHES = Pass("batch-branches", exact=True, transform=_batch_branches, doc=__doc__ or "")
