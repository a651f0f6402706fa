"""Triton source for one pointwise or norm region of a captured graph.

Where it belongs: between :mod:`.regions` (which nodes run together) and :mod:`.lower` (which loads
the source, launches it and tunes it). The output is plain, readable Python: one ``@triton.jit``
function per region, its operands named ``in0_ptr`` / ``out0_ptr``, one line per graph node with the
ATen op it came from.

Index math. A region iterates over its *domain*, the shape of its outputs, with one flat index
``x``. An operand of shape S and strides T (both aligned to the domain's rank, S_k = 1 where it is
broadcast) is read at::

    offset(x) = sum_{k : S_k != 1}  ((x // inner_k) mod D_k) * T_k,      inner_k = prod_{j > k} D_j

Adjacent domain dimensions are merged first where the operand allows it (both broadcast in it, or
both dense with T_k = T_{k+1} D_{k+1}: then idx_k T_k + idx_{k+1} T_{k+1} is one index over the pair), so a contiguous operand of the full shape reads at ``x`` and a
per-sample (B, 1, C) shift inside a (B, N, C) domain at ``C*(x // (N*C)) + x % C``. Sizes and strides
are sympy expressions straight from the capture's fake tensors: static sizes become literals and the
batch stays a symbol (an argument of the kernel), so one kernel serves every batch.

Norm regions (LayerNorm, GroupNorm, RMSNorm) run one program per normalised row of ``ROW`` elements:
the domain's flat index is ``row * ROW + r`` because the normalised dimensions are the innermost
ones (GroupNorm's groups are runs of whole channels). The kernel makes three passes over the row,
``RBLOCK`` elements at a time: the mean, the centred variance (two-pass, as the hand-written norms),
then the normalised value with the affine and every epilogue op, stored where the graph needs it.
A prologue (the pointwise ops producing the norm's input) is recomputed in each pass, and its values
that the graph needs elsewhere are stored in the last one. A few long rows (GroupNorm at batch 1:
32 rows of thousands of elements cannot fill a GPU with one program each) use the split form
instead: ``RSPLIT`` programs per row write per-chunk statistics to a workspace and a second kernel
combines them (Chan et al.'s pairwise formula) and applies the row's chunk::

    LayerNorm, GroupNorm:  y = (x - mean) / sqrt(var + eps) * w + b
    RMSNorm:               y = x / sqrt(mean(x^2) + eps) * w

Values are computed in fp32 and stored in each output's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence

import sympy
import torch
from sympy.printing.pycode import PythonCodePrinter
from torch import fx

from .regions import POINTWISE, Operand, Region, node_arg, op_name, shape_of, strides_of

aten = torch.ops.aten


class FloorDiv(sympy.Function):
    """``a // b`` for non-negative integers, kept unevaluated so it prints as Triton integer division."""

    is_integer = True

    @classmethod
    def eval(cls, a: sympy.Expr, b: sympy.Expr) -> sympy.Expr | None:
        if b == 1:
            return a
        if isinstance(a, FloorDiv):
            return FloorDiv(a.args[0], a.args[1] * b)
        return None


class ModIndex(sympy.Function):
    """``a % b`` for non-negative integers."""

    is_integer = True

    @classmethod
    def eval(cls, a: sympy.Expr, b: sympy.Expr) -> sympy.Expr | None:
        return sympy.Integer(0) if b == 1 else None


class _Printer(PythonCodePrinter):
    def _print_FloorDiv(self, e: FloorDiv) -> str:
        return f"({self._operand(e.args[0])} // {self._operand(e.args[1])})"

    def _print_ModIndex(self, e: ModIndex) -> str:
        return f"({self._operand(e.args[0])} % {self._operand(e.args[1])})"

    def _operand(self, e: sympy.Expr) -> str:
        """``e`` as an operand of ``//`` or ``%``, which bind as tightly as ``*``: a product or sum in
        parentheses (``x // (32*s0)``, not ``x // 32*s0``, which is ``(x // 32)*s0``)."""
        text = self._print(e)
        return text if e.is_Atom or isinstance(e, (FloorDiv, ModIndex)) else f"({text})"

    def _print_Symbol(self, e: sympy.Symbol) -> str:
        return str(e)


def pyexpr(e: sympy.Expr) -> str:
    return _Printer().doprint(e)


@dataclasses.dataclass(frozen=True)
class GeneratedKernel:
    """One region's kernel: its source and what the launcher needs to call it.

    ``inputs`` and ``outputs`` are the region's operands in argument order; ``symbols`` the size
    symbols the index math needs (passed after the pointers, then ``xnumel`` or ``ROWS``);
    ``row`` the normalised row length of a norm region (``None`` for a pointwise one).
    """

    name: str
    source: str
    region: Region
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    symbols: tuple[sympy.Symbol, ...]
    row: int | None

    @property
    def block_key(self) -> str:
        return "XBLOCK" if self.row is None else "RBLOCK"


def operands(region: Region) -> tuple[tuple[Operand, ...], tuple[Operand, ...]]:
    """The region's inputs and outputs aligned to its domain (GroupNorm's per-channel affine included)."""
    rank = len(region.domain)
    norm = region.norm
    special: dict[fx.Node, Operand] = {}
    if norm is not None and norm.target is aten.group_norm.default:
        # weight and bias are (C,): per channel, i.e. dimension 1 of (N, C, *spatial), not the last one
        for p in norm.args[2:4]:
            if isinstance(p, fx.Node):
                c = shape_of(p)[0]
                shape = (sympy.Integer(1), c) + (sympy.Integer(1),) * (rank - 2)
                special[p] = Operand(p, shape, (sympy.Integer(0), strides_of(p)[0]) + (sympy.Integer(0),) * (rank - 2))
    ins = tuple(special.get(n) or _aligned(n, rank) for n in region.inputs)
    outs = tuple(_aligned(n, rank) for n in region.outputs)
    return ins, outs


def memory_order(op: Operand) -> list[int]:
    """The operand's dimensions from the largest stride to the smallest (the batch taken as large)."""
    big = {s: 1 << 20 for e in (*op.shape, *op.strides) for s in e.free_symbols}
    size = [int(d.subs(big)) for d in op.shape]
    stride = [int(st.subs(big)) for st in op.strides]
    # size-1 dims carry arbitrary strides and no data: they keep their place at the outside
    return sorted(range(len(stride)), key=lambda k: (size[k] != 1, -stride[k]))


def _permuted(op: Operand, order: Sequence[int]) -> Operand:
    return Operand(op.node, tuple(op.shape[k] for k in order), tuple(op.strides[k] for k in order))


def _aligned(node: fx.Node, rank: int) -> Operand:
    shape, strides = shape_of(node), strides_of(node)
    pad = rank - len(shape)
    one, zero = sympy.Integer(1), sympy.Integer(0)
    return Operand(node, (one,) * pad + shape, (zero,) * pad + strides)


def merged_dims(domain: Sequence[sympy.Expr], ops: Sequence[Operand]) -> list[list[int]]:
    """Groups of adjacent domain dimensions that all of ``ops`` let the kernel index as one."""
    keep = [k for k, d in enumerate(domain) if d != 1] or [len(domain) - 1]
    groups = [[keep[0]]]
    for k in keep[1:]:
        j = groups[-1][-1]
        if all(_mergeable(op, j, k) for op in ops):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def _mergeable(op: Operand, j: int, k: int) -> bool:
    bj, bk = op.shape[j] == 1, op.shape[k] == 1
    if bj or bk:
        return bj and bk
    return sympy.simplify(op.strides[j] - op.strides[k] * op.shape[k]) == 0


def offset(op: Operand, domain: Sequence[sympy.Expr], groups: list[list[int]], x: sympy.Symbol) -> sympy.Expr:
    """Where ``op`` holds the element at flat domain index ``x`` (the module docstring's formula)."""
    sizes = [sympy.Mul(*(domain[k] for k in g)) for g in groups]
    total = sympy.Integer(0)
    for i, g in enumerate(groups):
        if all(op.shape[k] == 1 for k in g):
            continue
        inner = sympy.Mul(*sizes[i + 1:])
        idx = FloorDiv(x, inner)
        if i > 0:  # the outermost index needs no wrap: x < numel
            idx = ModIndex(idx, sizes[i])
        total += idx * op.strides[g[-1]]
    return total


def generate(region: Region) -> GeneratedKernel:
    """The Triton kernel of a pointwise or norm region."""
    if region.kind not in ("pointwise", "norm"):
        raise ValueError(f"no code generation for {region.kind} regions")
    ins, outs = operands(region)
    domain = region.domain
    if region.kind == "pointwise":
        # walk the domain in the first output's memory order: its stores (and same-layout loads) are then
        # coalesced even when eager gave it a permuted layout (DiT's residual stream after patchify)
        order = memory_order(outs[0])
        domain = tuple(domain[k] for k in order)
        ins, outs = (tuple(_permuted(op, order) for op in ops) for ops in (ins, outs))
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    # merging is per operand: an operand's offset depends on the domain and its own layout only
    offsets = [offset(op, domain, merged_dims(domain, [op]), x) for op in ins + outs]
    symbols = tuple(sorted({s for e in offsets for s in e.free_symbols if s != x}, key=str))
    body = _Body(region, ins, outs, [pyexpr(e) for e in offsets])
    pointers = [f"in{i}_ptr" for i in range(len(ins))] + [f"out{i}_ptr" for i in range(len(outs))]
    sizes = [str(s) for s in symbols]
    if region.kind == "pointwise":
        row = None
        functions = [("", pointers + ["xnumel", *sizes, "XBLOCK: tl.constexpr"], body.pointwise())]
    else:
        row = _row_length(region)
        stats, apply = body.norm_split(row)
        split = ["ws_ptr", "ROWS", *sizes, "RSPLIT: tl.constexpr", "RBLOCK: tl.constexpr"]
        functions = [("", pointers + ["ROWS", *sizes, "RBLOCK: tl.constexpr"], body.norm(row)),
                     ("_stats", [p for p in pointers if p.startswith("in")] + split, stats),
                     ("_apply", pointers + split, apply)]
    stem = "_".join(dict.fromkeys(region.ops()))[:48]
    digest = hashlib.sha256(repr(functions).encode()).hexdigest()[:8]
    name = f"fused_{stem}_{digest}"
    shown = ", ".join(pyexpr(d) for d in region.domain)
    lines = [
        f"# graphopt: {region.kind} region of {len(region.nodes)} ops over the domain ({shown})",
        "# generated from the captured graph; sizes are literals, the batch stays a symbol",
        "import triton",
        "import triton.language as tl",
    ]
    if row is not None:
        lines += ["", f"# {name}: one program per row; {name}_stats / _apply: RSPLIT programs per row, for",
                  "# few long rows (GroupNorm at batch 1), partial statistics through the fp32 workspace ws"]
    for suffix, params, body_lines in functions:
        lines += ["", "", "@triton.jit", f"def {name}{suffix}({', '.join(params)}):"]
        lines += ["    " + line for line in body_lines]
    source = "\n".join(lines) + "\n"
    return GeneratedKernel(name, source, region, ins, outs, symbols, row)


def _row_length(region: Region) -> int:
    norm = region.norm
    assert norm is not None
    shape = [int(s) for s in shape_of(norm.args[0])[1:]]
    if norm.target is aten.group_norm.default:
        return math.prod(shape) // int(norm.args[1])  # C/G channels of every group, all their pixels
    normalized = norm.args[1]
    return math.prod(int(s) for s in normalized)


def norm_params(norm: fx.Node) -> tuple[object, object, float]:
    """(weight, bias, eps) of a layer_norm / group_norm / rms_norm node, defaults filled in."""
    weight = node_arg(norm, 2, "weight")
    if norm.target is aten.rms_norm.default:
        eps = node_arg(norm, 3, "eps")
        # rms_norm's default eps is the dtype's machine epsilon
        return weight, None, float(torch.finfo(norm.meta["val"].dtype).eps if eps is None else eps)
    return weight, node_arg(norm, 3, "bias"), float(node_arg(norm, 4, "eps", 1e-5))


class _Body:
    """The statements of one kernel; ``v<i>`` is the i-th region node's value, ``in<i>`` a loaded input."""

    def __init__(self, region: Region, ins: Sequence[Operand], outs: Sequence[Operand], offsets: list[str]):
        self.region, self.ins, self.outs = region, ins, outs
        self.in_offsets = offsets[:len(ins)]
        # an output's offset lacks the index only when the domain is one element: lane 0 writes it
        self.out_offsets = [o if "xindex" in o else "xindex" for o in offsets[len(ins):]]
        self.names = {n: f"v{i}" for i, n in enumerate(region.nodes)}
        self.names.update({op.node: f"in{i}" for i, op in enumerate(ins)})
        self.computed: dict[str, str] = {}

    def _load(self, i: int, mask: str, other: str = "1.0") -> str:
        if "xindex" not in self.in_offsets[i]:  # one element broadcast to all: a scalar load, always in bounds
            return f"in{i} = tl.load(in{i}_ptr + {self.in_offsets[i]}).to(tl.float32)"
        # masked-off lanes are never stored; 1.0 keeps log / div / rsqrt of them finite and quiet
        return f"in{i} = tl.load(in{i}_ptr + {self.in_offsets[i]}, mask={mask}, other={other}).to(tl.float32)"

    def _arg(self, a: object) -> str:
        if isinstance(a, fx.Node):
            return self.names[a]
        if isinstance(a, bool):
            return "1.0" if a else "0.0"
        if isinstance(a, (int, float)):
            return repr(float(a))
        return repr(a)  # strings (gelu's approximate=) go to the emitter as they are

    def _node(self, n: fx.Node) -> str:
        args = [self._arg(a) for a in n.args]
        kwargs = {k: (v if isinstance(v, str) else self._arg(v)) for k, v in n.kwargs.items()}
        if n.target is aten.gelu.default and len(args) > 1:
            kwargs["approximate"], args = n.args[1], args[:1]
        if n.target is aten.pow.Tensor_Scalar:
            expr = POINTWISE[n.target](args[0], float(n.args[1]))
        else:
            expr = POINTWISE[n.target](*args, **kwargs)
        if (same := self.computed.get(expr)) is not None:  # e.g. one silu(c) read by every adaLN projection
            self.names[n] = same
            return f"# {op_name(n)}: same value as {same}"
        self.computed[expr] = self.names[n]
        return f"{self.names[n]} = {expr}  # {op_name(n)}"

    def _stores(self, mask: str) -> list[str]:
        return [f"tl.store(out{i}_ptr + {self.out_offsets[i]}, {self.names[op.node]}.to(out{i}_ptr.dtype.element_ty), "
                f"mask={mask})" for i, op in enumerate(self.outs)]

    def _epilogue(self, nodes: Sequence[fx.Node], mask: str, skip: int | None = None) -> list[str]:
        lines = [self._load(i, mask) for i in range(len(self.ins)) if i != skip]
        lines += [self._node(n) for n in nodes]
        return lines + self._stores(mask)

    def pointwise(self) -> list[str]:
        return [
            "xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)",
            "xmask = xindex < xnumel",
            *self._epilogue(self.region.nodes, "xmask"),
        ]

    def _norm_parts(self) -> tuple:
        region = self.region
        norm = region.norm
        assert norm is not None
        prologue = region.prologue()
        epilogue = [n for n in region.nodes if n is not norm and n not in prologue]
        weight, bias, eps = norm_params(norm)
        x = self.names[norm.args[0]]  # an input, or the prologue's last value
        # what every pass over the row needs: the norm's input, computed from the prologue's inputs
        needed = {a for n in prologue for a in n.all_input_nodes} | {norm.args[0]}
        first = [i for i, op in enumerate(self.ins) if op.node in needed]
        value = f"({x} - mean) * rstd"
        if isinstance(weight, fx.Node):
            value += f" * {self.names[weight]}"
        if isinstance(bias, fx.Node):
            value += f" + {self.names[bias]}"
        return norm, prologue, epilogue, eps, x, first, value

    def _pass(self, header: list[str], first: list[int], prologue: Sequence[fx.Node],
              stats: Callable[[], list[str]]) -> list[str]:
        """One loop over (part of) a row: load the prologue's inputs, compute it, then ``stats()``."""
        self.computed.clear()  # each loop computes its own values
        body = [self._load(i, "rmask") for i in first] + [self._node(n) for n in prologue]
        body += stats()  # after the prologue: its values are what the statistics read
        return header + ["    " + line for line in body]

    def _last_pass(self, header: list[str], row: int) -> list[str]:
        norm, prologue, epilogue, eps, x, first, value = self._norm_parts()
        rest = [self._load(i, "rmask") for i in range(len(self.ins)) if i not in first]
        return self._pass(header, first, prologue, lambda: [
            *rest, f"{self.names[norm]} = {value}  # {op_name(norm)}", *(self._node(n) for n in epilogue),
            *self._stores("rmask")])

    def norm(self, row: int) -> list[str]:
        norm, prologue, _, eps, x, first, _ = self._norm_parts()
        rms = norm.target is aten.rms_norm.default
        loop = [f"for roff in range(0, {row}, RBLOCK):", "    rindex = roff + rbase",
                f"    rmask = rindex < {row}", f"    xindex = row * {row} + rindex"]
        lines = ["row = tl.program_id(0).to(tl.int64)", "rbase = tl.arange(0, RBLOCK)",
                 "acc = tl.zeros([RBLOCK], dtype=tl.float32)"]
        # masked-off lanes hold padding (or a prologue computed on it): tl.where keeps them out of the sums
        if rms:
            lines += [*self._pass(loop, first, prologue, lambda: [f"xm = tl.where(rmask, {x}, 0.0)", "acc += xm * xm"]),
                      f"rstd = tl.rsqrt(tl.sum(acc, axis=0) / {row} + {eps!r})", "mean = 0.0"]
        else:
            lines += [*self._pass(loop, first, prologue, lambda: [f"acc += tl.where(rmask, {x}, 0.0)"]),
                      f"mean = tl.sum(acc, axis=0) / {row}", "acc = tl.zeros([RBLOCK], dtype=tl.float32)",
                      *self._pass(loop, first, prologue, lambda: [f"d = tl.where(rmask, {x} - mean, 0.0)",
                                                                   "acc += d * d"]),
                      f"rstd = tl.rsqrt(tl.sum(acc, axis=0) / {row} + {eps!r})"]
        return lines + self._last_pass(loop, row)

    def norm_split(self, row: int) -> tuple[list[str], list[str]]:
        """The two kernels of the split form: per-chunk statistics, then combine and apply.

        Chunk s of a row holds n_s elements with mean m_s and centred sum of squares M2_s; the row's
        are mean = sum n_s m_s / N and M2 = sum M2_s + n_s (m_s - mean)^2 (Chan et al.), so no chunk
        ever subtracts a large mean from E[x^2]. RMSNorm needs only sum x^2.
        """
        norm, prologue, _, eps, x, first, _ = self._norm_parts()
        rms = norm.target is aten.rms_norm.default
        head = ["row = tl.program_id(0).to(tl.int64)", "split = tl.program_id(1)",
                f"CHUNK: tl.constexpr = ({row} + RSPLIT - 1) // RSPLIT", "start = split * CHUNK",
                "rbase = tl.arange(0, RBLOCK)"]
        loop = ["for roff in range(0, CHUNK, RBLOCK):", "    rindex = start + roff + rbase",
                f"    rmask = (roff + rbase < CHUNK) & (rindex < {row})", f"    xindex = row * {row} + rindex"]
        stats = [*head, f"count = tl.maximum(tl.minimum(CHUNK, {row} - start), 0).to(tl.float32)",
                 "acc = tl.zeros([RBLOCK], dtype=tl.float32)"]
        if rms:
            stats += [*self._pass(loop, first, prologue, lambda: [f"xm = tl.where(rmask, {x}, 0.0)", "acc += xm * xm"]),
                      "mean = 0.0", "m2 = tl.sum(acc, axis=0)"]
        else:
            stats += [*self._pass(loop, first, prologue, lambda: [f"acc += tl.where(rmask, {x}, 0.0)"]),
                      "mean = tl.sum(acc, axis=0) / tl.maximum(count, 1.0)",
                      "acc = tl.zeros([RBLOCK], dtype=tl.float32)",
                      *self._pass(loop, first, prologue, lambda: [f"d = tl.where(rmask, {x} - mean, 0.0)",
                                                                   "acc += d * d"]),
                      "m2 = tl.sum(acc, axis=0)"]
        stats += ["ws = ws_ptr + (row * RSPLIT + split) * 3",
                  "tl.store(ws, count)", "tl.store(ws + 1, mean)", "tl.store(ws + 2, m2)"]
        combine = [*head, "parts = ws_ptr + (row * RSPLIT + tl.arange(0, RSPLIT)) * 3",
                   "counts = tl.load(parts)", "means = tl.load(parts + 1)", "m2s = tl.load(parts + 2)"]
        if rms:
            combine += ["mean = 0.0", f"rstd = tl.rsqrt(tl.sum(m2s, axis=0) / {row} + {eps!r})"]
        else:
            combine += [f"mean = tl.sum(counts * means, axis=0) / {row}",
                        "dm = means - mean",
                        f"rstd = tl.rsqrt(tl.sum(m2s + counts * dm * dm, axis=0) / {row} + {eps!r})"]
        return stats, combine + self._last_pass(loop, row)
