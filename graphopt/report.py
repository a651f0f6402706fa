"""The optimization report: what ``optimize`` measured, pass by pass, and what lowering or compiling did.

Plain data (JSON in a saved folder's report.json); reading it needs neither Triton nor a compiler.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from .pipeline import PassReport


@dataclasses.dataclass(frozen=True)
class OptimizationReport:
    """Everything ``optimize`` measured: capture time, one :class:`PassReport` per pass, re-captures."""

    model: str
    target: str
    example_batch: int | None
    batch_range: tuple[int, int | None] | None
    capture_time_s: float
    passes: tuple[PassReport, ...]
    recaptures: int = 0
    lowering: dict[str, Any] | None = None
    """target="cuda": the :class:`~graphopt.autotune.lower.LoweringReport` as JSON (regions, kernels, error)."""
    cuda_graphs: bool = False
    fingerprint: str = ""
    """The original model's architecture fingerprint (:func:`graphopt.plan.fingerprint`): sampling
    plans made for that model fit this module, also after save and load."""
    compiled: dict[str, Any] | None = None
    """compile=True: the :class:`~graphopt.compiled.CompiledReport` as JSON (backend, seconds, error)."""
    load_s: dict[str, float] | None = None
    """A module from :func:`graphopt.load`: seconds per phase of that load: ``files`` (hashes, metadata,
    example inputs), ``graph`` (reading model.pt2 and, with ``verify``, running it on the saved inputs;
    absent while the graph is deferred), ``package`` (loading and checking the compiled CPU program),
    ``lowering`` (target="cuda": partition, kernels and their checks). Not saved."""

    @property
    def flops_before(self) -> float:
        return self.passes[0].flops_before if self.passes else float("nan")

    @property
    def flops_after(self) -> float:
        return self.passes[-1].flops_after if self.passes else float("nan")

    def table(self) -> str:
        """The per-pass table: matches, nodes before/after, FLOPs before/after, max error, time."""
        batch = f"batch {self.example_batch}" if self.example_batch else "per call"
        rng = self.batch_range
        dyn = f"dynamic batch [{rng[0]}, {'inf' if rng[1] is None else rng[1]}]" if rng else "static shapes"
        lines = [f"{self.model} on {self.target}: captured in {self.capture_time_s:.2f}s, {dyn}, "
                 f"{self.recaptures} re-capture(s)"]
        head = ("pass", "kind", "hits", "nodes", f"FLOPs ({batch})", "max abs err", "max rel err", "time")
        rows = [head]
        for p in self.passes:
            kind = "exact" if p.exact else "approx"
            if p.skipped:
                rows.append((p.name, kind, "-", f"{p.nodes_before}", "-", "-", "-", "skipped"))
                continue
            rows.append((p.name, kind, str(p.hits), f"{p.nodes_before} -> {p.nodes_after}",
                         f"{_flops(p.flops_before)} -> {_flops(p.flops_after)}", _err(p.max_abs_error),
                         _err(p.max_rel_error), f"{p.time_s:.3f}s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        bounds = [(p.name, p.tolerance) for p in self.passes if p.exact and not p.skipped and p.tolerance]
        if bounds:  # one line for the dtype's bound, one per pass an fp32 run had to judge
            common = Counter(b for _, b in bounds).most_common(1)[0][0]
            lines.append(f"exact passes verified against the original model, {common}")
            lines.extend(f"{name}: verified {bound}" for name, bound in bounds if bound != common)
        if self.lowering is not None:
            from graphopt.autotune.lower import LoweringReport  # plain Python: no Triton needed to read it

            lines.append(LoweringReport.from_json(self.lowering).text() + (
                "\nlower: replayed as CUDA graphs, one per input layout (a layout whose recording fails "
                "launches directly, with a warning)" if self.cuda_graphs else
                "\nlower: kernels launched directly, no CUDA graphs (cuda_graphs=False, or no GPU)"))
        if self.load_s is not None:
            lines.append(f"load: {sum(self.load_s.values()):.2f}s (" + ", ".join(
                f"{k} {v:.2f}s" for k, v in self.load_s.items()) + ")" + (
                "" if "graph" in self.load_s else "; the graph is read when first needed") + (
                "; calls in the stored layouts run the forwards an earlier load stored on this machine "
                "(kernel[grid] launches)" if "forwards" in self.load_s else ""))
        if self.compiled is not None:
            from .compiled import CompiledReport

            compiled = CompiledReport(**self.compiled)
            lines.append(compiled.line() + (f" ({compiled.note})" if compiled.note else ""))
        for p in self.passes:
            if p.quality is not None:
                from .quality import QualityCost

                lines.append(f"{p.name}: quality {QualityCost.from_json(p.quality).line()}")
            if not p.exact:  # what an approximate change chose (kept layers, tuned values) is part of its cost
                lines.extend(f"{p.name}: {note}" for note in p.notes)
            if p.rule_hits:
                lines.append(f"{p.name}: " + ", ".join(f"{r} x{n}" for r, n in p.rule_hits))
            for miss in p.near_misses[:5]:
                lines.append(f"{p.name}: near-miss {miss.rule} at {miss.node}"
                             + (f" ({miss.module})" if miss.module else "") + f": {miss.reason}")
            if len(p.near_misses) > 5:
                lines.append(f"{p.name}: ... {len(p.near_misses) - 5} more near-misses")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passes"] = [p.to_json() for p in self.passes]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> "OptimizationReport":
        data = dict(data)
        data["passes"] = tuple(PassReport.from_json(p) for p in data["passes"])
        data["batch_range"] = tuple(data["batch_range"]) if data["batch_range"] else None
        return OptimizationReport(**data)


def _err(value: float) -> str:
    return "-" if value != value else f"{value:.2e}"  # approximate passes are measured by quality instead


def _flops(value: float) -> str:
    if value != value:
        return "?"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.0f}"
