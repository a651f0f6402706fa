"""no-op removal: delete operators that return their input unchanged.

Where it belongs: first. Exported graphs carry the model's Python habits as ops (eval-mode dropout,
``t.float()`` on a float tensor, ``x[:, :, None]`` as a full slice plus an unsqueeze, ``x * 1.0``);
removing them shortens the chains later passes match and the kernels fuse. Exact: every rule
replaces a node by a tensor with the same shape, dtype, device and values for every input in the
captured range (the batch is a symbol with a range, not the example's size).

A shape op that keeps its input's shape is mostly an identity: a view; a slice or a split piece (a
slice steps forward, so one as long as its dim took every element in order); a ``repeat`` or
``tile`` (each factor is 1, or its dim is empty). So is a ``squeeze`` of dims whose size is never 1,
and removing it matters beyond tidiness: torch keeps it as an identity while ONNX's Squeeze rejects
a dim that is not 1 (diffusers' PixArt blocks squeeze dim 1 of their tokens). Permutations and pads
are judged by their arguments instead, since ``transpose(1, 2)`` of a square and a pad of
``(-1, 1)`` keep the shape and move the values.

Rules decline silently when an op is simply not a no-op (a view that changes shape), and with a
reason when it nearly is (dropout still in training mode; ``x * 1`` that promotes the dtype;
``contiguous`` of a non-contiguous input, whose copy a later view needs; a copy of a graph input or
parameter that is returned, which would hand out that tensor itself; a squeeze of a symbolic size
that can be 1).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from graphopt.pipeline import MatchResult, Rule, rule_pass

from ._common import is_contiguous, same_tensor_type, shape_of, size_bounds, val

aten = torch.ops.aten


def _keeps_input(node: fx.Node) -> MatchResult | None:
    """Same shape/dtype/device as the input: the op changed nothing that a consumer can see."""
    return MatchResult.success() if same_tensor_type(node, node.args[0]) else None


def _dropout(node: fx.Node) -> MatchResult | None:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    if not train or p == 0:
        return MatchResult.success()
    return MatchResult.fail("dropout is in training mode; call model.eval() before capture")


def _copy_of(node: fx.Node, src: Any) -> MatchResult | None:
    """``node`` is a fresh copy of ``src``: removable unless the copy is what keeps a consumer safe."""
    if not same_tensor_type(node, src):
        return None
    if not is_contiguous(src):
        return MatchResult.fail("input is not contiguous: the copy may be what a later view needs")
    if any(u.op == "output" for u in node.users):
        if src.op == "placeholder":
            return MatchResult.fail("copy of a graph input returned as output: removing it would alias the input")
        if src.op == "get_attr":
            return MatchResult.fail("copy of a parameter or buffer returned as output: removing it would "
                                    "hand out the model's own tensor")
    return MatchResult.success()


def _copy(node: fx.Node) -> MatchResult | None:
    verdict = _copy_of(node, node.args[0])
    memory_format = node.kwargs.get("memory_format")
    if verdict and memory_format not in (None, torch.contiguous_format, torch.preserve_format):
        return MatchResult.fail(f"copy changes memory format to {memory_format}")
    return verdict


def _convert(node: fx.Node) -> MatchResult | None:
    if not same_tensor_type(node, node.args[0]):
        return None
    if node.kwargs.get("copy", False) or (len(node.args) > 3 and node.args[3]):
        return MatchResult.fail("conversion asks for a copy (copy=True)")
    return _copy(node)


def _permute(node: fx.Node) -> MatchResult | None:
    dims = list(node.args[1])
    rank = len(dims)
    return MatchResult.success() if [d % rank for d in dims] == list(range(rank)) else None


def _transpose(node: fx.Node) -> MatchResult | None:
    rank = len(shape_of(node.args[0]) or ())
    if rank == 0:
        return MatchResult.success()
    a, b = node.args[1] % rank, node.args[2] % rank
    return MatchResult.success() if a == b else None


def _movedim(node: fx.Node) -> MatchResult | None:
    rank = len(shape_of(node.args[0]) or ())
    if rank == 0:
        return MatchResult.success()
    source, destination = node.args[1], node.args[2]
    if isinstance(source, int):
        source, destination = [source], [destination]
    return MatchResult.success() if all(s % rank == d % rank for s, d in zip(source, destination)) else None


def _t(node: fx.Node) -> MatchResult | None:
    return MatchResult.success() if len(shape_of(node.args[0]) or (0, 0)) < 2 else None


def _squeeze(node: fx.Node) -> MatchResult | None:
    """An identity when no squeezed dim is 1 for any input in the captured range."""
    v = val(node.args[0])
    if not isinstance(v, torch.Tensor):
        return None
    if v.dim() == 0:
        return _keeps_input(node)
    if node.target == aten.squeeze.default:
        dims = range(v.dim())
    else:
        dims = node.args[1] if node.target == aten.squeeze.dims else [node.args[1]]
    sizes = {d % v.dim(): v.shape[d] for d in dims}
    bounds = {d: size_bounds(size) for d, size in sizes.items()}
    if (1, 1) in bounds.values():
        return None  # it does squeeze
    for d, (lo, hi) in sorted(bounds.items()):
        if lo <= 1 and (hi is None or hi >= 1):
            return MatchResult.fail(f"dim {d} has size {sizes[d]} in [{lo}, {'inf' if hi is None else hi}] over the "
                                    "captured range: where it is 1 the squeeze drops it")
    return _keeps_input(node)


_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
           aten.tensor_split.indices)


def _whole_split(node: fx.Node) -> MatchResult | None:
    """``split(x, ...)[i]`` with x's shape: a piece as long as its dim starts at 0, so it is x."""
    split = node.args[0]
    if not (isinstance(split, fx.Node) and split.op == "call_function" and split.target in _SPLITS):
        return None
    return MatchResult.success() if same_tensor_type(node, split.args[0]) else None


def _single_cat(node: fx.Node) -> MatchResult | None:
    tensors = node.args[0]
    return _copy_of(node, tensors[0]) if len(tensors) == 1 else None


def _same_shape_copy(node: fx.Node) -> MatchResult | None:
    return _copy_of(node, node.args[0])


def _zero_pad(node: fx.Node) -> MatchResult | None:
    if not all(isinstance(p, int) and p == 0 for p in node.args[1]):
        return None
    return _copy_of(node, node.args[0])


def _inverse_pair(node: fx.Node) -> MatchResult | None:
    """t(t(x)), transpose(transpose(x, a, b), a, b), or permutations that compose to the identity."""
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.op != "call_function" or inner.target != node.target:
        return None
    if node.target == aten.t.default:
        identity = True
    elif node.target == aten.transpose.int:
        rank = len(shape_of(inner.args[0]) or ())
        identity = rank > 0 and {node.args[1] % rank, node.args[2] % rank} == {inner.args[1] % rank, inner.args[2] % rank}
    else:
        first, second = list(inner.args[1]), list(node.args[1])
        rank = len(first)
        identity = [first[second[i] % rank] % rank for i in range(rank)] == list(range(rank))
    if not identity:
        return None
    return MatchResult.success() if same_tensor_type(node, inner.args[0]) else None


def _neutral_operand(neutral: float, commutes: bool):
    """(check, rewrite) for ``x op c -> x`` with the op's neutral constant c (and ``c op x`` when it commutes)."""

    def find(node: fx.Node) -> tuple[int, MatchResult] | None:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
            return None
        for keep, const in (((0, 1), (1, 0)) if commutes else ((0, 1),)):
            c, x = node.args[const], node.args[keep]
            if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c == neutral
                    and isinstance(x, fx.Node)):
                continue
            if same_tensor_type(node, x):
                return keep, MatchResult.success()
            vx, vn = val(x), val(node)
            if isinstance(vx, torch.Tensor) and isinstance(vn, torch.Tensor) and vx.dtype != vn.dtype:
                return keep, MatchResult.fail(f"operand {c!r} promotes {vx.dtype} to {vn.dtype}")
            return keep, MatchResult.fail("the result broadcasts to another shape")
        return None

    def check(node: fx.Node) -> MatchResult | None:
        found = find(node)
        return found[1] if found else None

    def rewrite(node: fx.Node) -> Any:
        return node.args[find(node)[0]]

    return check, rewrite


def _input(node: fx.Node) -> Any:
    return node.args[0]


def _split_input(node: fx.Node) -> Any:
    return node.args[0].args[0]


def _cat_input(node: fx.Node) -> Any:
    return node.args[0][0]


RULES: tuple[Rule, ...] = (
    Rule("eval-dropout", (aten.dropout.default, aten.feature_dropout.default), _dropout, _input),
    Rule("same-shape-view", (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                             aten.expand.default, aten.flatten.using_ints, aten.alias.default,
                             aten.view_as.default, aten.reshape_as.default, aten.expand_as.default,
                             aten.unflatten.int, aten.view.dtype), _keeps_input, _input),
    Rule("non-unit-squeeze", (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims), _squeeze, _input),
    Rule("redundant-copy", (aten.contiguous.default, aten.clone.default), _copy, _input),
    Rule("same-type-conversion", (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                                  aten.type_as.default), _convert, _input),
    Rule("identity-permute", (aten.permute.default,), _permute, _input),
    Rule("identity-transpose", (aten.transpose.int, aten.swapaxes.default, aten.swapdims.default), _transpose,
         _input),
    Rule("identity-movedim", (aten.movedim.int, aten.movedim.intlist), _movedim, _input),
    Rule("vector-t", (aten.t.default,), _t, _input),
    Rule("full-slice", (aten.slice.Tensor, aten.narrow.default), _keeps_input, _input),
    Rule("whole-split", (operator.getitem,), _whole_split, _split_input),
    Rule("single-cat", (aten.cat.default, aten.concat.default), _single_cat, _cat_input),
    Rule("unit-repeat", (aten.repeat.default, aten.tile.default), _same_shape_copy, _input),
    Rule("zero-pad", (aten.pad.default, aten.constant_pad_nd.default), _zero_pad, _input),
    Rule("inverse-pair", (aten.t.default, aten.transpose.int, aten.permute.default), _inverse_pair,
         lambda node: node.args[0].args[0]),
    Rule("mul-by-one", (aten.mul.Tensor, aten.mul.Scalar), *_neutral_operand(1, commutes=True)),
    Rule("div-by-one", (aten.div.Tensor, aten.div.Scalar), *_neutral_operand(1, commutes=False)),
    Rule("add-zero", (aten.add.Tensor, aten.add.Scalar), *_neutral_operand(0, commutes=True)),
    Rule("sub-zero", (aten.sub.Tensor, aten.sub.Scalar), *_neutral_operand(0, commutes=False)),
    Rule("pow-one", (aten.pow.Tensor_Scalar,), *_neutral_operand(1, commutes=False)),
)

NOOP = rule_pass("noop", RULES, exact=True, doc=__doc__ or "")
