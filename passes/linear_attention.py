"""linear-attention: LiT's ReLU linear attention with a depthwise-conv branch at every attention site.

Approximate. At each self-attention site the structural analysis finds (a fused
``scaled_dot_product_attention`` call, or softmax(QK^T)V written out with ``matmul``/``bmm`` in
either the ``P @ V`` or the channels-first ``V @ P^T`` layout, or with two einsums; fused or separate
q/k/v projections, heads split or folded into the batch)
the softmax core becomes ``graphopt::linear_attention(q, k, v, eps, dwc_weight, dwc_bias)``: the
linear attention plus a depthwise convolution (kernel 5 by default) on V in its H x W token layout,
added before the output projection (arXiv 2501.12976), both in the one op. The branch
used to be separate ATen nodes (V permuted and reshaped, conv2d, permuted back, add); in the op it is
the epilogue of the op's Triton kernel on the GPU (one launch, no V copies; not yet measured), the
same ATen ops on the CPU. The scores' rescale is dropped: ReLU linear attention is
invariant to it. Everything else in the graph is inherited; the q/k/v projections and the
depthwise conv are freshly initialised (seeded), as LiT does, and the output projection is
inherited unless asked otherwise. A projection other layers read too is not: where merge-linears
made the keys and values of every cross-attention on one context one matmul, the site's own
columns of it become linears of their own, initialised afresh (``lit<i>_kv0_weight``...); a
projection read elsewhere in any other way refuses the site (keep q/k/v with ``fresh_qkv=False``).
Optionally the linear attention runs with fewer heads than the model (LiT's finding: fewer heads
cost nothing); q, k and v are regrouped inside the site.

Fresh tensors live under the graph's ``graphopt_fresh`` submodule (``lit<i>_q_weight``...), so
:func:`graphopt.distill` can train the new parameters first. Sites that cannot be substituted
(cross-attention unless ``cross=True``, masks, causal attention, tokens not on a square grid,
baddbmm scores, unknown heads, projections that are not linears or convs or that other layers
read) are listed in the report's notes with the reason; the row's hits count the sites replaced.
Cross-attention sites substituted on request get the linear attention alone: their keys lie on no
image grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import fx, nn

import graphopt.ops  # noqa: F401 - registers torch.ops.graphopt.linear_attention
from graphopt.analysis.attention import AttentionSite, passes_through
from graphopt.analysis.graph import CONVS, op_name
from graphopt.approx import ApproxPass
from graphopt.errors import PassError, UsageError
from graphopt.pipeline import PassContext

from ._substitution import FRESH  # noqa: F401 - re-exported: where the pass's new tensors live
from ._substitution import Builder, Deferred, Refused, attribute, fresh_parameter, substitute_sites, substituting_pass

aten = torch.ops.aten
_SCORES = frozenset({"matmul", "bmm"})
_MASKING = frozenset({"add", "masked_fill", "where"})
_PASSTHROUGH = frozenset({"contiguous", "clone", "dropout", "alias", "detach", "_to_copy", "to"})
_PROJECTIONS = frozenset({"linear"}) | CONVS


@dataclasses.dataclass(frozen=True)
class LinearAttentionOptions:
    """``heads``: heads of the linear attention (None: the model's; must divide its q/v widths);
    ``kernel``: the depthwise conv's size (odd); ``inherit_out_proj``: keep the trained output
    projection (else it is initialised afresh too); ``fresh_qkv``: initialise q/k/v afresh (LiT)
    or keep the trained ones; ``cross``: substitute cross-attention sites as well; ``seed``: the
    initialisation's seed."""

    heads: int | None = None
    kernel: int = 5
    inherit_out_proj: bool = True
    fresh_qkv: bool = True
    cross: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heads is not None and self.heads < 1:
            raise UsageError(f"linear attention needs at least 1 head, got {self.heads}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UsageError(f"the depthwise conv kernel must be odd and positive, got {self.kernel}")


def substitute_linear_attention(gm: fx.GraphModule, options: LinearAttentionOptions,
                                ctx: PassContext | None = None) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (sharing its inherited weights) with every substitutable attention site
    replaced; returns it and the number of sites replaced. ``gm`` itself is not changed."""
    return substitute_sites(gm, "lit", options.seed,
                            lambda out, site, generator, fresh, index: _substitute(out, site, options, generator,
                                                                                   fresh, index), ctx)


# ------------------------------------------------------------------------------------------ one site


def _substitute(gm: fx.GraphModule, site: AttentionSite, options: LinearAttentionOptions,
                generator: torch.Generator, fresh: nn.Module, index: int) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    if getattr(site, "cross", False) and not options.cross:
        raise Refused("cross-attention (keys and values from another sequence); pass cross=True to replace it")
    out = nodes[site.node]
    if site.kind == "sdpa":
        q, k, v, finish = _sdpa_operands(out)
    else:
        q, k, v, finish = _softmax_operands(site, nodes)
    shape = tuple(q.meta["val"].shape)
    tokens, kv_tokens = shape[-2], tuple(k.meta["val"].shape)[-2]
    cross = bool(getattr(site, "cross", False))
    if not (isinstance(tokens, int) and isinstance(kv_tokens, int)):
        raise Refused("the token counts are not static")
    side = math.isqrt(tokens)
    if not cross and tokens != kv_tokens:
        raise Refused(f"{tokens} queries attend to {kv_tokens} keys: not one token grid")
    if not cross and side * side != tokens:
        raise Refused(f"{tokens} tokens are not a square grid: the depthwise conv needs H x W")
    if len(shape) == 4:
        heads = shape[1]
    elif len(shape) == 3 and site.heads is not None:
        heads = site.heads
    else:
        raise Refused(f"cannot tell the heads of a {len(shape)}-d attention layout")
    head_dim, value_dim = shape[-1], tuple(v.meta["val"].shape)[-1]
    if not all(isinstance(d, int) for d in (heads, head_dim, value_dim)):
        raise Refused("head sizes are not static")
    groups = options.heads or heads
    if (heads * head_dim) % groups or (heads * value_dim) % groups:
        raise Refused(f"{groups} heads do not divide the q/v widths {heads * head_dim}/{heads * value_dim}")
    projections = _projections(site, nodes) if options.fresh_qkv else []
    out_proj = nodes.get(site.out_proj) if site.out_proj and not options.inherit_out_proj else None
    if not options.inherit_out_proj and (out_proj is None or op_name(out_proj) not in _PROJECTIONS):
        raise Refused("no linear/conv output projection to initialise afresh")

    g = gm.graph
    build = Builder(g, out)
    with g.inserting_before(out):
        q4, k4, v4 = (build._materialise(x) if len(shape) == 4 else
                      build(aten.reshape.default, x, [-1, heads, n, d])
                      for x, n, d in ((q, tokens, head_dim), (k, kv_tokens, head_dim), (v, kv_tokens, value_dim)))
        q_op, k_op, v_op = (_regroup(build, x, heads, groups, n) for x, n in ((q4, tokens), (k4, kv_tokens),
                                                                              (v4, kv_tokens)))
        # keys from another sequence have no image grid: no depthwise conv there
        branch = () if cross else _local(gm, build, fresh, heads * value_dim, options, generator, index)
        attended = build(torch.ops.graphopt.linear_attention.default, q_op, k_op, v_op, 1e-6, *branch)
        result = _ungroup(build, attended, heads, groups, tokens, value_dim)
        if len(shape) == 3:
            result = build(aten.reshape.default, result, [-1, tokens, value_dim])
        result = finish(build, result)
    if tuple(result.meta["val"].shape) != tuple(out.meta["val"].shape):
        raise PassError(f"{site.label}: the substitute's shape {tuple(result.meta['val'].shape)} differs from "
                        f"the attention output's {tuple(out.meta['val'].shape)}")
    out.replace_all_uses_with(result)
    for name, node in projections:
        if node.target is aten.slice.Tensor:
            _split_off(gm, fresh, node, f"lit{index}_{name}", generator)
        else:
            _reinitialise(gm, fresh, node, f"lit{index}_{name}", generator)
    if out_proj is not None:
        _reinitialise(gm, fresh, out_proj, f"lit{index}_out", generator)


def _local(gm: fx.GraphModule, build: "Builder", fresh: nn.Module, channels: int, options: LinearAttentionOptions,
           generator: torch.Generator, index: int) -> tuple[fx.Node, fx.Node]:
    """LiT's locality branch, fresh: the weight and bias of a depthwise conv over V as a
    ``[B, heads * Dv, side, side]`` image, which the op adds to the attention output itself.

    Regrouping the heads (``options.heads``) keeps the ``heads * Dv`` channels in order, so the
    branch on the regrouped V is the model-heads branch, channel for channel.
    """
    weight = fresh_parameter(gm, fresh, f"lit{index}_dwc_weight", (channels, 1, options.kernel, options.kernel),
                             generator, build)
    bias = fresh_parameter(gm, fresh, f"lit{index}_dwc_bias", (channels,), generator, build,
                           fan_in=options.kernel * options.kernel)
    return weight, bias


Finish = Callable[["Builder", fx.Node], fx.Node]  # the canonical [..., Nq, Dv] result -> the site's layout


def _same(build: "Builder", result: fx.Node) -> fx.Node:
    return result


def _transpose(build: "Builder", result: fx.Node) -> fx.Node:
    return build(aten.transpose.int, result, -1, -2)


def _sdpa_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, Finish]:
    q, k, v = node.args[:3]
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    extra = dict(zip(names, node.args[3:]), **node.kwargs)
    if extra.get("attn_mask") is not None:
        raise Refused("masked attention")
    if extra.get("is_causal"):
        raise Refused("causal attention")
    if extra.get("enable_gqa"):
        raise Refused("grouped-query attention")
    if q.meta["val"].dim() != 4:
        raise Refused(f"a {q.meta['val'].dim()}-d SDPA layout")
    return q, k, v, _same


def _softmax_operands(site: AttentionSite, nodes: dict[str, fx.Node]) -> tuple[Any, Any, Any, Finish]:
    """(q, k, v, finish) with q ``[..., Nq, D]``, k ``[..., Nk, D]``, v ``[..., Nk, Dv]`` (nodes, or
    layout ops still to add) and ``finish`` mapping the result back to the site's output layout:
    ``P @ V`` as it is, channels-first ``V @ P^T`` transposed, einsum by an einsum."""
    core = [nodes[n] for n in site.nodes]
    out = nodes[site.node]
    if any(op_name(n) in _MASKING for n in core):
        raise Refused("masked attention")
    scores = [n for n in core if op_name(n) in _SCORES | {"einsum"} and n is not out]
    softmax = [n for n in core if "softmax" in op_name(n)]
    if len(scores) != 1 or len(softmax) != 1 or op_name(out) not in _SCORES | {"einsum"}:
        raise Refused("scores are not a plain matmul, bmm or einsum (baddbmm forms are not substituted)")
    dim = softmax[0].args[1] if len(softmax[0].args) > 1 else softmax[0].kwargs.get("dim")
    if dim not in (-1, softmax[0].meta["val"].dim() - 1):
        raise Refused("softmax over another axis than the keys")
    if "einsum" in (op_name(scores[0]), op_name(out)):
        return _einsum_operands(scores[0], softmax[0], out)
    a, b = scores[0].args[:2]
    k = Deferred(aten.transpose.int, (b, -1, -2))
    first, second = out.args[:2]
    flip_first, flip_second = _from_softmax(first, softmax[0]), _from_softmax(second, softmax[0])
    if flip_first is False and flip_second is None:  # P @ V
        return a, k, second, _same
    if flip_second is True and flip_first is None:  # V @ P^T, channels first: V is [..., Dv, Nk]
        return a, k, Deferred(aten.transpose.int, (first, -1, -2)), _transpose
    raise Refused("the attention weights reach the output matmul in an unsupported layout")


def _einsum_operands(scores: fx.Node, softmax: fx.Node, out: fx.Node) -> tuple[Any, Any, Any, Finish]:
    """Both contractions as einsums (``bci,bcj->bij`` then ``bij,bcj->bci``, say): q, k and v are
    brought to ``[lead..., N, D]`` by einsum permutations, the result back by one more."""
    if op_name(scores) != "einsum" or op_name(out) != "einsum":
        raise Refused("scores and output mix einsum with matmul")
    s_terms, s_rhs = _einsum_terms(scores.args[0], 2)
    o_terms, o_rhs = _einsum_terms(out.args[0], 2)
    lead, i, j = s_rhs[:-2], s_rhs[-2], s_rhs[-1]
    q_term, k_term = s_terms if i in s_terms[0] else s_terms[::-1]
    q, k = scores.args[1] if i in s_terms[0] else scores.args[1][::-1]
    contracted = set(q_term) - set(s_rhs)
    if len(contracted) != 1 or set(q_term) != set(lead) | {i} | contracted or \
            set(k_term) != set(lead) | {j} | contracted:
        raise Refused(f"einsum {scores.args[0]!r} is not a per-head q.k contraction")
    d = contracted.pop()
    operands = list(out.args[1])
    which = [_from_softmax(o, softmax) for o in operands]
    if sorted(which, key=str) != [False, None] or len(operands) != 2:
        raise Refused("the attention weights reach the output einsum in an unsupported layout")
    p_index = which.index(False)
    p_term, v_term, v = o_terms[p_index], o_terms[1 - p_index], operands[1 - p_index]
    if len(p_term) != len(s_rhs):
        raise Refused(f"einsum {out.args[0]!r} does not read the weights as {s_rhs}")
    lead_o, i_o, j_o = p_term[:-2], p_term[-2], p_term[-1]
    value = set(v_term) - set(p_term)
    if len(value) != 1 or set(v_term) != set(lead_o) | {j_o} | value or set(o_rhs) != set(lead_o) | {i_o} | value:
        raise Refused(f"einsum {out.args[0]!r} is not a per-head weights.v contraction")
    e = value.pop()

    def finish(build: "Builder", result: fx.Node) -> fx.Node:
        return build(aten.einsum.default, f"{lead_o}{i_o}{e}->{o_rhs}", [result])

    return (Deferred(aten.einsum.default, (f"{q_term}->{lead}{i}{d}", [q])),
            Deferred(aten.einsum.default, (f"{k_term}->{lead}{j}{d}", [k])),
            Deferred(aten.einsum.default, (f"{v_term}->{lead_o}{j_o}{e}", [v])), finish)


def _einsum_terms(equation: str, count: int) -> tuple[list[str], str]:
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or "." in equation or len(terms) != count or any(len(set(t)) != len(t) for t in terms + [rhs]) \
            or len(rhs) < 3:
        raise Refused(f"einsum {equation!r} is not in a form the pass reads (explicit output, no ellipsis)")
    return terms, rhs


def _from_softmax(node: fx.Node, softmax: fx.Node) -> bool | None:
    """Whether ``node`` is the softmax output transposed (True), as it is (False), or not from it (None)."""
    flipped = False
    while node is not softmax:
        name = op_name(node)
        if name in _PASSTHROUGH:
            pass
        elif name in ("transpose", "t"):
            ndim = node.meta["val"].dim()
            dims = {d % ndim for d in node.args[1:3]} if name == "transpose" else {0, 1}
            if dims != {ndim - 2, ndim - 1}:
                return None
            flipped = not flipped
        elif name == "permute":
            ndim = node.meta["val"].dim()
            perm = [d % ndim for d in node.args[1]]
            if perm != list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
                return None
            flipped = not flipped
        else:
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return flipped


def _projections(site: AttentionSite, nodes: dict[str, fx.Node]) -> list[tuple[str, fx.Node]]:
    """(name, node) for what to initialise afresh: each projection q, k and v come from, named by its roles
    (``"qkv"`` for one fused projection, else ``"q"``, ``"k"``, ``"v"``), when nothing outside this
    attention reads it. A projection other layers read too (merge-linears makes the keys and values of
    every cross-attention on one context one matmul) gives its column blocks instead, the last-dim
    slices only this attention reads, one per role: each gets a linear of its own (:func:`_split_off`)."""
    roles: dict[str, str] = {}
    for role, name in zip("qkv", (site.q, site.k, site.v)):
        roles[name] = roles.get(name, "") + role
    bad = [name for name in roles if op_name(nodes[name]) not in _PROJECTIONS]
    if bad:
        raise Refused(f"q/k/v do not come from linear or conv projections ({', '.join(bad)}); "
                       "keep them with fresh_qkv=False")
    fresh = []
    for name, named in roles.items():
        proj = nodes[name]
        outside, _ = _readers(proj, site)
        if not outside and all(_readers(u, site)[1] for u in proj.users):
            fresh.append((named, proj))
            continue
        own = [u for u in proj.users if _is_column_block(u, proj) and _readers(u, site) == ([], True)]
        if len(own) != len(named) or any(_readers(u, site)[1] for u in proj.users if u not in own):
            raise Refused(f"{proj.name} is also read by {', '.join(outside) or 'columns no attention reads'}: "
                          "initialising it afresh would change that too; keep q/k/v with fresh_qkv=False")
        fresh.extend((f"{named}{j}", block) for j, block in enumerate(own))
    return fresh


def _readers(node: fx.Node, site: AttentionSite) -> tuple[list[str], bool]:
    """(the ops outside ``site``'s core that read ``node`` through layout ops, casts and scalar rescales,
    whether such a path reaches the core): the paths the attention analysis walks back from q, k, v.
    A projection read whole by the core (a fused qkv) is its own user: it reaches the core."""
    core, outside, inside, frontier, seen = set(site.nodes), [], node.name in set(site.nodes), [node], set()
    while frontier:
        for user in frontier.pop().users:
            if user.name in core:
                inside = True
            elif user not in seen:
                seen.add(user)
                if passes_through(user):
                    frontier.append(user)
                else:
                    outside.append(user.name)
    return outside, inside


def _is_column_block(node: fx.Node, proj: fx.Node) -> bool:
    """``node`` slices the output features (last dimension) of the linear ``proj``."""
    rank = proj.meta["val"].dim()
    return op_name(proj) == "linear" and node.target is aten.slice.Tensor and node.args[0] is proj \
        and len(node.args) == 4 and isinstance(node.args[1], int) and node.args[1] % rank == rank - 1


# ------------------------------------------------------------------------------------- graph building


def _regroup(build: Builder, x: fx.Node, heads: int, groups: int, tokens: int) -> fx.Node:
    """``[B, heads, N, d]`` -> ``[B, groups, N, heads * d / groups]`` (channels kept in order)."""
    x = build._materialise(x)
    if groups == heads:
        return x
    width = heads * x.meta["val"].shape[-1]
    x = build(aten.reshape.default, build(aten.permute.default, x, [0, 2, 1, 3]), [-1, tokens, groups, width // groups])
    return build(aten.permute.default, x, [0, 2, 1, 3])


def _ungroup(build: Builder, x: fx.Node, heads: int, groups: int, tokens: int, value_dim: int) -> fx.Node:
    if groups == heads:
        return x
    x = build(aten.reshape.default, build(aten.permute.default, x, [0, 2, 1, 3]), [-1, tokens, heads, value_dim])
    return build(aten.permute.default, x, [0, 2, 1, 3])


def _split_off(gm: fx.GraphModule, fresh: nn.Module, block: fx.Node, prefix: str,
               generator: torch.Generator) -> None:
    """A linear of its own, initialised afresh, in place of ``block`` (columns of a projection other layers
    read too): it reads the projection's input; the shared projection and its trained weights stay."""
    proj = block.args[0]
    weight = attribute(gm, proj.args[1].target)
    bias = proj.args[2] if len(proj.args) > 2 and isinstance(proj.args[2], fx.Node) else None
    columns = len(range(*slice(block.args[2], block.args[3]).indices(weight.shape[0])))
    build = Builder(gm.graph, block)
    with gm.graph.inserting_before(block):
        w = fresh_parameter(gm, fresh, f"{prefix}_weight", (columns, weight.shape[1]), generator, build,
                            fan_in=weight.shape[1], like=weight)
        b = None if bias is None else fresh_parameter(gm, fresh, f"{prefix}_bias", (columns,), generator, build,
                                                      fan_in=weight.shape[1], like=weight)
        own = build(aten.linear.default, proj.args[0], w, *([b] if b is not None else []))
    block.replace_all_uses_with(own)


def _reinitialise(gm: fx.GraphModule, fresh: nn.Module, proj: fx.Node, prefix: str,
                  generator: torch.Generator) -> None:
    """Point ``proj``'s weight and bias at new tensors under ``graphopt_fresh``, initialised afresh;
    the trained tensors stay untouched (the source model and other readers keep them)."""
    if not isinstance(proj.args[1], fx.Node) or proj.args[1].op != "get_attr":
        raise PassError(f"{proj.name}'s weight is computed in the graph; cannot initialise it afresh")
    fan_in = math.prod(attribute(gm, proj.args[1].target).shape[1:])
    for position, suffix in ((1, "weight"), (2, "bias")):
        if len(proj.args) <= position or not isinstance(proj.args[position], fx.Node):
            continue
        old = proj.args[position]
        if old.op != "get_attr":
            raise PassError(f"{proj.name}'s {suffix} is computed in the graph; cannot initialise it afresh")
        tensor = attribute(gm, old.target)
        with gm.graph.inserting_before(proj):
            node = fresh_parameter(gm, fresh, f"{prefix}_{suffix}", tuple(tensor.shape), generator,
                                   Builder(gm.graph, proj), fan_in=fan_in, like=tensor)
        proj.replace_input_with(old, node)


# --------------------------------------------------------------------------------------------- pass


def linear_attention_pass(options: LinearAttentionOptions | None = None) -> ApproxPass:
    """The ``linear-attention`` approximate pass with these options (the registered one: defaults)."""
    options = options or LinearAttentionOptions()
    return substituting_pass(
        "linear-attention", lambda gm, pctx: substitute_linear_attention(gm, options, pctx),
        lambda n: (f"{n} attention site(s) now LiT linear attention + {options.kernel}x{options.kernel} depthwise "
                   f"conv on V; heads {options.heads or 'as the model'}; q/k/v "
                   f"{'fresh' if options.fresh_qkv else 'inherited'}, output projection "
                   f"{'inherited' if options.inherit_out_proj else 'fresh'} (seed {options.seed})"),
        __doc__ or "")


LINEAR_ATTENTION = linear_attention_pass()
