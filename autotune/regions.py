"""Partition a captured ATen graph into the regions the GPU target lowers to Triton.

Where it belongs: the first step of lowering (``optimize(..., target="cuda")``), after the rewrite
passes, before code generation (:mod:`.codegen`). It changes nothing; it only says which nodes run
together as one kernel.

Three kinds of region:

- ``pointwise``: a connected group of elementwise ops (add, mul, SiLU, GELU, sigmoid, ...) with
  broadcasting. adaLN's ``x * (1 + scale) + shift`` and the gated residual ``x + gate * y`` are such
  groups. A node whose shape is smaller than the group's (``1 + scale`` of shape (B, 1, D) inside a
  (B, N, D) group) joins only when nothing outside the group reads it: it is then recomputed per
  element instead of being written out.
- ``norm``: LayerNorm, GroupNorm or RMSNorm with the elementwise ops that consume it (its epilogue:
  the adaLN modulate, GroupNorm's SiLU) and the pointwise group that produces its input, when it has
  the same shape (its prologue: the gated residual before a DiT block's next LayerNorm, the time
  embedding added before a UNet ResBlock's second GroupNorm). The prologue is recomputed in each of
  the norm kernel's passes over a row instead of being written out and read back.
- ``attention``: the attention family, each on its hand-written kernel: scaled-dot-product attention
  without mask, dropout or causal flag (the flash kernel of :mod:`.kernels.attention`), and graphopt's
  own ops (:mod:`graphopt.ops`): ``block_causal_attention`` (VAR; the same flash kernel with levels),
  ``linear_attention`` (LiT) and ``dynamic_dwconv`` (ATConv), which passes substitute into graphs.

Matmuls and convolutions are not regions: they stay on ATen (cuBLAS / cuDNN). Lowering then gives a
linear layer whose output only one pointwise region reads to that region, as one GEMM-epilogue call
site (:mod:`.gemm`, region kind ``gemm``).

A group must stay *convex*: no path may leave it and come back, or the group could not run as one
call (it would need its own output before it starts). Groups grow greedily in topological order and a
merge that would break convexity is refused.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Literal

import sympy
import torch
from torch import fx

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Emit = Callable[..., str]
"""Formats one op as a Triton expression from its operands' expressions (fp32 values) and its constants."""


def _gelu(x: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no tanh needed
        return f"{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _pow(x: str, exponent: float) -> str | None:
    if exponent == 0.5:
        return f"tl.sqrt({x})"
    if exponent == -0.5:
        return f"tl.rsqrt({x})"
    if float(exponent).is_integer() and 1 <= abs(exponent) <= 4:
        product = " * ".join([x] * int(abs(exponent)))
        return f"({product})" if exponent > 0 else f"(1.0 / ({product}))"
    return None  # x ** 2.7 of a negative x is NaN in torch; exp(2.7 log x) would agree, but it is rare


def _scaled(b: str, alpha: object = 1) -> str:
    return b if alpha == 1 else f"{float(alpha)!r} * {b}"


# op -> how to write it. Every operand arrives as an fp32 Triton value or a Python number literal.
POINTWISE: dict[object, Emit] = {
    aten.add.Tensor: lambda a, b, alpha=1: f"{a} + {_scaled(b, alpha)}",
    aten.add.Scalar: lambda a, b, alpha=1: f"{a} + {_scaled(b, alpha)}",
    aten.sub.Tensor: lambda a, b, alpha=1: f"{a} - {_scaled(b, alpha)}",
    aten.sub.Scalar: lambda a, b, alpha=1: f"{a} - {_scaled(b, alpha)}",
    aten.rsub.Scalar: lambda a, b, alpha=1: f"{b} - {_scaled(a, alpha)}",
    aten.mul.Tensor: lambda a, b: f"{a} * {b}",
    aten.mul.Scalar: lambda a, b: f"{a} * {b}",
    aten.div.Tensor: lambda a, b: f"{a} / {b}",
    aten.div.Scalar: lambda a, b: f"{a} / {b}",
    aten.neg.default: lambda a: f"-{a}",
    aten.silu.default: lambda a: f"{a} * tl.sigmoid({a})",
    aten.sigmoid.default: lambda a: f"tl.sigmoid({a})",
    aten.tanh.default: lambda a: f"(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)",
    aten.gelu.default: _gelu,
    aten.relu.default: lambda a: f"tl.maximum({a}, 0.0)",
    aten.exp.default: lambda a: f"tl.exp({a})",
    aten.log.default: lambda a: f"tl.log({a})",
    aten.sqrt.default: lambda a: f"tl.sqrt({a})",
    aten.rsqrt.default: lambda a: f"tl.rsqrt({a})",
    aten.reciprocal.default: lambda a: f"(1.0 / {a})",
    aten.sin.default: lambda a: f"tl.sin({a})",
    aten.cos.default: lambda a: f"tl.cos({a})",
    aten.abs.default: lambda a: f"tl.abs({a})",
    aten.pow.Tensor_Scalar: _pow,
}

NORMS = (aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default)
ATTENTION = (aten.scaled_dot_product_attention.default,)


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor a region reads or writes, as the kernel indexes it over the region's domain.

    ``shape`` and ``strides`` are aligned to the domain (same rank); a size-1 dimension is broadcast.
    Sizes and strides are sympy expressions: integers, or in the symbolic batch.
    """

    node: fx.Node
    shape: tuple[sympy.Expr, ...]
    strides: tuple[sympy.Expr, ...]


@dataclasses.dataclass(frozen=True)
class Region:
    """Nodes that run as one kernel: in topological order, with what they read and write."""

    kind: Literal["pointwise", "norm", "attention", "gemm"]
    nodes: tuple[fx.Node, ...]
    domain: tuple[sympy.Expr, ...]
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]

    @property
    def norm(self) -> fx.Node | None:
        return next((n for n in self.nodes if n.target in NORMS), None) if self.kind == "norm" else None

    def prologue(self) -> tuple[fx.Node, ...]:
        """The region's nodes the norm's input depends on (computed in every pass over a row)."""
        norm = self.norm
        if norm is None:
            return ()
        members, seen, stack = set(self.nodes), set(), [norm.args[0]]
        while stack:
            m = stack.pop()
            if m in members and m not in seen:
                seen.add(m)
                stack.extend(m.all_input_nodes)
        return tuple(n for n in self.nodes if n in seen)

    def ops(self) -> list[str]:
        return [op_name(n) for n in self.nodes]

    def modules(self) -> list[str]:
        """The module paths the region's nodes came from (deduplicated, in order)."""
        return list(dict.fromkeys(m for n in self.nodes if (m := n.meta.get("graphopt_module"))))


@dataclasses.dataclass(frozen=True)
class Partition:
    regions: tuple[Region, ...]
    left_on_aten: tuple[tuple[str, int], ...]
    """Compute ops that stay on ATen, with counts (matmuls, convolutions, unsupported ops)."""


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def sym(value: int | torch.SymInt) -> sympy.Expr:
    """A size or stride as a sympy expression (a SymInt keeps its symbols, e.g. the batch ``s0``)."""
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return sympy.Integer(int(value))


def shape_of(node: fx.Node) -> tuple[sympy.Expr, ...]:
    return tuple(sym(s) for s in node.meta["val"].shape)


def strides_of(node: fx.Node) -> tuple[sympy.Expr, ...]:
    return tuple(sym(s) for s in node.meta["val"].stride())


def is_float_tensor(value: object) -> bool:
    return isinstance(value, fx.Node) and isinstance(v := value.meta.get("val"), torch.Tensor) \
        and v.dtype in FLOAT_DTYPES


def classify(node: fx.Node) -> Literal["pointwise", "norm", "attention"] | None:
    """What kind of region ``node`` can start or join, or ``None`` when it stays on ATen."""
    if node.op != "call_function" or not is_float_tensor(node):
        return None
    if node.target in POINTWISE:
        return "pointwise" if _pointwise_ok(node) else None
    if node.target in NORMS:
        return "norm" if _norm_ok(node) else None
    if node.target in ATTENTION:
        return "attention" if _attention_ok(node) else None
    if getattr(node.target, "namespace", None) == "graphopt":
        return "attention"  # graphopt's own attention-family ops: their kernels take any valid input
    return None


def _literal(value: object) -> bool:
    return isinstance(value, (int, float, bool)) and not isinstance(value, torch.SymInt)


def _pointwise_ok(node: fx.Node) -> bool:
    out = shape_of(node)
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, fx.Node):
            if not is_float_tensor(arg) or not broadcasts(shape_of(arg), out):
                return False
        elif not (_literal(arg) or isinstance(arg, str)):
            return False
    if node.target is aten.pow.Tensor_Scalar and _pow("x", float(node.args[1])) is None:
        return False
    if node.target is aten.gelu.default and node.kwargs.get("approximate", "none") not in ("none", "tanh"):
        return False
    return set(node.kwargs) <= {"alpha", "approximate"}


def _norm_ok(node: fx.Node) -> bool:
    x = node.args[0]
    if not is_float_tensor(x) or any(s.free_symbols for s in shape_of(x)[1:]):
        return False  # the row length must be static: it is baked into the kernel
    params = node.args[2:4] if node.target is not aten.rms_norm.default else node.args[2:3]
    return all(p is None or is_float_tensor(p) for p in params)


def node_arg(node: fx.Node, i: int, name: str, default: object = None) -> object:
    """Argument ``i`` (called ``name``) of an ATen call, positional or keyword, with its schema default."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _attention_ok(node: fx.Node) -> bool:
    q, k, v = node.args[:3]
    mask, dropout = node_arg(node, 3, "attn_mask"), node_arg(node, 4, "dropout_p", 0.0)
    causal = node_arg(node, 5, "is_causal", False)
    dims_ok = all(is_float_tensor(t) and t.meta["val"].dim() == 4 for t in (q, k, v))
    return (dims_ok and mask is None and dropout == 0.0 and not causal and not node.kwargs.get("enable_gqa")
            and q.meta["val"].shape[-1] <= 256 and v.meta["val"].shape[-1] <= 256
            and q.meta["val"].shape[1] == k.meta["val"].shape[1])


def broadcasts(shape: Sequence[sympy.Expr], to: Sequence[sympy.Expr]) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (right-aligned, size-1 dimensions stretch)."""
    if len(shape) > len(to):
        return False
    return all(s == 1 or sympy.simplify(s - t) == 0 for s, t in zip(reversed(shape), reversed(to)))


# ------------------------------------------------------------------------------------------ partition


@dataclasses.dataclass(eq=False)  # identity: two groups are never the same group
class _Group:
    nodes: list[fx.Node]
    domain: tuple[sympy.Expr, ...]
    kind: Literal["pointwise", "norm", "attention"]
    mask: int = 0  # bit i set: the node at topological index i is in the group


def partition(gm: fx.GraphModule) -> Partition:
    """The regions of ``gm``, in topological order of their first node."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    ancestors: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        bits = 0
        for i in n.all_input_nodes:
            bits |= ancestors[i] | (1 << index[i])
        ancestors[n] = bits

    group_of: dict[fx.Node, _Group] = {}
    groups: list[_Group] = []
    left: dict[str, int] = {}
    for n in gm.graph.nodes:
        kind = classify(n)
        if kind is None:
            if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor) and not _is_view_or_bookkeeping(n):
                left[op_name(n)] = left.get(op_name(n), 0) + 1
            continue
        g = _Group([n], shape_of(n), kind, 1 << index[n])
        if kind == "norm" and (p := group_of.get(n.args[0])) is not None and p.kind == "pointwise" \
                and _same(p.domain, g.domain) and _convex(p.nodes + g.nodes, p.mask | g.mask, ancestors):
            g = _Group(p.nodes + g.nodes, g.domain, "norm", p.mask | g.mask)  # p becomes the prologue
            groups.remove(p)
        if kind == "pointwise":
            producers = dict.fromkeys(group_of[a] for a in n.all_input_nodes if a in group_of)
            for p in producers:
                if p.kind != "attention" and _can_merge(p, g, n, ancestors, index):
                    g = _Group(p.nodes + g.nodes, g.domain, "norm" if p.kind == "norm" else g.kind, p.mask | g.mask)
                    groups.remove(p)
        groups.append(g)
        for m in g.nodes:
            group_of[m] = g

    regions = tuple(_region(g, index) for g in sorted(groups, key=lambda g: index[min(g.nodes, key=index.get)]))
    return Partition(regions, tuple(sorted(left.items(), key=lambda kv: (-kv[1], kv[0]))))


def _can_merge(p: _Group, g: _Group, n: fx.Node, ancestors: dict[fx.Node, int], index: dict[fx.Node, int]) -> bool:
    if p.kind == "norm" and g.kind == "norm":
        return False  # one reduction per kernel
    if not _same(p.domain, g.domain):
        # a smaller producer is recomputed per element: only when nobody else needs its values
        if p.kind == "norm" or not broadcasts(p.domain, g.domain):
            return False
        if any(u is not n and u not in p.nodes for m in p.nodes for u in m.users):
            return False
    merged = p.nodes + g.nodes
    for group in (p, g):  # a norm's input may be inside only as the prologue it was given when created
        norm = next((m for m in group.nodes if m.target in NORMS), None)
        if norm is not None and norm.args[0] in merged and norm.args[0] not in group.nodes:
            return False
    return _convex(merged, p.mask | g.mask, ancestors)


def _same(a: Sequence[sympy.Expr], b: Sequence[sympy.Expr]) -> bool:
    return len(a) == len(b) and all(sympy.simplify(x - y) == 0 for x, y in zip(a, b))


def _convex(nodes: Sequence[fx.Node], mask: int, ancestors: dict[fx.Node, int]) -> bool:
    """No input from outside ``nodes`` depends on them: the group can run as one call."""
    members = set(nodes)
    return not any(ancestors[a] & mask for m in nodes for a in m.all_input_nodes if a not in members)


def _region(g: _Group, index: dict[fx.Node, int]) -> Region:
    nodes = tuple(sorted(g.nodes, key=index.get))
    members = set(nodes)
    inputs = tuple(dict.fromkeys(a for m in nodes for a in m.all_input_nodes if a not in members))
    outputs = tuple(m for m in nodes if any(u not in members for u in m.users))
    kind = "norm" if any(m.target in NORMS for m in nodes) else g.kind
    return Region(kind, nodes, g.domain, inputs, outputs)


_BOOKKEEPING = {operator.getitem, aten.sym_size.int, aten._assert_tensor_metadata.default}


def _is_view_or_bookkeeping(node: fx.Node) -> bool:
    if node.target in _BOOKKEEPING:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    # view ops return an alias of an input (Tensor(a)): they move no data
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
