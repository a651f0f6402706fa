"""Cost model: FLOPs and bytes moved per node, as sympy expressions of the batch ``B``.

Every tensor size is the node's fake-tensor size with the graph's batch symbol replaced by one
symbol ``B``, so a cost is a polynomial in ``B`` (usually ``a*B + c``: ``c`` from work that does not
depend on the batch, such as precomputable frequency tables). Conventions, with ``|t|`` the number
of elements of ``t`` and a multiply-add counted as 2 FLOPs:

* linear(x, W[N, K], b): ``2*|y|*K`` plus ``|y|`` for the bias.
* mm / bmm / matmul(a[..., K], b): ``2*|y|*K``; addmm / baddbmm add ``|y|`` for the added term.
* conv (1d/2d/3d, groups, dilation, any stride), weight ``W[Cout, Cin/g, *k]``:
  ``2*|y|*(Cin/g)*prod(k)`` plus ``|y|`` for the bias. Transposed conv, weight ``W[Cin, Cout/g, *k]``:
  every input element meets a ``(Cout/g)*prod(k)`` slice, so ``2*|x|*(Cout/g)*prod(k)`` plus ``|y|``.
* einsum: with ``P`` the product of the sizes of all indices, ``n`` operands and a contraction
  (an index absent from the output): ``2*(n-1)*P``; without one (outer or elementwise product):
  ``(n-1)*P``; a single operand costs ``P`` when it sums an index and 0 when it only permutes.
* scaled_dot_product_attention(q[..., L, E], k[..., S, E], v[..., S, Ev]), ``M = |q|/E`` queries:
  ``2*M*S*E`` for QK^T, ``2*M*S*Ev`` for PV, ``6*M*S`` for the scale (1) and softmax (5), plus ``M*S``
  for an additive mask.
* softmax / log_softmax: ``5*|x|`` (max, subtract, exp, sum, divide).
* layer / group / instance norm: ``5*|x|`` (mean, subtract, square, sum, scale); batch norm with
  running statistics ``2*|x|``; rms norm ``3*|x|`` (square, sum, scale); ``|x|`` more per affine
  weight and per bias.
* pointwise (arithmetic, activations, transcendentals alike): ``|y|``, one FLOP per output element.
* reductions (sum, mean, amax, var, ...): ``|x|``, one per input element.
* pooling: ``|y|*prod(kernel)``; adaptive pooling ``|x|``; nearest upsampling 0; linear
  interpolation over ``d`` spatial dims ``3*(2**d - 1)*|y|`` (``2**d - 1`` lerps of 3 FLOPs);
  bicubic ``32*|y|`` (16 taps, one multiply-add each).

Bytes moved: the bytes of every distinct tensor read (parameters included) plus the bytes written,
with no cache reuse across nodes. Views (view, reshape, permute, transpose, select, slice,
getitem, expand, ...) cost 0 FLOPs and 0 bytes; copies (contiguous, clone, cat, casts, embedding
gathers) cost 0 FLOPs and their bytes. An op outside these tables costs 0 FLOPs and its bytes, and
is listed in :attr:`GraphCost.unknown`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import sympy
import torch
from torch import fx

from .graph import arg, batch_symbols, is_tensor_valued, module_path, op_name, tensor_inputs

B = sympy.Symbol("B", integer=True, positive=True)

_VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "select",
    "unbind", "chunk", "split", "split_with_sizes", "getitem", "unflatten", "flatten", "expand",
    "expand_as", "view_as", "alias", "slice", "narrow", "detach", "lift_fresh_copy",
})
_COPIES = frozenset({
    "contiguous", "clone", "cat", "stack", "copy", "_to_copy", "to", "pad", "constant_pad_nd",
    "repeat", "roll", "flip", "index_select", "gather", "embedding", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact2d", "pixel_shuffle",
    "pixel_unshuffle", "zeros_like", "ones_like", "full_like", "empty_like", "arange", "zeros", "ones",
    "full", "empty", "scalar_tensor", "tril", "triu", "masked_fill",
})
# Nodes that compute nothing at run time: metadata asserts and shape arithmetic.
_FREE = frozenset({"sym_size", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"})
_POINTWISE = frozenset({
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "relu", "relu_", "gelu", "silu", "sigmoid",
    "tanh", "exp", "exp2", "expm1", "log", "log2", "log1p", "sin", "cos", "sqrt", "rsqrt", "pow",
    "square", "reciprocal", "erf", "clamp", "clamp_min", "clamp_max", "where", "maximum", "minimum",
    "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "lerp",
    "addcmul", "addcdiv", "floor", "ceil", "round", "sign", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_not", "logical_and", "logical_or", "bitwise_not", "remainder", "fmod", "atan2",
    "nan_to_num", "dropout", "alpha_dropout", "feature_dropout",
})
_REDUCTIONS = frozenset({
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
    "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "all", "any", "cumsum", "cumprod",
})
_SOFTMAX = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"})


@dataclasses.dataclass(frozen=True)
class Cost:
    """A FLOP count and a byte count, both sympy expressions of :data:`B`."""

    flops: sympy.Expr
    bytes: sympy.Expr

    def at(self, batch: int) -> tuple[int, int]:
        """(FLOPs, bytes) at a concrete batch size."""
        return evaluate(self.flops, batch), evaluate(self.bytes, batch)


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """The cost of one FX node. ``known`` is False for ops outside the model (0 FLOPs)."""

    node: str
    op: str
    module: str
    flops: sympy.Expr
    bytes: sympy.Expr
    known: bool = True


@dataclasses.dataclass(frozen=True)
class GraphCost:
    """Per-node costs of a graph, their sums per module path and over the whole graph."""

    nodes: tuple[NodeCost, ...]
    batch_symbol: str | None

    @property
    def flops(self) -> sympy.Expr:
        return sympy.Add(*(c.flops for c in self.nodes))

    @property
    def bytes(self) -> sympy.Expr:
        return sympy.Add(*(c.bytes for c in self.nodes))

    @property
    def total(self) -> Cost:
        return Cost(self.flops, self.bytes)

    @property
    def unknown(self) -> tuple[str, ...]:
        """The distinct ops the model has no formula for, in first-seen order."""
        return tuple(dict.fromkeys(c.op for c in self.nodes if not c.known))

    def at(self, batch: int) -> tuple[int, int]:
        """Total (FLOPs, bytes) at a concrete batch size."""
        return self.total.at(batch)

    def by_module(self, depth: int | None = None) -> dict[str, Cost]:
        """Costs summed per module path, paths cut to their first ``depth`` components (``""``: nodes
        of the root module). The values add up to :attr:`total`."""
        flops: dict[str, list[sympy.Expr]] = defaultdict(list)
        moved: dict[str, list[sympy.Expr]] = defaultdict(list)
        for c in self.nodes:
            key = ".".join(c.module.split(".")[:depth]) if depth is not None else c.module
            flops[key].append(c.flops)
            moved[key].append(c.bytes)
        return {k: Cost(sympy.Add(*flops[k]), sympy.Add(*moved[k])) for k in flops}


def evaluate(expr: sympy.Expr, batch: int) -> int:
    """``expr`` at ``B = batch``; raises ValueError if another symbol remains."""
    value = sympy.sympify(expr).subs(B, batch)
    if value.free_symbols:
        raise ValueError(f"cost depends on {sorted(map(str, value.free_symbols))} besides the batch")
    return int(value)


def graph_cost(gm: fx.GraphModule, batch_symbol: str | None = None) -> GraphCost:
    """The cost of every ``call_function`` node of ``gm`` that produces a tensor (shape arithmetic and
    metadata asserts compute nothing at run time), with ``batch_symbol`` (the graph's batch size
    symbol, e.g. ``"s87"``) replaced by :data:`B`.

    torch.export gives an input's batch a symbol of its own where nothing in the graph ties it to the
    first input's (diffusers' UVit2D reads its micro-conditioning only through a reshape to the token
    batch): the leading size of every input that had the batch's size in the capture is read as
    :data:`B` too, the batch a sampler passes to all of them."""
    sizes = _Sizes(batch_symbols(gm, batch_symbol))
    nodes = tuple(_node_cost(n, sizes) for n in gm.graph.nodes
                  if n.op == "call_function" and is_tensor_valued(n))
    return GraphCost(nodes, batch_symbol)


class _Sizes:
    """Turns fake-tensor sizes into sympy expressions with the batch symbols renamed to B."""

    def __init__(self, batch_symbols: frozenset[str]):
        self.batch_symbols = batch_symbols

    def size(self, s: int | torch.SymInt) -> sympy.Expr:
        if not isinstance(s, torch.SymInt):
            return sympy.Integer(int(s))
        expr = s.node.expr
        return expr.xreplace({sym: B for sym in expr.free_symbols if sym.name in self.batch_symbols})

    def shape(self, node: fx.Node) -> list[sympy.Expr]:
        return [self.size(s) for s in node.meta["val"].shape]

    def numel(self, node: fx.Node) -> sympy.Expr:
        return sympy.Mul(*self.shape(node))

    def nbytes(self, node: fx.Node) -> sympy.Expr:
        val = node.meta.get("val")
        tensors = val if isinstance(val, list | tuple) else [val]
        return sympy.Add(*(sympy.Mul(*(self.size(s) for s in t.shape)) * t.dtype.itemsize
                           for t in tensors if isinstance(t, torch.Tensor)))


def node_cost(node: fx.Node, batch_symbol: str | None = None) -> NodeCost:
    """The cost of one node (see the module docstring for the formulas)."""
    return _node_cost(node, _Sizes(frozenset() if batch_symbol is None else frozenset({batch_symbol})))


def _node_cost(node: fx.Node, sizes: _Sizes) -> NodeCost:
    name, module = op_name(node), module_path(node)
    zero = sympy.Integer(0)
    if node.op != "call_function" or name in _FREE or not is_tensor_valued(node) or name in _VIEWS \
            or _is_noop(node, name):
        return NodeCost(node.name, name, module, zero, zero)
    if any("val" not in n.meta for n in node.all_input_nodes):  # a node a pass made without metadata
        return NodeCost(node.name, name, module, zero, zero, known=False)
    inputs = tensor_inputs(node)
    if name in ("embedding", "index_select", "gather"):
        # A gather reads only the rows it writes, not the whole table.
        moved = 2 * sizes.nbytes(node) + sum((sizes.nbytes(n) for n in inputs[1:]), zero)
    else:
        moved = sum((sizes.nbytes(n) for n in inputs), zero) + sizes.nbytes(node)
    rule = _RULES.get(name)
    if rule is None and name not in _COPIES:
        return NodeCost(node.name, name, module, zero, moved, known=False)
    flops = rule(node, sizes) if rule is not None else zero
    return NodeCost(node.name, name, module, sympy.expand(flops), sympy.expand(moved))


def _is_noop(node: fx.Node, name: str) -> bool:
    """A dtype cast to the dtype it already has, or dropout in eval mode: returns its input."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if name in ("to", "_to_copy") and src is not None and isinstance(src.meta.get("val"), torch.Tensor):
        return src.meta["val"].dtype == node.meta["val"].dtype
    if name == "dropout":
        return arg(node, 2, "train", True) is False
    return False


def _linear(node: fx.Node, s: _Sizes) -> sympy.Expr:
    out, k = s.numel(node), s.shape(node.args[1])[-1]
    return 2 * out * k + (out if arg(node, 2, "bias") is not None else 0)


def _matmul(node: fx.Node, s: _Sizes) -> sympy.Expr:
    return 2 * s.numel(node) * s.shape(node.args[0])[-1]


def _addmm(node: fx.Node, s: _Sizes) -> sympy.Expr:
    out = s.numel(node)
    return 2 * out * s.shape(node.args[1])[-1] + out


def _conv(node: fx.Node, s: _Sizes) -> sympy.Expr:
    name = op_name(node)
    transposed = "transpose" in name or (name in ("convolution", "_convolution")
                                         and bool(arg(node, 6, "transposed", False)))
    per_element = sympy.Mul(*s.shape(node.args[1])[1:])  # (Cin/g or Cout/g) * prod(kernel)
    driver = node.args[0] if transposed else node
    bias = s.numel(node) if arg(node, 2, "bias") is not None else 0
    return 2 * s.numel(driver) * per_element + bias


def _einsum(node: fx.Node, s: _Sizes) -> sympy.Expr:
    return einsum_flops(node.args[0], [s.shape(n) for n in node.args[1]])


def einsum_flops(equation: str, shapes: Sequence[Sequence[sympy.Expr | int]]) -> sympy.Expr:
    """FLOPs of ``einsum(equation, *operands)`` with operands of ``shapes`` (rule in module doc)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    sizes: dict[str, sympy.Expr] = {}
    counts: dict[str, int] = defaultdict(int)
    ellipsis = 0
    for term, shp in zip(terms, shapes):
        labels = _labels(term, len(shp))
        ellipsis = max(ellipsis, sum(1 for lab in labels if lab.startswith(".")))
        for label, size in zip(labels, shp):
            counts[label] += 1
            if label not in sizes or sizes[label] == 1:  # broadcasting: a size-1 dim takes the other
                sizes[label] = sympy.sympify(size)
    if arrow:
        out = set(_labels(rhs, len(rhs.replace("...", "")) + ellipsis))
    else:  # implicit output: the indices seen once, plus the broadcast dims
        out = {lab for lab, c in counts.items() if c == 1 or lab.startswith(".")}
    total = sympy.Mul(*sizes.values())
    contracted = bool(set(sizes) - out)
    n = len(terms)
    if n == 1:
        return total if contracted else sympy.Integer(0)
    return (n - 1) * total * (2 if contracted else 1)


def _labels(term: str, rank: int) -> list[str]:
    """Index labels of one einsum term; the dims under ``...`` are named by their distance from the
    right end of the ellipsis (``.0`` is its last dim), so broadcast dims line up across operands."""
    if "..." not in term:
        return list(term)
    head, _, tail = term.partition("...")
    n = rank - len(head) - len(tail)
    return list(head) + [f".{n - 1 - i}" for i in range(n)] + list(tail)


def _sdpa(node: fx.Node, s: _Sizes) -> sympy.Expr:
    q, k, v = (s.shape(n) for n in node.args[:3])
    queries = sympy.Mul(*q) / q[-1]
    scores = queries * k[-2]
    mask = scores if arg(node, 3, "attn_mask") is not None else 0
    return 2 * scores * q[-1] + 2 * scores * v[-1] + 6 * scores + mask


def _norm(per_element: int, weight_at: int, bias_at: int | None) -> Callable[[fx.Node, _Sizes], sympy.Expr]:
    def flops(node: fx.Node, s: _Sizes) -> sympy.Expr:
        n = s.numel(node.args[0])
        affine = sum(1 for i, key in ((weight_at, "weight"), (bias_at, "bias"))
                     if i is not None and arg(node, i, key) is not None)
        return (per_element + affine) * n
    return flops


def _batch_norm(node: fx.Node, s: _Sizes) -> sympy.Expr:
    training = bool(arg(node, 5, "training", False))
    return _norm(5 if training else 2, 1, 2)(node, s)


def _pool(node: fx.Node, s: _Sizes) -> sympy.Expr:
    kernel = arg(node, 1, "kernel_size")
    kernel = [kernel] if isinstance(kernel, int) else list(kernel)
    dims = len(node.meta["val"].shape) - 2
    return s.numel(node) * math.prod(kernel if len(kernel) == dims else kernel * dims)


def _interpolate(node: fx.Node, s: _Sizes) -> sympy.Expr:
    d = len(node.meta["val"].shape) - 2
    return 3 * (2**d - 1) * s.numel(node)


def _per_output(node: fx.Node, s: _Sizes) -> sympy.Expr:
    return s.numel(node)


def _per_input(node: fx.Node, s: _Sizes) -> sympy.Expr:
    return s.numel(node.args[0])


_RULES: dict[str, Callable[[fx.Node, _Sizes], sympy.Expr]] = {
    "linear": _linear, "mm": _matmul, "bmm": _matmul, "matmul": _matmul,
    "addmm": _addmm, "baddbmm": _addmm, "einsum": _einsum,
    **{c: _conv for c in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                          "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    "scaled_dot_product_attention": _sdpa,
    **{n: (lambda node, s: 5 * s.numel(node.args[0])) for n in _SOFTMAX},
    "layer_norm": _norm(5, 2, 3), "native_layer_norm": _norm(5, 2, 3),
    "group_norm": _norm(5, 2, 3), "native_group_norm": _norm(5, 1, 2),
    "instance_norm": _norm(5, 1, 2), "rms_norm": _norm(3, 2, None),
    "batch_norm": _batch_norm,
    **{p: _pool for p in ("avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
                          "max_pool3d")},
    **{p: _per_input for p in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                               "adaptive_max_pool2d")},
    **{u: _interpolate for u in ("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
                                 "_upsample_bilinear2d_aa")},
    "upsample_bicubic2d": lambda node, s: 2 * 16 * s.numel(node),  # 4x4 taps, one multiply-add each
    **{p: _per_output for p in _POINTWISE},
    **{r: _per_input for r in _REDUCTIONS},
}
