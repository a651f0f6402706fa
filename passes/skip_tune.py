"""skip-tune: search Skip-Tuning's skip scales with the quality evaluator and make them the defaults.

Approximate. Needs ``skip-scale`` before it (``optimize`` adds it) and an approximate context (a
sampler, the NFE to tune at, a quality evaluator). It searches (rho_top, rho_bottom), linear in skip
depth (:func:`graphopt.passes.skip_scale.linear_scales`), with the plan search restricted to skip
scales at the context's NFE on the sampler's default schedule, then sets the tuned scales as the
default value of the ``skip_scales`` input: the optimized module then samples skip-tuned with any
sampler, and a caller can still pass other scales per call. The approximate layer measures the
quality before and after on the evaluator's confirmation seeds and reports it in this pass's row.
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.approx import ApproxContext, ApproxOutcome, ApproxPass
from graphopt.errors import PassError
from graphopt.pipeline import PassContext

from .skip_scale import INPUT, linear_scales

# A small population: two genes on a 29 x 29 grid.
POPULATION = dict(population=16, parents=4, mutations=8, crossovers=4, generations=6, steps_only=0, increments=1)


def _skip_tune(module: Any, ctx: ApproxContext, pctx: PassContext) -> ApproxOutcome:
    from graphopt.autodiffusion import EvolutionConfig, search_run

    captured = module.captured
    if INPUT not in captured.call.extras:
        skip_scale_ran = any(p.name == "skip-scale" for p in module.report.passes)
        raise PassError("the model has no encoder-decoder skips to tune" if skip_scale_ran
                        else "skip-tune needs the skip-scale pass to run before it")
    index = captured.model_inputs + captured.call.extras.index(INPUT)
    count = int(captured.example_inputs[index].numel())
    result = search_run(module, ctx.sampler, ctx.example_inputs, nfe=int(ctx.nfe), space=("skip-scale",),
                        evaluator=ctx.evaluator, config=EvolutionConfig(**POPULATION), seed=ctx.seed,
                        workers=1, progress=ctx.progress, confirm=2, batch=ctx.batch)
    rho = result.space.rho_of(result.chosen.candidate)
    assert rho is not None and len(rho) == 2  # one constant pair: the default of a plain call
    top, bottom = rho
    pctx.hit("skip", count)
    pctx.note(f"rho_top {top:g}, rho_bottom {bottom:g} (linear in skip depth over {count} skips), tuned at NFE "
              f"{result.plan.nfe} with {ctx.sampler.method}: {result.state.generation} generations, "
              f"{len(result.state.records)} evaluations, {result.state.elapsed_s / 60:.1f} min")
    values = torch.tensor(linear_scales(count, top, bottom))
    return ApproxOutcome(defaults={INPUT: values})


SKIP_TUNE = ApproxPass("skip-tune", _skip_tune, doc=__doc__ or "", requires=("skip-scale",), needs_sampler=True)
