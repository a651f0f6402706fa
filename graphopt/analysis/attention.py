"""Attention sites: fused ``scaled_dot_product_attention`` calls and softmax(QK^T)V written out.

The explicit form is ``scores = matmul(q, k)`` (matmul, bmm, baddbmm or einsum), an optional
rescale by a number (``mul``/``div``) and mask (an added bias, ``masked_fill``, ``where``),
``p = softmax(scores)``, then ``out = matmul(p, v)``. For either kind the query, key and value
sources are found by walking back from the operands through layout ops (view, reshape, permute,
transpose, (un)squeeze, select, slice, unbind/chunk/split and their getitems, unflatten, flatten,
contiguous, clone, expand) and scalar rescales, to the op that produced them, usually a projection;
q, k and v sharing one projection is a fused qkv. The output projection is the first linear or conv
reached from the output through layout ops.

Heads come from the shapes: a 4-d ``[N, H, L, E]`` layout gives ``H``; a 3-d ``[N*H, L, E]`` layout
gives ``H`` when the leading size is an integer multiple of the batch symbol.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import sympy
from torch import fx

from .graph import CONVS, LAYOUT, SDPA, common_module, in_graph_order, is_scalar_scale, op_name

_SCORES = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm"})
_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
_CASTS = frozenset({"to", "_to_copy", "type_as", "dropout"})
_MASKING = frozenset({"add", "masked_fill", "where"})
_PROJECTIONS = frozenset({"linear", "addmm", "mm", "matmul", "einsum"}) | CONVS

Size = int | str


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention computation.

    ``node`` is the op producing the attention output (the SDPA call, or the ``p @ v`` matmul) and
    ``nodes`` the core ops (scores, rescale, softmax, output). ``q``/``k``/``v`` are their source
    nodes, ``fused_qkv`` whether all three come from one projection, ``out_proj`` the output
    projection. ``heads``, ``seq_len`` (queries), ``kv_len`` (keys) and ``head_dim`` are None when
    the shapes do not tell.
    """

    kind: str  # "sdpa" or "softmax"
    node: str
    nodes: tuple[str, ...]
    q: str
    k: str
    v: str
    fused_qkv: bool
    out_proj: str | None
    heads: int | None
    seq_len: Size | None
    kv_len: Size | None
    head_dim: Size | None
    label: str


def find_attention(g: nx.DiGraph, batch_symbol: str | None = None) -> tuple[AttentionSite, ...]:
    """All attention sites of the data-flow graph ``g``, in graph order."""
    sites = []
    for n in in_graph_order(g, g.nodes):
        name = g.nodes[n]["name"]
        if name in SDPA:
            q, k, v = (a.name for a in g.nodes[n]["fx"].args[:3])
            q_shape, k_shape = g.nodes[q]["shape"], g.nodes[k]["shape"]
            sites.append(_site(g, "sdpa", n, (n,), (q, k, v), q_shape[:-1] + k_shape[-2:-1], q_shape[-1],
                               batch_symbol))
        elif name in _SOFTMAX and (site := _softmax_site(g, n, batch_symbol)) is not None:
            sites.append(site)
    return tuple(sites)


def _softmax_site(g: nx.DiGraph, softmax: str, batch_symbol: str | None) -> AttentionSite | None:
    core = [softmax]
    scores = _scores(g, g.nodes[softmax]["fx"].args[0], core)
    if scores is None:
        return None
    out, p = _consumer_matmul(g, softmax)
    if out is None:
        return None
    q, k, head_dim = _query_key(g, scores)
    v = next((o for o in _operands(out) if o is not p), None)
    if q is None or k is None or v is None:
        return None
    nodes = in_graph_order(g, core + [scores.name, out.name])
    return _site(g, "softmax", out.name, nodes, (q.name, k.name, v.name), g.nodes[scores.name]["shape"],
                 head_dim, batch_symbol)


def _scores(g: nx.DiGraph, node: fx.Node, core: list[str]) -> fx.Node | None:
    """The QK^T matmul under ``node``, through scalar rescales, casts and masking (an added bias,
    masked_fill, where); the nodes passed are appended to ``core``."""
    name = _name(g, node.name)
    if name in _SCORES:
        return node
    if is_scalar_scale(node) or name in _CASTS:
        candidates = node.args[:1]
    elif name in _MASKING:
        candidates = [a for a in node.args if isinstance(a, fx.Node)]
    else:
        return None
    for candidate in candidates:
        if isinstance(candidate, fx.Node) and (found := _scores(g, candidate, core)) is not None:
            core.append(node.name)
            return found
    return None


def _site(g: nx.DiGraph, kind: str, node: str, nodes: tuple[str, ...], qkv: tuple[str, str, str],
          scores_shape: tuple[Size, ...], head_dim: Size | None, batch_symbol: str | None) -> AttentionSite:
    """The site around ``node``; ``scores_shape`` is the shape of QK^T, ``[..., L, S]``."""
    q, k, v = (_source(g, x) for x in qkv)
    fused = q == k == v and g.nodes[q]["name"] in _PROJECTIONS
    return AttentionSite(kind, node, nodes, q, k, v, fused, _out_projection(g, node),
                         _heads(scores_shape[:-2], batch_symbol), scores_shape[-2], scores_shape[-1], head_dim,
                         common_module(g.nodes[m]["module"] for m in nodes))


def _name(g: nx.DiGraph, n: str) -> str:
    return g.nodes[n]["name"]


def _operands(node: fx.Node) -> list[fx.Node]:
    """The two matrix operands of a matmul-like node (einsum's operand list; baddbmm's last two)."""
    if op_name(node) == "einsum":
        return list(node.args[1])
    return [a for a in node.args if isinstance(a, fx.Node)][-2:]


def _source(g: nx.DiGraph, n: str) -> str:
    """Walk back from ``n`` through layout ops and scalar rescales to the op that made the data."""
    node = g.nodes[n]["fx"]
    while (_name(g, node.name) in LAYOUT or is_scalar_scale(node) or _name(g, node.name) in _CASTS) \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.name


def _consumer_matmul(g: nx.DiGraph, softmax: str) -> tuple[fx.Node | None, fx.Node | None]:
    """The first matmul reached from the softmax through layout ops, and the operand it reads."""
    frontier = [g.nodes[softmax]["fx"]]
    while frontier:
        node = frontier.pop(0)
        for user in sorted(node.users, key=lambda u: g.nodes[u.name]["index"] if u.name in g else -1):
            if user.name not in g:
                continue
            if _name(g, user.name) in _SCORES and node in _operands(user):
                return user, node
            if _name(g, user.name) in LAYOUT or _name(g, user.name) in _CASTS or is_scalar_scale(user):
                frontier.append(user)
    return None, None


def _query_key(g: nx.DiGraph, scores: fx.Node) -> tuple[fx.Node | None, fx.Node | None, Size | None]:
    """(q, k, contracted size) of ``scores``: for einsum, q is the operand carrying the output's
    query index (second to last) and k the one carrying the key index (last)."""
    ops = _operands(scores)
    if len(ops) != 2:
        return None, None, None
    if _name(g, scores.name) != "einsum":
        a, b = ops
        return a, b, g.nodes[a.name]["shape"][-1]
    lhs, _, rhs = scores.args[0].replace(" ", "").partition("->")
    terms = lhs.split(",")
    q_index = 0
    if len(rhs) >= 2 and "..." not in scores.args[0]:
        query, key = rhs[-2], rhs[-1]
        q_index = 1 if query in terms[1] and key not in terms[1] else 0
    q, k = ops[q_index], ops[1 - q_index]
    contracted = [c for c in terms[q_index] if c.isalpha() and c not in rhs]
    head_dim = g.nodes[q.name]["shape"][terms[q_index].index(contracted[0])] \
        if len(contracted) == 1 and "..." not in terms[q_index] else None
    return q, k, head_dim


def _out_projection(g: nx.DiGraph, n: str) -> str | None:
    frontier, seen = [n], set()
    while frontier:
        cur = frontier.pop(0)
        for user in in_graph_order(g, g.successors(cur)):
            if user in seen:
                continue
            seen.add(user)
            name = _name(g, user)
            if name == "linear" or name in CONVS:
                return user
            if name in LAYOUT or name in _CASTS or is_scalar_scale(g.nodes[user]["fx"]):
                frontier.append(user)
    return None


def _heads(lead: tuple, batch_symbol: str | None) -> int | None:
    """Heads from the dims before [L, S] (or [L, E]): ``[N, H]`` gives H; ``[N*H]`` gives H when N is
    the batch symbol."""
    if len(lead) >= 2:
        return lead[-1] if isinstance(lead[-1], int) else None
    if len(lead) == 1 and batch_symbol is not None and isinstance(lead[0], str):
        ratio = sympy.sympify(lead[0]) / sympy.Symbol(batch_symbol)
        return int(ratio) if ratio.is_Integer else None
    return None
