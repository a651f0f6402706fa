"""Joint search over time steps, per-step skipped blocks and skip scales (AutoDiffusion, extended).

``search(model, sampler, example_inputs, nfe=6)`` returns the :class:`~graphopt.plan.SamplingPlan`
with the best measured quality at that NFE (within ``max_gflops`` FLOPs per image when given).
Candidates are scored with the quality evaluator's proxy (FD on few samples, fixed noise); the best
few and the default schedule are then confirmed at the evaluator's larger sample count over its
seeds, and the plan reports that confirmed figure next to the default schedule's, with its FLOPs per
image and the search's own cost. With ``out``, the folder receives ``plan.json``, ``pareto.png``,
``pareto.md`` and ``search-state.json`` (written after every generation; ``resume=True`` continues).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graphopt.errors import BudgetError, OutputPathError, UsageError, no_folder

from .evolution import STATE_FILE, EvolutionConfig, Record, SearchState, best, evolve, pareto_front
from .plans import candidate_plan
from .space import SPACES, Candidate, SearchSpace, make_space

__all__ = ["EvolutionConfig", "SearchResult", "SPACES", "prepare_out", "search", "search_run", "steps_for_nfe"]


def steps_for_nfe(method: str, nfe: int) -> int:
    """Steps whose NFE is at most ``nfe``: Heun spends 2 calls per step but 1 on the last."""
    if nfe < 1:
        raise UsageError(f"NFE must be at least 1, got {nfe}")
    return (nfe + 1) // 2 if method == "heun" else nfe


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """A finished search: the chosen plan, every evaluation, the Pareto front, where it was written."""

    plan: Any
    state: SearchState
    space: SearchSpace
    front: tuple[Record, ...]
    chosen: Record
    default: Record | None
    table: str
    out: Path | None


def prepare_out(out: str | os.PathLike | None, resume: bool) -> Path | None:
    """Check (before any work) that ``out`` can take a search: a new or empty folder, or with
    ``resume`` one holding a search state."""
    if out is None:
        if resume:
            raise UsageError("resume needs the folder of the search to continue (out)")
        return None
    path = Path(out)
    if resume:
        if not (path / STATE_FILE).is_file():
            raise OutputPathError(f"--resume: {path} holds no {STATE_FILE} to continue")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {path}: no write permission")
        return path
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} exists and is not a folder")
    if path.is_dir():
        if any(path.iterdir()):
            raise OutputPathError(f"{path} is not empty; choose a new folder, or pass --resume to continue the "
                                  "search saved there")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {path}: no write permission")
        return path
    if not path.parent.is_dir():
        raise no_folder(path, path.parent, "create")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {path}: no write permission in {path.parent}")
    path.mkdir()
    return path


class _Costs:
    """GFLOPs per image of a candidate's plan (cost model), and optionally its measured latency."""

    def __init__(self, planned: Any, space: SearchSpace, sampler: Any, measure: bool, batch: int,
                 example: tuple[torch.Tensor, ...]):
        self.planned, self.space, self.sampler = planned, space, sampler
        self.identity = planned.identity()
        self.measure, self.batch, self.example = measure, batch, example
        self._ms: dict[frozenset[int], float] = {}

    def plan(self, c: Candidate) -> Any:
        return candidate_plan(self.space, c, self.sampler, self.identity)

    def __call__(self, c: Candidate) -> tuple[float, float | None]:
        plan = self.plan(c)
        gflops = self.planned.plan_cost(plan)["gflops_per_image"]
        if not self.measure:
            return gflops, None
        guided = 2 if plan.cfg_scale != 1.0 else 1
        ms = sum(plan.calls(i) * self.call_ms(plan.skipped[i]) for i in range(plan.steps)) * guided
        return gflops, ms

    def call_ms(self, skipped: Sequence[int]) -> float:
        """Median milliseconds per image of one denoiser call without ``skipped`` (3 timed runs)."""
        key = frozenset(skipped)
        if key not in self._ms:
            fn = self.planned.at(key)
            args = tuple(torch.cat([t] * -(-self.batch // t.shape[0]))[:self.batch] if t.dim() else t
                         for t in self.example)
            times = []
            with torch.no_grad():
                fn(*args)
                for _ in range(3):
                    start = time.perf_counter()
                    fn(*args)
                    times.append(time.perf_counter() - start)
            self._ms[key] = statistics.median(times) / self.batch * 1e3
        return self._ms[key]

    def cheapest_gflops(self, max_skip_ratio: float) -> float:
        """The lowest GFLOPs per image any candidate of the space can have: the default schedule with
        the most expensive block-steps skipped up to the ratio bound (block savings added up)."""
        base = self.plan(self.space.uniform())
        full = self.planned.flops(())
        limit = self.space.max_skipped(max_skip_ratio)
        savings = sorted(((base.calls(i) * (full - self.planned.flops([b.id])))
                          for i in range(base.steps) for b in self.planned.blocks), reverse=True)[:limit]
        guided = 2 if base.cfg_scale != 1.0 else 1
        return (sum(base.calls(i) for i in range(base.steps)) * full - sum(savings)) * guided / 1e9


def search_run(model: nn.Module, sampler: Any, example_inputs: Sequence[Any], *, nfe: int,
               space: Sequence[str] | None = None, evaluator: Any = None, max_gflops: float | None = None,
               time_budget_s: float | None = None, config: EvolutionConfig | None = None, seed: int = 0,
               workers: int | None = None, ray: str | None = None, out: str | os.PathLike | None = None,
               resume: bool = False, progress: bool = True, max_skip_ratio: float = 0.1, confirm: int = 3,
               batch: int = 256, measure_latency: bool = False, model_spec: str | None = None,
               skip_scale_schedule: str = "constant") -> SearchResult:
    """:func:`search`, returning the whole :class:`SearchResult` (front, table, state)."""
    from tqdm import tqdm

    from graphopt.planned import PlannedDenoiser
    from graphopt.quality import QualityEvaluator

    from .report import front_rows, markdown_table, plot, text_table
    from .workers import SearchJob, open_backend

    config = config or EvolutionConfig()
    space = tuple(dict.fromkeys(space)) if space is not None else None
    if space is not None and (not space or set(space) - set(SPACES)):
        raise UsageError(f"the search space is a subset of {', '.join(SPACES)}, got {', '.join(space) or 'nothing'}")
    if max_gflops is not None and not max_gflops > 0:
        raise UsageError(f"max_gflops must be a positive number, got {max_gflops}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise UsageError(f"time_budget_s must be a positive number of seconds, got {time_budget_s}")
    if confirm < 1:
        raise UsageError("confirm at least one candidate")
    if skip_scale_schedule not in ("constant", "per-step"):
        raise UsageError(f"skip_scale_schedule is 'constant' or 'per-step', got {skip_scale_schedule!r}")
    steps = steps_for_nfe(sampler.method, nfe)
    out_dir = prepare_out(out, resume)
    evaluator = evaluator or QualityEvaluator.for_digits(sampler.shape[-1])
    workers = workers if workers is not None else max(1, min(os.cpu_count() or 1, 8))
    start = time.perf_counter()

    planned = PlannedDenoiser.build(model, tuple(example_inputs))
    if space is None:  # everything that applies to this model
        space = SPACES if planned.skips else tuple(p for p in SPACES if p != "skip-scale")
    base = sampler.with_steps(steps, sampler.method)
    the_space = make_space(base.family, steps, len(planned.blocks), space, default_levels=base.levels,
                           max_skip_ratio=max_skip_ratio, rho_per_step=skip_scale_schedule == "per-step")
    if "skip-scale" in space and planned.skips == 0:
        raise UsageError(f"the skip-scale space needs encoder-decoder skips; {type(model).__name__} has none "
                         "(search steps and skips instead)")
    costs = _Costs(planned, the_space, base, measure_latency, batch, tuple(example_inputs))
    if max_gflops is not None:
        cheapest = costs.cheapest_gflops(max_skip_ratio if the_space.search_skips else 0.0)
        if max_gflops < cheapest - 1e-12:
            raise BudgetError(f"no plan at NFE {base.nfe} can cost {max_gflops:g} GFLOPs per image: the cheapest "
                              f"this space allows is {cheapest:.4g} (skipping at most {max_skip_ratio:.0%} of "
                              "block-steps); raise --max-gflops or --nfe lower")
    settings = {"model": planned.identity().to_json(), "family": base.family, "method": base.method,
                "steps": steps, "space": the_space.describe(), "seed": seed,
                "evaluator": evaluator.options(),
                "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "generations"},
                "max_gflops": max_gflops, "cost": "latency" if measure_latency else "flops",
                "generations": config.generations, "time_budget_s": time_budget_s}
    job = SearchJob(tuple(example_inputs), base, the_space, evaluator,
                    model=None if model_spec else model, model_spec=model_spec, batch=batch)
    bar = tqdm(total=config.generations * config.population, desc="search", unit="eval", disable=not progress)
    backend = open_backend(job, workers, ray)

    def evaluate(candidates: list[Candidate]) -> list[float]:
        return backend.map(candidates, done=lambda: bar.update(1))

    def on_generation(state: SearchState, fresh: int) -> None:
        bar.update(config.population - fresh)  # cached candidates cost nothing
        top = best(list(state.records.values()), max_gflops)
        if top is not None:
            bar.set_postfix_str(f"gen {state.generation}/{config.generations}, best proxy {evaluator.metric} "
                                f"{top.quality:.2f} at {top.gflops:.3f} GFLOPs")

    try:
        if resume:
            bar.update(min(bar.total, SearchState.load(out_dir / STATE_FILE).generation * config.population))
        state = evolve(the_space, config, evaluate=evaluate, cost=costs, settings=settings, seed=seed,
                       state_path=None if out_dir is None else out_dir / STATE_FILE, resume=resume,
                       max_gflops=max_gflops, time_budget_s=time_budget_s, on_generation=on_generation)
    finally:
        backend.close()
        bar.close()

    records = list(state.records.values())
    default = state.records.get(the_space.uniform().key)  # None only when a time budget cut gen 0 short
    quality, chosen, plan = _confirm(records, costs, planned, evaluator, base, batch, max_gflops, confirm, progress)
    minutes = (time.perf_counter() - start) / 60
    front = pareto_front(records)
    cost = planned.plan_cost(plan)
    if chosen.ms is not None:
        cost["ms_per_image_measured"] = chosen.ms
    plan = dataclasses.replace(plan, cost=cost, quality=quality, search={
        **plan.search, "method": "AutoDiffusion evolution (graphopt)", "space": list(space), "nfe": plan.nfe, "seed": seed,
        "generations": state.generation, "evaluations": len(records), "minutes": round(minutes, 2),
        "search_seconds": round(state.elapsed_s, 1), "workers": backend.workers, "ray": ray,
        "proxy": {"metric": evaluator.metric, "samples": evaluator.proxy_samples, "seed": evaluator.proxy_seed,
                  "value": chosen.quality},
        "max_gflops": max_gflops, "max_skip_ratio": max_skip_ratio,
        "default_gflops_per_image": planned.plan_cost(costs.plan(the_space.uniform()))["gflops_per_image"],
        "population": dataclasses.asdict(config)})
    rows = front_rows(the_space, front, chosen=chosen.candidate.key, default=the_space.uniform().key,
                      measured_ms=measure_latency)
    if out_dir is not None:
        plan.save(out_dir / "plan.json")
        note = (f"Pareto front of {len(records)} evaluated plans ({state.generation} generations, {minutes:.1f} min), "
                f"{evaluator.metric} proxy on {evaluator.proxy_samples} samples (seed {evaluator.proxy_seed}); "
                f"`*` chosen plan ({quality.line()}), `d` default schedule.\n\n")
        _write_text(out_dir / "pareto.md", note + markdown_table(rows) + "\n")
        plot(out_dir / "pareto.png", records, front, title=f"{type(model).__name__}, NFE {plan.nfe}: "
             f"{', '.join(space)}", quality_label=f"{evaluator.metric} (proxy, n={evaluator.proxy_samples})",
             chosen=chosen, default=default, budget=max_gflops)
    return SearchResult(plan, state, the_space, tuple(front), chosen, default, text_table(rows), out_dir)


def _confirm(records: list[Record], costs: _Costs, planned: Any, evaluator: Any, base: Any, batch: int,
             max_gflops: float | None, count: int, progress: bool) -> tuple[Any, Record, Any]:
    """Confirm the ``count`` best feasible candidates at the evaluator's full sample count, next to
    the default schedule on the same seeds; (quality, record, plan) of the best confirmed one."""
    from tqdm import tqdm

    from graphopt.bench import sample_images
    from graphopt.planned import PlanSampler

    feasible = [r for r in records if max_gflops is None or r.gflops <= max_gflops + 1e-12]
    if not feasible:
        raise BudgetError(f"no evaluated candidate meets {max_gflops:g} GFLOPs per image")
    shortlist = sorted(feasible, key=lambda r: (r.quality, r.gflops))[:count]

    def generator(plan: Any) -> Any:
        sampler = PlanSampler(plan, planned)
        return lambda n, s: sample_images(planned.module, sampler, n, s, batch)

    baseline = (f"default schedule ({base.method}, {base.steps} steps)",
                generator(costs.plan(costs.space.uniform())))
    confirmed = []
    for r in tqdm(shortlist, desc="confirm", disable=not progress):
        plan = costs.plan(r.candidate)
        confirmed.append((evaluator.measure(generator(plan), baseline), r, plan))
    quality, chosen, plan = min(confirmed, key=lambda x: (x[0].mean, x[1].gflops))
    plan = dataclasses.replace(plan, search={"confirmed": [
        {"proxy": r.quality, "gflops": r.gflops, "mean": q.mean, "std": q.std} for q, r, _ in confirmed]})
    return quality, chosen, plan


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def search(model: nn.Module, sampler: Any, example_inputs: Sequence[Any], *, nfe: int,
           space: Sequence[str] | None = None, **options: Any) -> Any:
    """Search a :class:`~graphopt.plan.SamplingPlan` for ``model`` at ``nfe`` denoiser calls per sample.

    ``space`` is any of ``steps`` (the noise levels), ``skips`` (per-step skipped residual blocks)
    and ``skip-scale`` (Skip-Tuning's rho_top/rho_bottom); default: all that apply to the model
    (skip scales only where it has encoder-decoder skips). ``sampler`` is the reference sampler
    (family, method, guidance); ``evaluator`` a :class:`~graphopt.quality.QualityEvaluator`
    (default: the digit classifier's FD). Options: ``max_gflops`` (a budget per image),
    ``time_budget_s`` (stop after the generation that crosses it), ``config``
    (:class:`EvolutionConfig`), ``seed``, ``workers`` (local processes; 1: in this process), ``ray``
    (a cluster address or ``auto``), ``out`` (a folder for plan.json, the Pareto table and plot and
    the resumable state), ``resume``, ``progress``, ``max_skip_ratio``, ``confirm`` (candidates
    confirmed at full sample count), ``batch``, ``measure_latency`` (minimise measured ms instead of
    FLOPs), ``skip_scale_schedule`` (``constant``: one rho_top/rho_bottom for every step;
    ``per-step``: their values at the first and last step, linear in between). Raises :class:`~graphopt.errors.BudgetError` for a budget no plan can meet, naming the
    cheapest feasible cost.
    """
    return search_run(model, sampler, example_inputs, nfe=nfe, space=space, **options).plan
