"""From candidates to sampling plans."""

from __future__ import annotations

from typing import Any

from graphopt.passes.skip_scale import linear_scales
from graphopt.plan import ModelIdentity, SamplingPlan

from .space import Candidate, SearchSpace


def candidate_plan(space: SearchSpace, candidate: Candidate, sampler: Any, identity: ModelIdentity,
                   **fields: Any) -> SamplingPlan:
    """The plan ``candidate`` stands for, with the reference ``sampler``'s family, method and guidance."""
    rho = space.step_rho(candidate)
    scales = None
    if rho is not None and identity.skips:
        scales = tuple(linear_scales(identity.skips, top, bottom) for top, bottom in rho)
    return SamplingPlan(identity, sampler.family, sampler.method, space.levels_of(candidate), tuple(sampler.shape),
                        skipped=candidate.skipped, skip_scales=scales, cfg_scale=sampler.cfg_scale,
                        null_class=sampler.null_class, **fields)
