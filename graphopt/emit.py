"""Emission: the optimized model as an nn.Module with the original call signature.

``optimize`` captures, runs the pass pipeline (verified after each pass) and returns an
:class:`OptimizedModule`. Calls bind to the original forward signature, are checked against what
the graph was captured for (dtypes, static sizes, the symbolic batch's range, non-tensor
arguments), and come back in the original output structure. A call outside the captured range is
re-captured for its shapes (counted in the report) when the original model is at hand; a loaded
module, which has no Python model, says so instead of guessing. Saving and loading live in
:mod:`graphopt.saved`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn
from torch.export import Dim

from . import structure
from .capture import (CapturedGraph, _batch_size, _locate, batch_one_matches, capture, kept_state, retrace, training_modules,
                      without_batch_one)
from .errors import CaptureError, InputError, UsageError, VerificationError, first_line
from .logs import quiet
from .pipeline import Pass, PassReport, run_pipeline

TARGETS = ("cpu", "cuda")


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
        if self.lowering is not None:
            from graphopt.autotune.lower import LoweringReport  # plain Python: no Triton needed to read it

            lines.append(LoweringReport.from_json(self.lowering).text()
                         + ("\nlower: replayed as CUDA graphs, one per input layout" if self.cuda_graphs else ""))
        if self.compiled is not None:
            from .compiled import CompiledReport

            compiled = CompiledReport(**self.compiled)
            lines.append(compiled.line() + (f" ({compiled.note})" if compiled.note else ""))
        for p in self.passes:
            if p.quality is not None:
                from .quality import QualityCost

                lines.append(f"{p.name}: quality {QualityCost.from_json(p.quality).line()}")
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


class OptimizedModule(nn.Module):
    """An optimized model: call it like the original; ``.report``, ``.save(dir)``.

    ``graph_module`` is the optimized graph of the main variant (the one captured at
    ``optimize`` time); calls outside its range run re-captured variants.
    """

    def __init__(self, captured: CapturedGraph, report: OptimizationReport, *, source: nn.Module | None = None,
                 passes: Sequence[Pass] = (), flops: Callable[[fx.GraphModule], float] | None = None,
                 source_eval: bool = False):
        super().__init__()
        self.variants = nn.ModuleList([captured.graph_module])
        self.lowered = nn.ModuleList()  # target="cuda": the variants with regions on Triton kernels
        self._runtimes: list[Any] = []  # target="cuda": one graphopt.autotune.runtime.Runtime per lowered variant
        self._graph_runners: list[Any] | None = None  # cuda_graphs=True: one CudaGraphRunner per lowered variant
        self._captured = [captured]
        self._report = report
        self._source = source
        self._source_eval = source_eval  # run the source as in eval mode (optimize(..., eval_mode=True))
        self._passes = tuple(passes)
        self._flops = flops
        self._recaptures = 0
        self._blocks: dict[int, tuple[Any, ...]] = {}  # variant index -> its skippable blocks
        # (variant, skipped ids) -> its graph, or for a lowered variant the Runtime of its lowered graph
        self._skip_graphs: dict[tuple[int, frozenset[int]], Any] = {}
        self._compiled: Any = None  # compile(): the main variant as Inductor's CPU program

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.variants[0]

    def _reset(self, captured: CapturedGraph) -> None:
        """Make ``captured`` the canonical graph (an approximate pass changed it): variants and caches
        built from the previous one are dropped."""
        if len(self.lowered):
            raise RuntimeError("approximate passes run before lowering")
        self._captured = [captured]
        self.variants = nn.ModuleList([captured.graph_module])
        self._blocks.clear()
        self._skip_graphs.clear()
        if self._compiled is not None:  # compiled from the previous graph: compile() again for the new one
            self._compiled = None
            self._report = dataclasses.replace(self._report, compiled=None)

    @property
    def captured(self) -> CapturedGraph:
        return self._captured[0]

    def _lower_variant(self, captured: CapturedGraph) -> dict[str, Any]:
        """Lower ``captured`` (the next variant) onto Triton kernels, checked region by region."""
        from graphopt.autotune.runtime import Runtime

        gm, report = lower_captured(captured)
        self.lowered.append(gm)
        self._runtimes.append(Runtime(gm, dump_dir=report.get("dump_dir")))
        return report

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # .to() / .half() / .cuda() may replace the parameters a generated forward holds: write new ones
        result = super()._apply(fn, *args, **kwargs)
        for runtime in self._runtimes:
            runtime.clear()
        self._skip_graphs.clear()
        return result

    def kernel_calls(self, *args: Any, **kwargs: Any) -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        """Every kernel call site this call meets, with the tensors it is called with (target="cuda";
        the call runs on the general path, site by site)."""
        from graphopt.autotune.lower import call_sites

        spec, tensors, objects = self._captured[0].flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        if i >= len(self.lowered):
            return []
        return call_sites(self.lowered[i], tensors)

    def kernel_modules(self) -> list[nn.Module]:
        """The kernel call sites of every lowered variant (empty unless target="cuda")."""
        from graphopt.autotune.lower import _Tuned

        return [m for gm in self.lowered for m in gm.modules() if isinstance(m, _Tuned)]

    @property
    def report(self) -> OptimizationReport:
        return dataclasses.replace(self._report, recaptures=self._recaptures)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        main = self._captured[0]
        spec, tensors, objects = main.flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        return self._captured[i].call.rebuild_output(self._run(i, tensors))

    def _variant_for(self, args: tuple, kwargs: dict, spec: dict, tensors: list[torch.Tensor],
                     objects: list[Any]) -> int:
        """The index of the captured variant valid for this call, re-capturing one when none is."""
        reasons = []
        for i, variant in enumerate(self._captured):
            reasons.append(_mismatch(variant, spec, tensors, objects))
            if not reasons[-1]:
                return i
        self._recapture(args, kwargs, spec, tensors, objects, reasons[0])  # as against the optimized capture
        return len(self._captured) - 1

    def compile(self) -> Any:
        """Compile the main variant for the CPU with Inductor, ahead of time (:mod:`graphopt.compiled`):
        checked against the original outputs, then used for every call the main variant serves and
        saved with the module. Returns the :class:`~graphopt.compiled.CompiledReport`."""
        from .compiled import compile_captured

        if len(self.lowered):
            raise UsageError("compile() builds the CPU program; this module is lowered for target='cuda'")
        self._compiled, report = compile_captured(self.captured)
        self._report = dataclasses.replace(self._report, compiled=dataclasses.asdict(report))
        return report

    def _run(self, i: int, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if i == 0 and self._compiled is not None:
            return self._compiled(tensors)
        if i < len(self.lowered):
            if self._graph_runners is not None:
                from .cudagraphs import CudaGraphRunner

                while len(self._graph_runners) <= i:
                    runtime = self._runtimes[len(self._graph_runners)]
                    self._graph_runners.append(CudaGraphRunner(lambda *t, runtime=runtime: runtime(t)))
                return self._graph_runners[i](tensors)
            return self._runtimes[i](tensors)
        return self._captured[i].run(tensors)

    @property
    def blocks(self) -> tuple[Any, ...]:
        """The residual blocks a sampling plan may skip (:class:`graphopt.variants.Block`, graph order)."""
        return self._blocks_of(0)

    def _blocks_of(self, i: int) -> tuple[Any, ...]:
        from .variants import find_skippable, same_blocks

        if i not in self._blocks:
            found = find_skippable(self._captured[i].graph_module)
            if i and not same_blocks(found, self._blocks_of(0)):
                raise InputError("the graph traced for these shapes has other residual blocks than the "
                                 "optimized one: blocks cannot be skipped at these shapes")
            self._blocks[i] = found
        return self._blocks[i]

    def with_skipped(self, blocks: Iterable[int]) -> Callable[..., Any]:
        """A callable like this module that skips the residual blocks with these ids (see :attr:`blocks`):
        each runs a graph variant without them, built once per distinct set and sharing the weights."""
        skipped = frozenset(int(b) for b in blocks)
        known = {b.id for b in self.blocks}
        unknown = sorted(skipped - known)
        if unknown:
            raise InputError(f"unknown block id(s) {unknown}: this model has blocks 0..{len(known) - 1}")
        if not skipped:
            return self
        return functools.partial(self._call_skipping, skipped)

    def _call_skipping(self, skipped: frozenset[int], *args: Any, **kwargs: Any) -> Any:
        main = self._captured[0]
        spec, tensors, objects = main.flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        key = (i, skipped)
        if key not in self._skip_graphs:
            from .variants import without_blocks

            graph = without_blocks(self._captured[i].graph_module,
                                   [b for b in self._blocks_of(i) if b.id in skipped])
            if i < len(self.lowered):  # target="cuda": the variant runs on kernels like the rest
                captured = dataclasses.replace(self._captured[i], graph_module=graph)
                with torch.no_grad():
                    outputs = captured.run(captured.example_inputs)
                from graphopt.autotune.runtime import Runtime

                lowered, report = lower_captured(dataclasses.replace(captured, reference_outputs=tuple(outputs)))
                graph = Runtime(lowered, dump_dir=report.get("dump_dir"))
            self._skip_graphs[key] = graph
        run = self._skip_graphs[key]
        outputs = run(tensors) if i < len(self.lowered) else run(*tensors)
        return self._captured[i].call.rebuild_output(tuple(outputs))

    @property
    def approximate_passes(self) -> tuple[str, ...]:
        """The approximate passes applied to the canonical graph (they are never re-run)."""
        return tuple(p.name for p in self._report.passes if not p.exact and not p.skipped)

    def _recapture(self, args: tuple, kwargs: dict, spec: dict, tensors: list[torch.Tensor], objects: list[Any],
                   reason: str) -> CapturedGraph:
        """A variant for a call no variant is valid for.

        When only the shapes differ, the optimized graph is traced again for them (no pass runs
        again, so approximate changes are kept exactly); with the original model at hand and no
        approximate pass applied, that variant is checked against the model, and re-captured from
        it if the model behaves differently at these shapes. Another call structure or constant
        argument is re-captured from the original model and the passes run again. A loaded module
        refuses: without the model nothing can show that its graph holds outside the captured range.
        """
        main = self._captured[0]
        device = next(itertools.chain(self.graph_module.parameters(), self.graph_module.buffers()), None)
        captured = None
        if self._source is None:  # the saved graph may hold a branch the model took for the captured range only
            raise InputError(f"this call does not fit what the module was captured for ({reason}); a loaded "
                             "module cannot re-capture: call it with inputs like the captured ones, or optimize "
                             "the original model with such inputs")
        model_args, model_kwargs = _without_extras(main, args, kwargs)
        if spec == main.call.in_spec and not _mismatch_objects(main, objects):
            try:
                captured = retrace(main, tensors)
            except CaptureError as e:  # e.g. another channel count: the graph does not apply
                if self.approximate_passes:
                    raise InputError(f"this call is outside what the module was captured for ({reason}) and "
                                     f"the optimized graph does not run on it: {e}") from e
            if captured is not None and not self.approximate_passes:
                from .verify import compare

                expected = self._run_source(model_args, model_kwargs, reason)
                if not compare(captured.reference_outputs, expected).within:
                    captured = None  # the model itself branches on these shapes: capture it for them
        if captured is None:
            if self.approximate_passes:
                raise InputError(f"this call is outside what the module was captured for ({reason}) and the "
                                 f"module carries approximate changes ({', '.join(self.approximate_passes)}) "
                                 "made for that call structure: optimize the model again with such inputs")
            self._run_source(model_args, model_kwargs, reason)  # the caller's error, named as theirs
            # dynamic, so that other batches at these shapes need no capture of their own; static when
            # the call's own batch falls outside what torch.export proves for them
            for dynamic in (True, False):
                with kept_state(self._source, eval_mode=self._source_eval):
                    captured = capture(self._source, model_args, model_kwargs, dynamic_batch=dynamic)
                    captured, _ = run_pipeline(captured, self._passes, flops=self._flops)
                    captured = _checked_batch_one(self._source, captured)
                if not _mismatch(captured, spec, tensors, objects):
                    break
        if device is not None:  # follow a .to() the caller applied to this module
            captured.graph_module.to(device.device)
        self._captured.append(captured)
        self.variants.append(captured.graph_module)
        if len(self.lowered):
            self._lower_variant(captured)
        self._recaptures += 1
        return captured

    def _run_source(self, args: tuple, kwargs: dict, reason: str) -> list[torch.Tensor]:
        """The original model's flat outputs on a call outside the captured range; when the model itself
        rejects the call, an :class:`InputError` says how the call differs from the captured one."""
        try:
            with torch.no_grad(), kept_state(self._source, eval_mode=self._source_eval):
                _, outputs, _ = structure.flatten(self._source(*args, **kwargs))
        except Exception as e:
            module_path, source = _locate(e, self._source)
            where = (f" in module '{module_path}'" if module_path else "") + (f" at {source}" if source else "")
            raise InputError(f"this call does not fit the model: {reason}; the model raised {type(e).__name__}"
                             f"{where}: {first_line(e)}") from e
        return outputs

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, plan: Any = None) -> Path:
        """Write the main variant to ``directory`` (atomically), with ``plan`` as plan.json; returns the path.
        See :func:`graphopt.saved.save`."""
        from .saved import save

        return save(self, directory, overwrite=overwrite, plan=plan)


def _mismatch(variant: CapturedGraph, spec: dict, tensors: list[torch.Tensor], objects: list[Any]) -> str:
    if spec != variant.call.in_spec:
        return (f"arguments {structure.describe(spec)} differ from the captured "
                f"{structure.describe(variant.call.in_spec)}")
    if _mismatch_objects(variant, objects):
        return "a non-tensor argument differs from the captured one"
    return variant.guards.mismatch(tensors, variant.call.input_names()) or ""


def _mismatch_objects(variant: CapturedGraph, objects: list[Any]) -> bool:
    return len(objects) != len(variant.call.objects) or any(
        a is not b and not _equal(a, b) for a, b in zip(objects, variant.call.objects))


def _without_extras(captured: CapturedGraph, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call as the original model takes it: the extra inputs passes added are dropped."""
    return args, {k: v for k, v in kwargs.items() if k not in captured.call.extras}


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def optimize(model: nn.Module, args: Any = (), kwargs: dict[str, Any] | None = None,
             passes: Iterable[str | Any] | None = None, target: str = "cpu",
             dynamic_batch: bool = True, cuda_graphs: bool = False, approx: Any = None,
             eval_mode: bool = False, compile: bool = False) -> OptimizedModule:
    """Capture ``model`` on the example inputs, run ``passes`` (default: the exact pipeline) and emit.

    ``passes`` are names from :mod:`graphopt.passes` or :class:`Pass` objects. Each exact pass is
    verified against the original model's outputs; the report records FLOPs, errors and times.

    ``target="cuda"`` captures on the GPU (a copy of the model when it is elsewhere) and lowers the graph:
    pointwise chains and norms with their epilogues run as generated Triton kernels, attention on the
    flash kernel, matmuls and convolutions stay on ATen (see :mod:`graphopt.autotune.lower`). Each
    kernel is checked against the ATen ops it replaces on the example inputs, within the dtype's
    tolerance. Kernels use the tuned configs ``graphopt autotune`` stored for this GPU, else defaults.
    Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on the CPU instead (slow;
    for testing). ``cuda_graphs=True`` (target "cuda" on a GPU) replays each call as a CUDA graph
    recorded per input layout (:mod:`graphopt.cudagraphs`), which removes the launch overhead that
    dominates at small batch.

    Approximate passes (``skip-tune``) run after the exact ones through the approximate layer
    (:mod:`graphopt.approx`) and need ``approx``, an :class:`~graphopt.approx.ApproxContext` with the
    sampler, quality evaluator and budget; each runs once, and its report row carries the quality
    it cost, measured.

    ``compile=True`` (target "cpu") hands the optimized graph to Inductor's CPU backend ahead of time
    (:mod:`graphopt.compiled`): C++ code for this CPU, checked against the original outputs, saved
    with the module so a loaded one starts warm; the report gives the compile time.

    ``model`` is never changed (its weights, buffers, training flags and device stay as they are). A
    model in training mode (dropout or batch statistics active) is refused, since its outputs are
    not those of inference: call ``model.eval()`` first, or pass ``eval_mode=True`` to optimize it
    as in eval mode while it stays in training mode.
    """
    from . import passes as registry

    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    pipeline, approximate = split_passes(registry.resolve(passes))
    if approximate and approx is None:
        raise UsageError(f"approximate pass(es) {', '.join(p.name for p in approximate)} need a sampler and a "
                         "quality evaluator: pass approx=graphopt.ApproxContext(...)")
    if cuda_graphs and (target != "cuda" or not torch.cuda.is_available()):
        raise UsageError("cuda_graphs=True needs target='cuda' and a CUDA GPU")
    if compile and target != "cpu":
        raise UsageError("compile=True builds the CPU program with Inductor; target='cuda' lowers onto Triton "
                         "kernels instead")
    check_inference_mode(model, eval_mode)
    if target == "cuda":
        _check_cuda_target()
        if torch.cuda.is_available():
            if any(t.device.type != "cuda" for t in itertools.chain(model.parameters(), model.buffers())):
                model = copy.deepcopy(model).to("cuda")  # the user's model stays where it is
            args, kwargs = _to_device((args, kwargs or {}), "cuda")
    with kept_state(model, eval_mode=eval_mode):
        module = _optimize(model, args, kwargs, pipeline, approximate, target, dynamic_batch, cuda_graphs, approx,
                           eval_mode)
    if compile:
        module.compile()
    return module


def _optimize(model: nn.Module, args: Any, kwargs: dict[str, Any] | None, pipeline: tuple[Pass, ...],
              approximate: tuple[Any, ...], target: str, dynamic_batch: bool, cuda_graphs: bool, approx: Any,
              eval_mode: bool) -> OptimizedModule:
    from .analysis.cost import graph_cost
    from .analysis.graph import batch_symbol

    captured = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    batch = captured.example_inputs[0].shape[0] if captured.example_inputs[0].dim() else None

    def flops(gm: fx.GraphModule) -> float:  # at the example batch; a re-captured variant has its own symbol
        return float(graph_cost(gm, batch_symbol(gm)).at(batch or 1)[0])

    captured, reports = run_pipeline(captured, pipeline, flops=flops)
    captured = _checked_batch_one(model, captured)
    example_batch = _batch_size(structure.flatten((args, kwargs or {}))[1])
    if captured.dynamic_batch and (captured.guards.batch_range() or (1,))[0] > 1 and example_batch == 1:
        # the model treats batch 1 differently and the example is batch 1: the example's own batch comes first
        captured = capture(model, args, kwargs, dynamic_batch=False)
        captured, reports = run_pipeline(captured, pipeline, flops=flops)
    from .plan import fingerprint

    report = OptimizationReport(type(model).__name__, target, batch, captured.guards.batch_range(),
                                captured.capture_time_s, reports, fingerprint=fingerprint(model))
    module = OptimizedModule(captured, report, source=model, passes=pipeline, flops=flops, source_eval=eval_mode)
    if approximate:
        from .approx import run_approximate

        module = run_approximate(module, approximate, approx)
    if target == "cuda":
        # the canonical graph, after any approximate pass, with the report rows they added
        module._report = dataclasses.replace(module._report, lowering=module._lower_variant(module.captured),
                                             cuda_graphs=cuda_graphs)
        module._graph_runners = [] if cuda_graphs else None
    return module


def _checked_batch_one(model: nn.Module, captured: CapturedGraph) -> CapturedGraph:
    """``captured`` whose range includes batch 1 only if its optimized graph still matches the model there:
    passes judge shapes at the traced batch, and a squeeze of a batch dim of 1 is no identity."""
    if (captured.guards.batch_range() or (0,))[0] == 1 and not batch_one_matches(
            model, captured.call, captured.graph_module, captured.example_inputs):
        return without_batch_one(captured)  # batch 1 gets a capture of its own when called
    return captured


def check_inference_mode(model: nn.Module, eval_mode: bool) -> None:
    """Refuse a model in training mode unless ``eval_mode`` asks to optimize it as in eval mode."""
    training = training_modules(model)
    if training and not eval_mode:
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise UsageError(f"{type(model).__name__} is in training mode ({shown}): its outputs are not those of "
                         "inference; call model.eval() first, or pass eval_mode=True (--eval) to optimize it as in "
                         "eval mode without changing it")


def split_passes(passes: Sequence[Any]) -> tuple[tuple[Pass, ...], tuple[Any, ...]]:
    """(exact pipeline, approximate passes): the approximate ones run last, after the exact passes
    they require (added when missing)."""
    from . import passes as registry
    from .approx import ApproxPass

    exact = [p for p in passes if not isinstance(p, ApproxPass)]
    approximate = [p for p in passes if isinstance(p, ApproxPass)]
    if approximate:
        first = min(i for i, p in enumerate(passes) if isinstance(p, ApproxPass))
        late = [p.name for p in passes[first:] if not isinstance(p, ApproxPass)]
        if late:
            raise UsageError(f"exact pass(es) {', '.join(late)} come after an approximate one: approximate passes "
                             "run once, after every exact pass")
        names = {p.name for p in exact}
        for p in approximate:
            for need in p.requires:
                if need not in names:
                    exact.append(registry.get(need))
                    names.add(need)
    return tuple(exact), tuple(approximate)


def _check_cuda_target() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("target='cuda' but torch sees no CUDA device (set TRITON_INTERPRET=1 to run the "
                         "generated kernels in Triton's interpreter on the CPU, for testing)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UsageError("target='cuda' generates Triton kernels and Triton is not installed: "
                         "pip install 'graphopt[triton]'") from None


def lower_captured(captured: CapturedGraph) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Lower a captured graph onto kernels and check it on the example inputs; (module, report JSON).

    Every kernel is compared with the ATen ops it replaces on the same inputs, then the whole graph
    with the original model's outputs; either beyond the dtype's tolerance raises
    :class:`VerificationError` naming the kernel and where it came from.
    """
    from graphopt.autotune.lower import LoweringReport, check_regions, lower

    from .verify import compare

    start = time.perf_counter()
    result = lower(captured.graph_module)
    outputs, errors = check_regions(result.graph_module, captured.example_inputs)
    for region in result.regions:
        if region.name in errors and not errors[region.name][2]:
            abs_err, rel_err, _ = errors[region.name]
            where = f" ({', '.join(region.modules)})" if region.modules else ""
            raise VerificationError(f"kernel {region.kernel} for {' '.join(region.ops)}{where} differs from the ATen "
                                    f"ops it replaces: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}")
    cmp = compare(outputs, captured.reference_outputs)
    if not cmp.within:
        raise VerificationError(f"the lowered graph differs from the original model: {cmp.line()}")
    nodes = sum(len(r.ops) for r in result.regions)
    report = LoweringReport(result.regions, len(result.library), nodes, result.partition.left_on_aten,
                            result.declined, cmp.max_abs_error, cmp.max_rel_error, time.perf_counter() - start,
                            str(result.library.directory) if result.library.dumped else None)
    return result.graph_module, report.to_json()


def _to_device(value: Any, device: str) -> Any:
    return structure.map_tensors(value, lambda t: t.to(device))


# ------------------------------------------------------------------------------- the saved program


def export_program(captured: CapturedGraph) -> torch.export.ExportedProgram:
    """Re-export an (optimized) captured graph as an ExportedProgram with the same dynamic dims and ranges."""
    symbols = {}
    for name, (lo, hi) in captured.guards.ranges.items():
        safe = "d_" + "".join(c if c.isalnum() else "_" for c in name)
        symbols[name] = Dim(safe, min=lo, max=hi) if hi is not None else Dim(safe, min=lo)
    dims = tuple({d: symbols.get(s, Dim.AUTO) for d, s in enumerate(g.shape) if isinstance(s, str)} or None
                 for g in captured.guards.tensors)
    with quiet():
        return torch.export.export(captured.graph_module, tuple(captured.example_inputs), dynamic_shapes=dims,
                                   strict=False)
