"""The approximate layer: passes that change what a model samples, each with its quality cost measured.

The exact pipeline (:mod:`graphopt.pipeline`) proves every pass against the model's outputs on one
call. An approximate pass cannot be judged that way: it needs the model it came from, the sampler
the model serves, calibration inputs, a quality metric and a budget. This layer sits above the
exact pipeline and gives them to it in an :class:`ApproxContext`:

1. the exact passes run first (verified as always);
2. each approximate pass then runs **once** on the canonical optimized graph, with the context; it
   may rewrite the graph or set new defaults for runtime inputs (tuned skip scales, say). A later
   call at new shapes re-traces that graph (:func:`graphopt.capture.retrace`) and never runs an
   approximate pass again;
3. after each one, the layer samples with the context's sampler, before and after, on the
   evaluator's confirmation seeds, and records the measured cost in the pass's report row
   (metric, sample count, seeds, spread, baseline, PSNR): no approximate change goes unmeasured;
4. a change beyond the budget (``Budget.max_quality_increase``) raises :class:`QualityBudgetError`,
   and the module is left as it was.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import fx, nn

from .errors import GraphoptError, PassError, UsageError
from .pipeline import PassContext, PassReport
from .quality import OutputFidelity, QualityEvaluator

if TYPE_CHECKING:
    from .emit import OptimizedModule


class QualityBudgetError(GraphoptError):
    """An approximate pass cost more quality than the budget allows."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits on an approximate change: the metric's allowed increase over the baseline (absolute,
    e.g. FD points), and FLOPs per image for searches."""

    max_quality_increase: float | None = None
    max_gflops: float | None = None


@dataclasses.dataclass
class ApproxContext:
    """What approximate passes get: the source model, its sampler at the NFE quality is judged at,
    calibration inputs, the quality evaluator and the budget. A model with no sampler gets
    :meth:`for_model`: ``sampler`` None, judged by :class:`~graphopt.quality.OutputFidelity`."""

    source: nn.Module
    sampler: Any
    example_inputs: tuple[Any, ...]
    evaluator: QualityEvaluator | OutputFidelity
    budget: Budget = dataclasses.field(default_factory=Budget)
    nfe: int | None = None
    batch: int = 256
    seed: int = 0
    workers: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.sampler is None:  # no sampler: judged on the denoiser's outputs (OutputFidelity)
            if self.nfe is not None:
                raise UsageError("nfe sets how sampling is judged; this context has no sampler")
            return
        if self.nfe is None:
            self.nfe = self.sampler.nfe
        if self.nfe < 1:
            raise UsageError(f"nfe must be at least 1, got {self.nfe}")

    @staticmethod
    def for_model(model: nn.Module, example_inputs: Sequence[Any], *, samples: int = 64,
                  seeds: Sequence[int] = (0, 1, 2), **options: Any) -> "ApproxContext":
        """A context for any model, with no sampler or data: each approximate change is judged by the
        relative error of the model's outputs against the original's on inputs drawn like
        ``example_inputs`` (:class:`~graphopt.quality.OutputFidelity`)."""
        from .quality import OutputFidelity

        return ApproxContext(model, None, tuple(example_inputs), OutputFidelity(samples, tuple(seeds)),
                             **options)

    @staticmethod
    def for_reference(name: str, *, nfe: int | None = None, method: str | None = None,
                      **options: Any) -> "ApproxContext":
        """The context of a reference generator: its sampler, example inputs and the digit evaluator."""
        from .models import load

        ref = load(name)
        if ref.sampler is None:
            raise UsageError(f"{name} is not a generator: approximate passes need a sampler")
        sampler = ref.sampler if method is None else ref.sampler.with_steps(ref.sampler.steps, method)
        evaluator = options.pop("evaluator", None) or QualityEvaluator.for_digits(ref.config.resolution)
        return ApproxContext(ref.model, sampler, tuple(ref.example_inputs), evaluator, nfe=nfe, **options)

    def judging_sampler(self) -> Any:
        """The sampler quality is judged with: the context's family and method at ``nfe``."""
        from .autodiffusion import steps_for_nfe

        if self.sampler is None:
            raise UsageError("this approximate change needs a sampler (a generator and its sampling loop); the "
                             "context has none")
        if self.sampler.family == "var":  # one call per scale: its NFE is the scale count
            if self.nfe != self.sampler.nfe:
                raise UsageError(f"a VAR sampler makes {self.sampler.nfe} calls (one per scale), not nfe={self.nfe}")
            return self.sampler
        return self.sampler.with_steps(steps_for_nfe(self.sampler.method, int(self.nfe)), self.sampler.method)

    def generator(self, denoiser: Callable[..., Any]) -> Callable[[int, int], torch.Tensor]:
        """``(n, seed) -> tensor`` for the evaluator: ``n`` samples of the judging sampler, or (no
        sampler) ``denoiser``'s outputs on ``n`` inputs drawn like the example inputs from ``seed``."""
        if self.sampler is None:
            from .distill import synthetic_outputs

            return lambda n, seed: synthetic_outputs(denoiser, self.example_inputs, n, seed, self.batch)
        from .bench import sample_images

        sampler = self.judging_sampler()
        return lambda n, seed: sample_images(denoiser, sampler, n, seed, self.batch)


@dataclasses.dataclass(frozen=True)
class ApproxOutcome:
    """What an approximate pass changed: a new canonical graph, new defaults of extra inputs, and/or a
    routing of calls onto graph variants without some blocks (:class:`graphopt.variants.Routing`)."""

    graph: fx.GraphModule | None = None
    defaults: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    routing: Any = None


@dataclasses.dataclass(frozen=True)
class ApproxPass:
    """A named approximate transformation of an optimized module. ``requires`` are exact passes that
    must have run before it (``optimize`` adds them); ``needs_sampler``: it tunes a sampling loop, so
    a context without a sampler (:meth:`ApproxContext.for_model`) cannot run it."""

    name: str
    transform: Callable[["OptimizedModule", ApproxContext, PassContext], ApproxOutcome]
    doc: str = ""
    requires: tuple[str, ...] = ()
    exact: bool = False
    needs_sampler: bool = False


def run_approximate(module: "OptimizedModule", passes: Sequence[ApproxPass], ctx: ApproxContext) -> "OptimizedModule":
    """Run each approximate pass once on ``module``'s canonical graph, measuring its quality cost."""
    from .analysis.cost import graph_cost

    unable = [p.name for p in passes if p.needs_sampler and ctx.sampler is None]
    if unable:
        raise UsageError(f"{', '.join(unable)} tune(s) a sampling loop: the context needs a generator's sampler")
    for p in passes:
        captured = module.captured
        symbol = captured.batch_symbol()
        batch = captured.example_inputs[0].shape[0] if captured.example_inputs[0].dim() else 1
        before_nodes = len(captured.graph_module.graph.nodes)
        flops_before = float(graph_cost(captured.graph_module, symbol).at(batch)[0])
        pctx = PassContext(p.name)
        start = time.perf_counter()
        previous = _snapshot(module)
        try:
            outcome = p.transform(module, ctx, pctx)
            _apply(module, outcome)
        except PassError as e:
            _restore(module, previous)
            raise PassError(f"approximate pass '{p.name}' failed: {e}") from e
        except GraphoptError:
            _restore(module, previous)
            raise
        except Exception as e:
            _restore(module, previous)
            raise PassError(f"approximate pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - start
        quality = ctx.evaluator.measure(ctx.generator(module), (f"before {p.name}", ctx.generator(previous.module)))
        limit = ctx.budget.max_quality_increase
        if limit is not None and quality.delta is not None and quality.delta > limit:
            _restore(module, previous)
            raise QualityBudgetError(f"approximate pass '{p.name}' costs {quality.line()}, beyond the budget of "
                                     f"+{limit:g}")
        gm = module.captured.graph_module
        routing = module.routing
        if routing is not None and routing.applies(module.captured.example_inputs):  # the example's routed graph
            from .variants import without_blocks

            gm = without_blocks(gm, [b for b in module.blocks if b.id in routing.skipped],
                                free_caches=routing.free_caches)
        report = PassReport(
            name=p.name, exact=False, skipped=False, hits=sum(pctx.hits.values()),
            rule_hits=tuple(sorted(pctx.hits.items())), near_misses=tuple(pctx.near_misses.values()),
            nodes_before=before_nodes, nodes_after=len(gm.graph.nodes),
            nodes_added=max(0, len(gm.graph.nodes) - before_nodes), nodes_removed=max(0, before_nodes - len(gm.graph.nodes)),
            flops_before=flops_before, flops_after=float(graph_cost(gm, symbol).at(batch)[0]),
            max_abs_error=float("nan"), max_rel_error=float("nan"), verified=False, time_s=elapsed,
            notes=tuple(pctx.notes), quality=quality.to_json())
        module._report = dataclasses.replace(module._report, passes=module._report.passes + (report,))
    return module


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    module: Any
    captured: Any
    routing: Any


def _snapshot(module: "OptimizedModule") -> _Snapshot:
    """The module as it is now, callable on its own (for the baseline and to undo a failed pass). With
    no approximate change yet it keeps the source, so it re-captures for other shapes as the module does."""
    from .emit import OptimizedModule

    source = module._source if not module.approximate_passes else None
    frozen = OptimizedModule(module.captured, module._report, source=source, passes=module._passes,
                             flops=module._flops, source_eval=module._source_eval)
    frozen._routing = module.routing
    # the same variants: one re-captured for the baseline serves the module too, until a pass replaces
    # the module's canonical graph (_reset gives it new lists and leaves these to the snapshot)
    frozen._captured, frozen.variants = module._captured, module.variants
    return _Snapshot(frozen, module.captured, module.routing)


def _restore(module: "OptimizedModule", snap: _Snapshot) -> None:
    module._reset(snap.captured)
    module._routing = snap.routing


def _apply(module: "OptimizedModule", outcome: ApproxOutcome) -> None:
    """Make the outcome the module's canonical graph, defaults and routing; outputs re-referenced to it."""
    if outcome.routing is not None:
        module._routing = outcome.routing
    if outcome.graph is None and not outcome.defaults:
        return
    captured = module.captured
    if outcome.graph is not None:
        captured = dataclasses.replace(captured, graph_module=outcome.graph)
    if outcome.defaults:
        inputs = list(captured.example_inputs)
        for name, value in outcome.defaults.items():
            if name not in captured.call.extras:
                raise PassError(f"the graph has no input {name!r} to set a default for")
            i = captured.model_inputs + captured.call.extras.index(name)
            if value.shape != inputs[i].shape:
                raise PassError(f"default for {name!r} has shape {tuple(value.shape)}, the input {tuple(inputs[i].shape)}")
            inputs[i] = value.to(dtype=inputs[i].dtype, device=inputs[i].device)
        captured = dataclasses.replace(captured, example_inputs=tuple(inputs))
    with torch.no_grad():
        outputs = tuple(t.detach() for t in captured.run(captured.example_inputs))
    module._reset(dataclasses.replace(captured, reference_outputs=outputs))
