"""AutoDiffusion's evolutionary search, resumable: population, parents, operators, two stages.

Per generation (defaults from AutoDiffusion): the population holds 50 candidates; the 10 parents are
the best of every candidate evaluated so far; the next population is 25 mutations of random parents
(each gene replaced with probability 0.25), 15 uniform crossovers of two random parents and random
candidates for the rest. The first population is the default schedule, mutations of it (p = 0.1)
and random candidates. Stage one searches the time steps (and skip scales) only; from generation
``steps_only`` on the skip ratio bound opens in ``increments`` steps up to the space's maximum.

"Best" is two objectives, the quality proxy (lower is better) and FLOPs per image, with an optional
FLOPs budget as a constraint: parents are chosen by pymoo's non-dominated sorting and crowding
distance with constraint domination (:class:`pymoo.algorithms.moo.nsga2.RankAndCrowding`), so they
spread along the quality/cost front instead of crowding at one end. pymoo supplies that machinery;
the operators are AutoDiffusion's and specific to sampling plans (:mod:`.space`).

Every candidate is evaluated once (cached by its hash). The state (every evaluation, the current
population, the generation and the random generator's state) is written atomically to a JSON file
after every generation, so a search resumes exactly where the last completed generation left it,
and an interrupted one (Ctrl-C) leaves the last saved state intact. The same seed gives the same
search.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from graphopt.errors import UsageError

from .space import Candidate, SearchSpace

STATE_FILE = "search-state.json"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Population sizes and schedule (AutoDiffusion's defaults)."""

    population: int = 50
    parents: int = 10
    mutations: int = 25
    crossovers: int = 15
    mutation_p: float = 0.25
    initial_mutation_p: float = 0.1
    generations: int = 20
    steps_only: int = 5
    increments: int = 5

    def __post_init__(self) -> None:
        if self.population < 2 or self.parents < 1 or self.generations < 1:
            raise UsageError("the search needs a population of at least 2, 1 parent and 1 generation")
        if self.mutations + self.crossovers > self.population:
            raise UsageError(f"{self.mutations} mutations + {self.crossovers} crossovers exceed the population "
                             f"of {self.population} (EvolutionConfig.sized(population, generations) scales them)")
        if self.increments < 1 or self.steps_only < 0:
            raise UsageError("the skip bound opens in at least 1 increment, after 0 or more steps-only generations")
        if not (0 < self.mutation_p <= 1 and 0 < self.initial_mutation_p <= 1):
            raise UsageError("mutation probabilities must be in (0, 1]")

    @staticmethod
    def sized(population: int = 50, generations: int = 20) -> "EvolutionConfig":
        """AutoDiffusion's proportions at another size: a fifth of the population as parents, half
        mutated, three tenths crossed over; a quarter of the generations steps-only, the skip bound
        opening over the next quarter."""
        if population < 2 or generations < 1:
            raise UsageError(f"the search needs a population of at least 2 and 1 generation, got {population} "
                             f"and {generations}")
        return EvolutionConfig(population=population, parents=max(1, population // 5), mutations=population // 2,
                               crossovers=population * 3 // 10, generations=generations,
                               steps_only=generations // 4, increments=max(1, generations // 4))

    def skip_bound(self, space: SearchSpace, generation: int) -> float:
        """The skip ratio bound in ``generation`` (0-based): closed during stage one, then opening."""
        if not space.search_skips:
            return 0.0
        steps_only = self.steps_only if space.search_steps or space.search_rho else 0
        if generation < steps_only:
            return 0.0
        opened = generation - steps_only + 1
        return min(space.max_skip_ratio, space.max_skip_ratio * opened / self.increments)


@dataclasses.dataclass(frozen=True)
class Record:
    """One evaluated candidate: the quality proxy, GFLOPs per image, and (when the search measures
    latency) milliseconds per image; ``cost`` is the one the search minimises."""

    candidate: Candidate
    quality: float
    gflops: float
    generation: int
    ms: float | None = None

    @property
    def cost(self) -> float:
        return self.gflops if self.ms is None else self.ms

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_json(), "quality": self.quality, "gflops": self.gflops,
                "ms": self.ms, "generation": self.generation}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Record":
        ms = data.get("ms")
        return Record(Candidate.from_json(data["candidate"]), float(data["quality"]), float(data["gflops"]),
                      int(data["generation"]), None if ms is None else float(ms))


@dataclasses.dataclass
class SearchState:
    """Everything a search needs to continue: written after every generation."""

    settings: dict[str, Any]
    generation: int
    rng: dict[str, Any]
    records: dict[str, Record]
    population: list[str]
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "settings": self.settings, "generation": self.generation,
                "rng": self.rng, "records": [r.to_json() for r in self.records.values()],
                "population": self.population, "elapsed_s": self.elapsed_s}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "SearchState":
        records = [Record.from_json(r) for r in data["records"]]
        return SearchState(data["settings"], int(data["generation"]), data["rng"],
                           {r.candidate.key: r for r in records}, list(data["population"]),
                           float(data.get("elapsed_s", 0.0)))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json()))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def load(path: Path) -> "SearchState":
        try:
            data = json.loads(path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"state version {data.get('version')}, expected {STATE_VERSION}")
            state = SearchState.from_json(data)
            np.random.default_rng().bit_generator.state = state.rng  # resume restores the generator from it
            return state
        except FileNotFoundError:
            raise UsageError(f"--resume: no search state at {path}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # any JSON, any shape
            raise UsageError(f"--resume: {path} is not a readable search state ({e})") from e


def select(records: Sequence[Record], count: int, max_gflops: float | None, rng: np.random.Generator) -> list[Record]:
    """The ``count`` best records by non-dominated rank and crowding distance on (quality, cost),
    infeasible ones (over the GFLOPs budget) last."""
    from pymoo.algorithms.moo.nsga2 import RankAndCrowding
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem

    if len(records) <= count:
        return sorted(records, key=lambda r: (r.quality, r.gflops))
    f = np.array([[r.quality, r.cost] for r in records], dtype=float)
    g = np.array([[r.gflops - max_gflops if max_gflops is not None else -1.0] for r in records], dtype=float)
    pop = Population.new(X=np.arange(len(records)).reshape(-1, 1), F=f, G=g, CV=np.maximum(g, 0.0))
    problem = Problem(n_var=1, n_obj=2, n_ieq_constr=1)
    survivors = RankAndCrowding().do(problem, pop, n_survive=count, random_state=rng)
    return [records[int(i)] for i in survivors.get("X").ravel()]


def best(records: Sequence[Record], max_gflops: float | None) -> Record | None:
    """The best quality within the budget (ties: the cheaper)."""
    feasible = [r for r in records if max_gflops is None or r.gflops <= max_gflops + 1e-12]
    return min(feasible, key=lambda r: (r.quality, r.gflops)) if feasible else None


def pareto_front(records: Sequence[Record]) -> list[Record]:
    """The records no other record beats on both quality and cost, cheapest first."""
    front: list[Record] = []
    for r in sorted(records, key=lambda r: (r.cost, r.quality)):
        if not front or r.quality < front[-1].quality:
            front.append(r)
    return front


def _unique(make: Callable[[], Candidate], seen: set[str], tries: int = 20) -> Candidate:
    candidate = make()
    for _ in range(tries):
        if candidate.key not in seen:
            break
        candidate = make()
    seen.add(candidate.key)
    return candidate


def initial_population(space: SearchSpace, config: EvolutionConfig, rng: np.random.Generator) -> list[Candidate]:
    """The default schedule, mutations of it (p = ``initial_mutation_p``) and random candidates."""
    bound = config.skip_bound(space, 0)
    uniform = space.uniform()
    seen = {uniform.key}
    out = [uniform]
    n_mut = (config.population - 1) // 2
    for _ in range(n_mut):
        out.append(_unique(lambda: space.mutate(uniform, rng, bound, config.initial_mutation_p), seen))
    while len(out) < config.population:
        out.append(_unique(lambda: space.random(rng, bound), seen))
    return out


def next_population(space: SearchSpace, config: EvolutionConfig, parents: Sequence[Candidate], generation: int,
                    rng: np.random.Generator, evaluated: set[str]) -> list[Candidate]:
    """Mutations of random parents, crossovers of random parent pairs, random candidates for the rest."""
    bound = config.skip_bound(space, generation)
    seen = set(evaluated)
    out: list[Candidate] = []

    def parent() -> Candidate:
        return parents[int(rng.integers(len(parents)))]

    for _ in range(config.mutations):
        out.append(_unique(lambda: space.mutate(parent(), rng, bound, config.mutation_p), seen))
    for _ in range(config.crossovers):
        if len(parents) < 2:
            break
        def cross() -> Candidate:
            i, j = rng.choice(len(parents), size=2, replace=False)
            return space.crossover(parents[int(i)], parents[int(j)], rng, bound)
        out.append(_unique(cross, seen))
    while len(out) < config.population:
        out.append(_unique(lambda: space.random(rng, bound), seen))
    return out


def evolve(space: SearchSpace, config: EvolutionConfig, *, evaluate: Callable[[list[Candidate]], list[float]],
           cost: Callable[[Candidate], tuple[float, float | None]], settings: dict[str, Any], seed: int, state_path: Path | None,
           resume: bool = False, max_gflops: float | None = None, time_budget_s: float | None = None,
           on_generation: Callable[[SearchState, int], None] | None = None) -> SearchState:
    """Run (or continue) the search; returns its final state. ``evaluate`` scores a batch of
    candidates (the quality proxy), ``cost`` gives one candidate's (GFLOPs, ms or None) per image.
    ``settings`` identify the search: a resumed one must have the same (but for ``generations`` and
    ``time_budget_s``, which may grow)."""
    settings = json.loads(json.dumps(settings))  # compared with the saved JSON as JSON
    if resume:
        if state_path is None:
            raise UsageError("resuming a search needs its state file")
        state = SearchState.load(state_path)
        different = {k for k in settings if k not in ("generations", "time_budget_s")
                     and state.settings.get(k) != settings[k]}
        if different:
            raise UsageError(f"--resume: the saved search used other settings ({', '.join(sorted(different))}); "
                             "run it with the same ones, or start a new search in another folder")
        state.settings = dict(settings)
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng
    else:
        rng = np.random.default_rng(seed)
        state = SearchState(dict(settings), 0, rng.bit_generator.state, {}, [])
    start = time.perf_counter() - state.elapsed_s
    while state.generation < config.generations:
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s and state.records:
            break
        gen = state.generation
        if gen == 0:
            population = initial_population(space, config, rng)
        else:
            parents = select(list(state.records.values()), config.parents, max_gflops, rng)
            population = next_population(space, config, [r.candidate for r in parents], gen, rng,
                                         set(state.records))
        # a population may repeat a candidate once the space runs short of new ones: score it once
        fresh = list({c.key: c for c in population if c.key not in state.records}.values())
        for candidate, quality in zip(fresh, evaluate(fresh)):
            gflops, ms = cost(candidate)
            state.records[candidate.key] = Record(candidate, float(quality), float(gflops), gen, ms)
        state.population = [c.key for c in population]
        state.generation = gen + 1
        state.rng = rng.bit_generator.state
        state.elapsed_s = time.perf_counter() - start
        if state_path is not None:
            state.save(state_path)
        if on_generation is not None:
            on_generation(state, len(fresh))
    return state
