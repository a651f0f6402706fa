"""Rules, passes, reports and the pipeline that runs them with verification after every step.

A *rule* is data: the ops it looks at, a check that either declines silently (``None``: not a
candidate), declines with a reason (a near-miss the report keeps), or accepts, and a rewrite that
returns the value replacing the node. A *pass* is a named graph transformation that declares
whether it is exact; :func:`rule_pass` builds one from a tuple of rules (tuples compose with ``+``).

The framework does the bookkeeping so that no pass counts by hand: it diffs the node set before and
after, tags created nodes with ``node.meta["graphopt_pass"]``, lints and recompiles, measures FLOPs,
and checks the outputs against the original model on the example inputs. Observability switches:

- ``GRAPHOPT_DEBUG=1``: log per-rule hits, near-misses and time (logger ``graphopt``).
- ``GRAPHOPT_DUMP_GRAPHS=dir``: write each pass's graph before and after as Python code.
- ``GRAPHOPT_DISABLE_PASSES=a,b``: skip exact passes by name (for bisection); the report says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from .capture import CapturedGraph
from .errors import PassError, VerificationError
from .fxgraph import copy_sharing_weights
from .verify import HALF_DTYPES, compare, compare_precise, precise_run

log = logging.getLogger("graphopt")


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """A check's verdict; falsy with a ``reason`` when the rule declines a candidate."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @staticmethod
    def success() -> "MatchResult":
        return MatchResult(True)

    @staticmethod
    def fail(reason: str) -> "MatchResult":
        return MatchResult(False, reason)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One local rewrite: ``check(node)`` then ``rewrite(node) -> replacement`` for nodes whose target is in ``targets``."""

    name: str
    targets: tuple[Any, ...]
    check: Callable[[fx.Node], MatchResult | None]
    rewrite: Callable[[fx.Node], Any]


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A candidate a rule declined, and why."""

    rule: str
    node: str
    module: str
    reason: str


class PassContext:
    """What a running pass tells the framework: rule hits, near-misses, notes and new graph inputs."""

    def __init__(self, pass_name: str, gm: fx.GraphModule | None = None):
        self.pass_name = pass_name
        self.hits: Counter[str] = Counter()
        self.near_misses: dict[tuple[str, str], NearMiss] = {}
        self.notes: list[str] = []
        self.new_inputs: list[tuple[str, torch.Tensor]] = []
        self._gm = gm

    def add_input(self, name: str, example: torch.Tensor) -> fx.Node:
        """Give the graph a new flat tensor input after the existing ones (a runtime knob such as
        ``skip_scales``); ``example`` is its value when verifying and its default when a caller omits
        it. Returns the placeholder node."""
        if self._gm is None:
            raise RuntimeError("this context is not attached to a graph")
        from .fxgraph import add_input

        node = add_input(self._gm, name, example)
        self.new_inputs.append((name, example.detach().clone()))
        return node

    def hit(self, rule: str, count: int = 1) -> None:
        if count:
            self.hits[rule] += count

    def near_miss(self, rule: str, node: fx.Node, reason: str) -> None:
        key = (rule, node.name)
        if key not in self.near_misses:
            self.near_misses[key] = NearMiss(rule, node.name, node.meta.get("graphopt_module", ""), reason)

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclasses.dataclass(frozen=True)
class Pass:
    """A named graph transformation. ``transform`` edits ``gm`` in place and reports through ``ctx``."""

    name: str
    exact: bool
    transform: Callable[[fx.GraphModule, PassContext], None]
    doc: str = ""


def rule_pass(name: str, rules: Sequence[Rule], *, exact: bool = True, doc: str = "",
              max_rounds: int = 8) -> Pass:
    """A pass that applies ``rules`` node by node until nothing matches (at most ``max_rounds`` sweeps)."""
    by_target: dict[Any, list[Rule]] = {}
    for rule in rules:
        for target in rule.targets:
            by_target.setdefault(target, []).append(rule)

    def transform(gm: fx.GraphModule, ctx: PassContext) -> None:
        for _ in range(max_rounds):
            changed = False
            for node in list(gm.graph.nodes):
                if node.op != "call_function" or node.graph is not gm.graph:
                    continue
                for rule in by_target.get(node.target, ()):
                    verdict = rule.check(node)
                    if verdict is None:
                        continue
                    if not verdict:
                        ctx.near_miss(rule.name, node, verdict.reason)
                        continue
                    replacement = rule.rewrite(node)
                    node.replace_all_uses_with(replacement)
                    _erase_with_dead_inputs(gm.graph, node)
                    ctx.hit(rule.name)
                    ctx.near_misses.pop((rule.name, node.name), None)
                    changed = True
                    break
            if not changed:
                return

    return Pass(name, exact, transform, doc)


def _erase_with_dead_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the pure nodes that fed only it (what a bypassing rewrite leaves behind)."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for inp in inputs:
        if not inp.users and inp.op == "call_function" and not inp.is_impure():
            _erase_with_dead_inputs(graph, inp)


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What one pass did. FLOPs are per call at the example batch; errors are against the original model."""

    name: str
    exact: bool
    skipped: bool
    hits: int
    rule_hits: tuple[tuple[str, int], ...]
    near_misses: tuple[NearMiss, ...]
    nodes_before: int
    nodes_after: int
    nodes_added: int
    nodes_removed: int
    flops_before: float
    flops_after: float
    max_abs_error: float
    max_rel_error: float
    verified: bool
    time_s: float
    notes: tuple[str, ...] = ()
    quality: dict[str, Any] | None = None
    """Approximate passes: the measured :class:`graphopt.quality.QualityCost` as JSON."""
    tolerance: str = ""
    """The bound the outputs were verified against (:attr:`graphopt.verify.Comparison.tolerance`)."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["near_misses"] = [dataclasses.asdict(m) for m in self.near_misses]
        data["rule_hits"] = dict(self.rule_hits)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> "PassReport":
        data = dict(data)
        data["near_misses"] = tuple(NearMiss(**m) for m in data["near_misses"])
        data["rule_hits"] = tuple(data["rule_hits"].items())
        data["notes"] = tuple(data.get("notes", ()))
        data.setdefault("quality", None)
        return PassReport(**data)


def run_passes(captured: CapturedGraph, passes: Iterable[Pass], *,
               flops: Callable[[fx.GraphModule], float] | None = None) -> tuple[PassReport, ...]:
    """Run ``passes`` in order on ``captured.graph_module`` (in place), verifying after each one.

    An exact pass whose outputs leave the dtype's bound (in fp16/bf16, the rule of
    :func:`graphopt.verify.compare_precise`) raises :class:`VerificationError` naming it; a pass that
    raises or leaves an invalid graph raises :class:`PassError`. A pass that adds graph inputs needs
    :func:`run_pipeline`, which also returns the updated capture.
    """
    return run_pipeline(captured, passes, flops=flops)[1]


def _with_inputs(captured: CapturedGraph, new: list[tuple[str, torch.Tensor]]) -> CapturedGraph:
    """``captured`` with extra flat inputs appended (call spec, guards and example inputs)."""
    from .capture import TensorGuard

    guards = [TensorGuard(str(t.dtype).removeprefix("torch."), t.device.type, tuple(int(s) for s in t.shape))
              for _, t in new]
    return dataclasses.replace(
        captured, call=dataclasses.replace(captured.call, extras=captured.call.extras + tuple(n for n, _ in new)),
        guards=dataclasses.replace(captured.guards, tensors=captured.guards.tensors + tuple(guards)),
        example_inputs=captured.example_inputs + tuple(t for _, t in new))


def run_pipeline(captured: CapturedGraph, passes: Iterable[Pass], *,
                 flops: Callable[[fx.GraphModule], float] | None = None
                 ) -> tuple[CapturedGraph, tuple[PassReport, ...]]:
    """:func:`run_passes`, returning the capture as the passes left it (with any inputs they added)."""
    disabled = {p.strip() for p in os.environ.get("GRAPHOPT_DISABLE_PASSES", "").split(",") if p.strip()}
    dump_dir = os.environ.get("GRAPHOPT_DUMP_GRAPHS")
    debug = os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")
    gm = captured.graph_module
    count_flops = flops or (lambda _gm: float("nan"))
    reports = []
    # fp16/bf16: the graph as captured, to run in fp32 if a pass's outputs leave the dtype's plain bound
    original = copy_sharing_weights(gm) if any(t.dtype in HALF_DTYPES for t in captured.reference_outputs) else None
    original_inputs = captured.example_inputs  # passes may append inputs; the original graph takes these
    for index, p in enumerate(passes):
        n_nodes = len(gm.graph.nodes)
        flops_now = count_flops(gm)
        if p.name in disabled:
            reports.append(PassReport(p.name, p.exact, True, 0, (), (), n_nodes, n_nodes, 0, 0, flops_now,
                                      flops_now, 0.0, 0.0, False, 0.0, ("disabled by GRAPHOPT_DISABLE_PASSES",)))
            continue
        if dump_dir:
            _dump(dump_dir, index, p.name, "before", gm)
        before = set(gm.graph.nodes)
        ctx = PassContext(p.name, gm)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                p.transform(gm, ctx)
            gm.graph.lint()
            gm.recompile()
        except Exception as e:
            raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - start
        after = set(gm.graph.nodes)
        for node in after - before:
            node.meta["graphopt_pass"] = p.name
        if ctx.new_inputs:
            captured = _with_inputs(captured, ctx.new_inputs)
        try:
            with torch.no_grad():
                outputs = captured.run(captured.example_inputs)
        except Exception as e:
            raise PassError(f"pass '{p.name}' left a graph that does not run: {type(e).__name__}: {e}") from e
        if p.exact and original is not None:
            cmp = compare_precise(outputs, captured.reference_outputs,
                                  lambda: precise_run(original, original_inputs))
        else:
            cmp = compare(outputs, captured.reference_outputs)
        if p.exact and not cmp.within:
            raise VerificationError(f"exact pass '{p.name}' changed the outputs: {cmp.line()} "
                                    f"(output {cmp.worst_output}); disable it with GRAPHOPT_DISABLE_PASSES={p.name}")
        report = PassReport(
            name=p.name, exact=p.exact, skipped=False, hits=sum(ctx.hits.values()),
            rule_hits=tuple(sorted(ctx.hits.items())), near_misses=tuple(ctx.near_misses.values()),
            nodes_before=len(before), nodes_after=len(after), nodes_added=len(after - before),
            nodes_removed=len(before - after), flops_before=flops_now, flops_after=count_flops(gm),
            max_abs_error=cmp.max_abs_error, max_rel_error=cmp.max_rel_error, verified=cmp.within,
            time_s=elapsed, notes=tuple(ctx.notes), tolerance=cmp.tolerance)
        if debug:
            log.warning("pass %s: %d hits %s, %d near-misses, %d -> %d nodes, %.3fs, %s", p.name, report.hits,
                        dict(report.rule_hits), len(report.near_misses), report.nodes_before,
                        report.nodes_after, elapsed, cmp.line())
            for miss in report.near_misses:
                log.warning("  near-miss %s at %s (%s): %s", miss.rule, miss.node, miss.module, miss.reason)
        if dump_dir:
            _dump(dump_dir, index, p.name, "after", gm)
        reports.append(report)
    return captured, tuple(reports)


def _dump(directory: str, index: int, name: str, when: str, gm: fx.GraphModule) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{index:02d}-{name}-{when}.py").write_text(gm.code)
