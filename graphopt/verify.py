"""Numerical comparison with a dtype-aware tolerance.

An output ``y`` matches its reference ``r`` when ``max|y - r| <= atol + rtol * max|r|``: the
tolerance scales with the output's magnitude, as a relative error on the whole tensor rather than
per element (per-element relative error explodes near zero and says nothing about image quality).
The reported relative error is ``max|y - r| / max|r|``.

In fp16 and bf16 that bound is a few ulps, and two evaluations of a deep network that round at
different points (a fused kernel keeps in fp32 what eager rounds after every op) can differ by more
while neither is less accurate: :func:`compare_precise` then asks an fp32 run of the same graph
(:func:`precise_run`) which of them is further from the exact result. Every comparison states the
bound it applied (``Comparison.tolerance``), so a report says what "verified" meant.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Callable, Sequence

import torch
from torch import fx

# (atol, rtol) per dtype: a few ulps of accumulated rounding for graph rewrites that reorder nothing,
# loose enough for reduced precision where one re-association moves the last bits.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


HALF_DTYPES = (torch.float16, torch.bfloat16)
PRECISE_MULTIPLIER = 2.0
"""A reduced-precision output judged against an fp32 run may be this many times further from it than
the original model's own output is (plus the dtype's atol): the rule torch's own accuracy checker
(``torch._dynamo.utils.same`` with an fp64 reference) applies to compiled models."""


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; integers and booleans must match exactly."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


def bound_text(dtypes: Sequence[torch.dtype], atol: float | None = None, rtol: float | None = None) -> str:
    """The plain bound for outputs of these dtypes, in words: ``bfloat16: max|err| <= 0.01 + 0.02 x max|ref|``."""
    parts = []
    for dtype in dict.fromkeys(dtypes):
        a, r = tolerance(dtype)
        a, r = (a if atol is None else atol), (r if rtol is None else rtol)
        name = str(dtype).removeprefix("torch.")
        parts.append(f"{name}: exact" if a == r == 0 else f"{name}: max|err| <= {a:g} + {r:g} x max|ref|")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far a set of outputs is from its reference; ``within`` tells whether every output passes."""

    max_abs_error: float
    max_rel_error: float
    within: bool
    worst_output: int
    tolerance: str = ""
    """The bound the outputs were held to, in words (:func:`bound_text`, or :func:`compare_precise`'s rule)."""

    def line(self) -> str:
        verdict = "ok" if self.within else "FAILED"
        bound = f"; {self.tolerance}" if self.tolerance else ""
        return f"max abs err {self.max_abs_error:.3g}, max rel err {self.max_rel_error:.3g} ({verdict}{bound})"


def compare(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
            atol: float | None = None, rtol: float | None = None) -> Comparison:
    """Compare flat outputs against references; ``atol``/``rtol`` override the dtype's defaults."""
    if len(outputs) != len(references):
        return Comparison(float("inf"), float("inf"), False, -1)
    bound = bound_text([torch.as_tensor(r).dtype for r in references], atol, rtol)
    worst_abs, worst_rel, within, worst = 0.0, 0.0, True, -1
    for i, (out, ref) in enumerate(zip(outputs, references)):
        out = torch.as_tensor(out).detach().cpu()
        ref = torch.as_tensor(ref).detach().cpu()
        if out.shape != ref.shape:
            return Comparison(float("inf"), float("inf"), False, i, bound)
        a, r = tolerance(ref.dtype)
        a = a if atol is None else atol
        r = r if rtol is None else rtol
        if out.numel() == 0:
            continue
        diff = (out.double() - ref.double()).abs()
        nan_mismatch = bool((torch.isnan(out) != torch.isnan(ref)).any()) if ref.is_floating_point() else False
        err = float(torch.nan_to_num(diff, nan=0.0).max())
        scale = float(torch.nan_to_num(ref.double().abs(), nan=0.0).max())
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        ok = not nan_mismatch and err <= a + r * scale
        if nan_mismatch:
            err = rel = float("inf")
        if err >= worst_abs:
            worst = i
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
        within = within and ok
    return Comparison(worst_abs, worst_rel, within, worst, bound)


def compare_precise(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                    precise: Callable[[], Sequence[torch.Tensor]],
                    multiplier: float = PRECISE_MULTIPLIER) -> Comparison:
    """:func:`compare`; where fp16/bf16 outputs leave that bound, an fp32 run decides instead.

    ``precise()`` computes the same outputs in fp32 (:func:`precise_run`); it is called only when the
    plain comparison fails on finite, same-shaped fp16/bf16 outputs. Then each such output passes when
    ``max|out - precise| <= multiplier * max|ref - precise| + atol``: no further from the exact result
    than ``multiplier`` times the original's own rounding error. Other outputs keep the plain bound.
    The returned errors are still those against ``references``; ``tolerance`` states the rule applied
    with its numbers.
    """
    cmp = compare(outputs, references)
    refs = [torch.as_tensor(r) for r in references]
    if cmp.within or math.isinf(cmp.max_abs_error) or not any(r.dtype in HALF_DTYPES for r in refs):
        return cmp
    exact = tuple(precise())
    if len(exact) != len(refs):
        return cmp
    within, worst = True, (-math.inf, 0.0, 0.0, 0.0)  # (margin, error, original's error, atol)
    for out, ref, ex in zip(outputs, refs, exact):
        if ref.dtype not in HALF_DTYPES:
            within = within and compare([out], [ref]).within
            continue
        atol = tolerance(ref.dtype)[0]
        out, ref = torch.as_tensor(out).detach().cpu().double(), ref.detach().cpu().double()
        ex = torch.as_tensor(ex).detach().cpu().double()
        if ex.shape != ref.shape or bool((torch.isnan(out) != torch.isnan(ref)).any()):
            within = False
            continue
        err = float(torch.nan_to_num((out - ex).abs(), nan=0.0).max()) if out.numel() else 0.0
        own = float(torch.nan_to_num((ref - ex).abs(), nan=0.0).max()) if ref.numel() else 0.0
        margin = err - (multiplier * own + atol)
        within = within and margin <= 0
        if margin > worst[0]:
            worst = (margin, err, own, atol)
    rule = f"{bound_text([r.dtype for r in refs])} against the original not met"
    margin, err, own, atol = worst
    if margin > -math.inf:  # the half output closest to (or furthest past) its bound
        rule += (f"; against an fp32 run of the same graph max|err| {err:.3g} {'<=' if margin <= 0 else '>'} "
                 f"{multiplier:g} x the original's own {own:.3g} + {atol:g}")
    return dataclasses.replace(cmp, within=within, tolerance=rule)


def precise_run(gm: fx.GraphModule, inputs: Sequence[torch.Tensor],
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Run a copy of ``gm`` in ``dtype``: its fp16/bf16 parameters, buffers, tensor constants, inputs and
    dtype arguments (``x.to(torch.bfloat16)`` in the graph) raised to ``dtype``; ``gm`` is left as it was.

    The reference :func:`compare_precise` judges reduced-precision outputs by. An op that rounds to a
    half dtype some other way (a dtype computed at run time) still rounds in the copy.
    """
    def raise_dtype(arg: object) -> object:
        return dtype if isinstance(arg, torch.dtype) and arg in HALF_DTYPES else arg

    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec when copied
        warnings.simplefilter("ignore", FutureWarning)
        twin = copy.deepcopy(gm)
    with torch.no_grad():
        for tensor in [*twin.parameters(), *twin.buffers()]:
            if tensor.dtype in HALF_DTYPES:
                tensor.data = tensor.data.to(dtype)
        for node in twin.graph.nodes:
            if node.op == "get_attr":
                owner, _, name = node.target.rpartition(".")
                module = twin.get_submodule(owner) if owner else twin
                value = getattr(module, name, None)
                if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                        and value.dtype in HALF_DTYPES and name not in module._buffers:
                    setattr(module, name, value.to(dtype))
            elif node.op in ("call_function", "call_method"):
                node.args = fx.node.map_aggregate(node.args, raise_dtype)
                node.kwargs = fx.node.map_aggregate(node.kwargs, raise_dtype)
        twin.recompile()
        raised = [t.to(dtype) if t.is_floating_point() and t.dtype in HALF_DTYPES else t for t in inputs]
        out = twin(*raised)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)
