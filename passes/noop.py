"""no-op removal: delete operators that return their input unchanged.

Where it belongs: first. Exported graphs carry the model's Python habits as ops (eval-mode dropout,
``t.float()`` on a float tensor, ``x[:, :, None]`` as a full slice plus an unsqueeze, ``x * 1.0``);
removing them shortens the chains later passes match and the kernels fuse. Exact: every rule
replaces a node by a tensor with the same shape, dtype, device and values.

Rules decline silently when an op is simply not a no-op (a view that changes shape), and with a
reason when it nearly is (dropout still in training mode; ``x * 1`` that promotes the dtype;
``contiguous`` of a non-contiguous input, whose copy a later view needs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphopt.pipeline import MatchResult, Rule, rule_pass

from ._common import is_contiguous, same_tensor_type, shape_of, val

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


def _copy(node: fx.Node) -> MatchResult | None:
    if not same_tensor_type(node, node.args[0]):
        return None
    if not is_contiguous(node.args[0]):
        return MatchResult.fail("input is not contiguous: the copy may be what a later view needs")
    if node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        return MatchResult.fail(f"copy changes memory format to {node.kwargs['memory_format']}")
    src = node.args[0]
    if src.op == "placeholder" and any(u.op == "output" for u in node.users):
        return MatchResult.fail("copy of a graph input returned as output: removing it would alias the input")
    return MatchResult.success()


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


def _t(node: fx.Node) -> MatchResult | None:
    return MatchResult.success() if len(shape_of(node.args[0]) or (0, 0)) < 2 else None


def _slice(node: fx.Node) -> MatchResult | None:
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    dim = node.kwargs.get("dim", 0 if dim is None else dim)
    start, end = node.kwargs.get("start", start), node.kwargs.get("end", end)
    step = node.kwargs.get("step", 1 if step is None else step)
    shape = shape_of(node.args[0])
    if shape is None or step != 1 or start not in (None, 0):
        return None
    size = shape[dim]
    if end is None or (isinstance(end, int) and isinstance(size, int) and end >= size) or end == 2**63 - 1:
        return MatchResult.success() if same_tensor_type(node, node.args[0]) else None
    return None


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


RULES: tuple[Rule, ...] = (
    Rule("eval-dropout", (aten.dropout.default, aten.feature_dropout.default), _dropout, _input),
    Rule("same-shape-view", (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                             aten.expand.default, aten.flatten.using_ints, aten.alias.default), _keeps_input, _input),
    Rule("redundant-copy", (aten.contiguous.default, aten.clone.default), _copy, _input),
    Rule("same-type-conversion", (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                                  aten.type_as.default), _convert, _input),
    Rule("identity-permute", (aten.permute.default,), _permute, _input),
    Rule("identity-transpose", (aten.transpose.int,), _transpose, _input),
    Rule("vector-t", (aten.t.default,), _t, _input),
    Rule("full-slice", (aten.slice.Tensor,), _slice, _input),
    Rule("inverse-pair", (aten.t.default, aten.transpose.int, aten.permute.default), _inverse_pair,
         lambda node: node.args[0].args[0]),
    Rule("mul-by-one", (aten.mul.Tensor, aten.mul.Scalar), *_neutral_operand(1, commutes=True)),
    Rule("div-by-one", (aten.div.Tensor, aten.div.Scalar), *_neutral_operand(1, commutes=False)),
    Rule("add-zero", (aten.add.Tensor, aten.add.Scalar), *_neutral_operand(0, commutes=True)),
    Rule("sub-zero", (aten.sub.Tensor, aten.sub.Scalar), *_neutral_operand(0, commutes=False)),
    Rule("pow-one", (aten.pow.Tensor_Scalar,), *_neutral_operand(1, commutes=False)),
)

NOOP = rule_pass("noop", RULES, exact=True, doc=__doc__ or "")
