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

Self- or cross-attention is decided from the data flow, never from module names. The *input* of a
stream (``q_input``, ``kv_input``) is the tensor its projection reads, walked back through the same
layout ops; for a fused qkv the two are one node. Where a source is no projection, the source itself
stands in for its input (and the field is None). The *root* of an input is reached by walking further
back through layout ops and the norms ``layer_norm``, ``group_norm`` and ``rms_norm``, so ``norm1(x)``
and ``norm2(x)`` share the root ``x``. ``b`` is *derived from* ``a`` when ``a == b`` or every data path
from a graph input (placeholder) to ``b`` passes through ``a`` (parameters and constants are not
inputs: ``a`` dominates ``b`` on the inputs' paths). A site is self-attention when the key and value
inputs are both derived from the query input's root, or the query input is derived from both the key
and the value input's roots; otherwise it is cross-attention.

So queries and keys/values read from one hidden state (or one from a norm, a pooling or a strided
conv of the other: KV compression) are self-attention, while keys/values from a text context passed
in as an input, or from any projection of it, are cross-attention: a path from the context input
reaches them without passing through the query stream. Keys/values that mix the stream with a
context (``cat([x, context])``) are cross by this rule, and so are joint attentions whose q and k/v
sources are concatenations of per-stream projections rather than projections (neither
concatenation is derived from the other): where the structure is ambiguous the answer errs towards
"cross", which a substitution pass leaves alone by default.
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
# Norms that keep the token sequence: walked through when comparing the query and key/value streams.
_NORMS = frozenset({"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
                    "_fused_rms_norm"})

Size = int | str


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention computation.

    ``node`` is the op producing the attention output (the SDPA call, or the ``p @ v`` matmul) and
    ``nodes`` the core ops (scores, rescale, softmax, output). ``q``/``k``/``v`` are their source
    nodes, ``fused_qkv`` whether all three come from one projection, ``out_proj`` the output
    projection. ``heads``, ``seq_len`` (queries), ``kv_len`` (keys) and ``head_dim`` are None when
    the shapes do not tell. ``q_input`` and ``kv_input`` are the tensors the query and key
    projections read, through layout ops (equal for a fused qkv; None where a source is no
    projection); ``cross`` is True when keys and values are not derived from the query stream, which
    also weighs the value projection's input (the module docstring gives the rule).
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
    q_input: str | None = None
    kv_input: str | None = None
    cross: bool = False


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
    q_in, k_in, v_in = (_projection_input(g, x) for x in (q, k, v))
    return AttentionSite(kind, node, nodes, q, k, v, fused, _out_projection(g, node),
                         _heads(scores_shape[:-2], batch_symbol), scores_shape[-2], scores_shape[-1], head_dim,
                         common_module(g.nodes[m]["module"] for m in nodes), q_in, k_in,
                         _is_cross(g, q_in or q, k_in or k, v_in or v))


def _name(g: nx.DiGraph, n: str) -> str:
    return g.nodes[n]["name"]


def _operands(node: fx.Node) -> list[fx.Node]:
    """The two matrix operands of a matmul-like node (einsum's operand list; baddbmm's last two)."""
    if op_name(node) == "einsum":
        return list(node.args[1])
    return [a for a in node.args if isinstance(a, fx.Node)][-2:]


def passes_through(node: fx.Node) -> bool:
    """A layout op, cast or scalar rescale: what may lie between a projection and the attention that
    reads it (the analysis walks back through these to find q, k and v; the passes walk them too)."""
    return op_name(node) in LAYOUT or op_name(node) in _CASTS or is_scalar_scale(node)


def _source(g: nx.DiGraph, n: str) -> str:
    """Walk back from ``n`` through layout ops, casts and scalar rescales to the op that made the data."""
    node = g.nodes[n]["fx"]
    while passes_through(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.name


def _projection_input(g: nx.DiGraph, n: str) -> str | None:
    """The tensor the projection ``n`` reads, walked back through layout ops: the input argument of a
    linear or conv (it may be a parameter: learned queries), addmm's middle operand, else the first
    operand that is not a parameter (through layout ops, so ``t(weight)`` is one); None when ``n`` is
    no projection."""
    name, node = _name(g, n), g.nodes[n]["fx"]
    if name not in _PROJECTIONS:
        return None
    position = 1 if name == "addmm" else 0 if name == "linear" or name in CONVS else None
    if position is not None:
        data = node.args[position] if len(node.args) > position else None
        return _source(g, data.name) if isinstance(data, fx.Node) and data.name in g else None
    for operand in node.all_input_nodes:
        if operand.name in g and not g.nodes[_source(g, operand.name)]["parameter"]:
            return _source(g, operand.name)
    return None


def _root(g: nx.DiGraph, n: str) -> str:
    """Walk back from ``n`` through layout ops and token-preserving norms to the stream they normalise."""
    node = g.nodes[n]["fx"]
    while _name(g, node.name) in _NORMS and node.args and isinstance(node.args[0], fx.Node):
        node = g.nodes[_source(g, node.args[0].name)]["fx"]
    return node.name


def _derived_from(g: nx.DiGraph, root: str, n: str) -> bool:
    """``n`` is ``root``, or every data path from a graph input to ``n`` passes through ``root``
    (``root`` dominates ``n`` on the inputs' paths; parameters and constants are not inputs)."""
    if n == root:
        return True
    ancestors = nx.ancestors(g, n)
    if root not in ancestors:
        return False
    bypass = nx.ancestors(g.subgraph((ancestors - {root}) | {n}), n)
    return not any(g.nodes[a]["op"] == "placeholder" for a in bypass)


def _is_cross(g: nx.DiGraph, q_in: str, k_in: str, v_in: str) -> bool:
    """Keys/values not derived from the query stream, nor the queries from theirs (see the module
    docstring); the arguments are the projection inputs, or the sources where there is no projection."""
    if q_in == k_in == v_in:
        return False
    q_root = _root(g, q_in)
    if _derived_from(g, q_root, k_in) and _derived_from(g, q_root, v_in):
        return False
    return not (_derived_from(g, _root(g, k_in), q_in) and _derived_from(g, _root(g, v_in), q_in))


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
