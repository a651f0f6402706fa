"""Running a sampling plan: a denoiser that serves every step of it, the drop-in sampler, its cost.

:class:`PlannedDenoiser` is the model optimized with the exact pipeline plus ``skip-scale``: one
graph whose skip scales are a runtime input (so every step's scales cost nothing to switch), and
graph variants without the blocks a step skips (built once per distinct skip set, sharing the
weights; see :mod:`graphopt.variants`). :class:`PlanSampler` follows a plan with the reference
sampler's arithmetic and the same ``sample(model, noise, labels)`` call; it prepares a
:class:`PlannedDenoiser` for the model it is given the first time (capturing it), and checks the plan
was made for that model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import PlanError
from .plan import ModelIdentity, SamplingPlan, fingerprint

PLAN_PASSES = ("noop", "fold", "dce", "skip-scale")
"""The passes a planned denoiser is optimized with: the exact pipeline, then the skip-scale input."""


class PlannedDenoiser:
    """An optimized denoiser that runs any step of a plan: ``at(skipped, scales)`` is a callable with
    the model's signature that skips those blocks and scales the skips by ``scales``."""

    def __init__(self, module: Any):
        from .passes.skip_scale import INPUT

        self.module = module
        self.blocks = module.blocks
        captured = module.captured
        self.skips = 0
        self._scales_like: torch.Tensor | None = None
        if INPUT in captured.call.extras:
            index = captured.model_inputs + captured.call.extras.index(INPUT)
            self._scales_like = captured.example_inputs[index]
            self.skips = int(self._scales_like.numel())
        self._flops: dict[frozenset[int], float] = {}

    @staticmethod
    def build(model: nn.Module, example_inputs: Sequence[Any]) -> "PlannedDenoiser":
        """Optimize ``model`` for plans (``PLAN_PASSES``), or use an already optimized module as it is."""
        from .driver import optimize
        from .emit import OptimizedModule

        if isinstance(model, OptimizedModule):
            return PlannedDenoiser(model)
        return PlannedDenoiser(optimize(model, tuple(example_inputs), passes=PLAN_PASSES))

    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.module.report.model, fingerprint(self.module),
                             tuple((b.id, b.module, b.kind) for b in self.blocks), self.skips)

    def at(self, skipped: Iterable[int] = (), scales: Sequence[float] | None = None) -> Callable[..., Any]:
        """The denoiser for one step: without the ``skipped`` blocks, skips scaled by ``scales``."""
        fn = self.module.with_skipped(skipped)
        if scales is None:
            return fn
        if self._scales_like is None:
            raise PlanError("the plan scales encoder-decoder skips but this denoiser has no skip_scales input "
                            "(optimize it with the skip-scale pass)")
        if len(scales) != self.skips:
            raise PlanError(f"{len(scales)} skip scales given; the model has {self.skips} encoder-decoder skips")
        value = torch.tensor([float(s) for s in scales], dtype=self._scales_like.dtype,
                             device=self._scales_like.device)
        return functools.partial(fn, skip_scales=value)

    def flops(self, skipped: Iterable[int] = ()) -> float:
        """FLOPs of one denoiser call per image (the cost model at batch 1) with ``skipped`` removed."""
        key = frozenset(int(b) for b in skipped)
        if key not in self._flops:
            from .analysis.cost import graph_cost
            from .variants import without_blocks

            gm = self.module.graph_module
            if key:
                gm = without_blocks(gm, [b for b in self.blocks if b.id in key])
            self._flops[key] = float(graph_cost(gm, self.module.captured.batch_symbol()).at(1)[0])
        return self._flops[key]

    def plan_cost(self, plan: SamplingPlan) -> dict[str, Any]:
        """FLOPs per image summed over the plan's denoiser calls, each without its step's skipped blocks."""
        guided = 2 if plan.cfg_scale != 1.0 else 1
        total = sum(plan.calls(i) * self.flops(plan.skipped[i]) for i in range(plan.steps)) * guided
        full = sum(plan.calls(i) for i in range(plan.steps)) * self.flops(()) * guided
        executed = sum(plan.calls(i) * (len(self.blocks) - len(plan.skipped[i])) for i in range(plan.steps))
        return {"gflops_per_image": total / 1e9, "gflops_per_image_without_skips": full / 1e9,
                "block_calls": executed, "block_calls_without_skips": plan.nfe * len(self.blocks),
                "counted_by": "graphopt cost model, batch 1, per image, summed over denoiser calls"}


def example_call(family: str, x: torch.Tensor, level: float, labels: torch.Tensor | None,
                 null_class: int | None) -> tuple[torch.Tensor, ...]:
    """The arguments a sampler of ``family`` passes its denoiser, at batch >= 2 (for a dynamic capture)."""
    if x.shape[0] == 1:
        x = torch.cat([x, x])
        labels = None if labels is None else torch.cat([labels, labels])
    levels = torch.full((x.shape[0],), float(level), dtype=x.dtype, device=x.device)
    if family == "edm":
        return (x, levels)
    if labels is None:
        labels = torch.full((x.shape[0],), 0 if null_class is None else null_class, dtype=torch.long,
                            device=x.device)
    return (x, levels, labels)


class PlanSampler:
    """A sampler that follows a :class:`SamplingPlan`: ``sample(model, noise, labels)`` as the reference
    sampler's, with the plan's levels, per-step skipped blocks and skip scales."""

    def __init__(self, plan: SamplingPlan, planned: PlannedDenoiser | None = None):
        self.plan = plan
        self.base = plan.base_sampler()
        self._prepared: dict[int, tuple[nn.Module, PlannedDenoiser]] = {}
        if planned is not None:  # a denoiser already built for this plan's model: use it for its module
            plan.check(planned.module, planned.blocks, planned.skips)
            self._prepared[id(planned.module)] = (planned.module, planned)

    def __getattr__(self, name: str) -> Any:  # family, method, levels, shape, steps, nfe, noise, labels, ...
        if name in ("plan", "base", "_prepared"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def prepare(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None = None) -> PlannedDenoiser:
        """The planned denoiser for ``model`` (captured on first use, then kept), checked against the plan."""
        key = id(model)
        if key not in self._prepared:
            self.plan.check(model)
            example = example_call(self.plan.family, noise[:2], self.plan.levels[0],
                                   None if labels is None else labels[:2], self.plan.null_class)
            planned = PlannedDenoiser.build(model, example)
            self.plan.check(model, planned.blocks, planned.skips)
            self._prepared[key] = (model, planned)
        return self._prepared[key][1]

    def sample(self, model: Any, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan
        if not plan.skips_blocks and not plan.scales_skips:
            if isinstance(model, nn.Module):
                plan.check(model)
            return self.base.sample(model, noise, labels)
        planned = self.prepare(model, noise, labels)
        steps = [planned.at(plan.skipped[i], None if plan.skip_scales is None else plan.skip_scales[i])
                 for i in range(plan.steps)]
        return self.base.sample_steps(lambda i: steps[i], noise, labels)
