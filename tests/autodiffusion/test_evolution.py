"""The evolution loop on a synthetic, deterministic objective: seeding, exact resume, interruption,
the evaluation cache, the two-stage skip bound, selection under a budget, and state-file errors."""

import collections
import dataclasses
import json
import types

import numpy as np
import pytest

from graphopt.autodiffusion import evolution
from graphopt.autodiffusion.evolution import (EvolutionConfig, Record, SearchState, best, evolve, pareto_front,
                                              select)
from graphopt.autodiffusion.space import Candidate, SearchSpace, make_space
from graphopt.errors import UsageError
from graphopt.models.samplers import edm_sigmas

STEPS, BLOCKS = 4, 5
CONFIG = EvolutionConfig(population=12, parents=4, mutations=5, crossovers=4, generations=4, steps_only=1,
                         increments=2)
SETTINGS = {"model": "synthetic", "steps": STEPS, "objective": "levels+skips"}


def make_test_space(max_skip_ratio: float = 0.2) -> SearchSpace:
    return make_space("edm", STEPS, BLOCKS, ("steps", "skips", "skip-scale"), default_levels=edm_sigmas(STEPS),
                      max_skip_ratio=max_skip_ratio)


class Objective:
    """Quality: distance of the levels to a target schedule, plus a penalty per skipped block and for
    rho away from 1; cost: GFLOPs falling with every skipped block. Counts evaluations per key."""

    def __init__(self, space: SearchSpace, fail_on_call: int | None = None, exc: type = KeyboardInterrupt,
                 clock: list | None = None):
        self.space = space
        self.target = np.log(np.array(edm_sigmas(space.steps, sigma_min=0.05, sigma_max=20.0)[:-1]))
        self.calls = 0
        self.fail_on_call, self.exc, self.clock = fail_on_call, exc, clock
        self.evaluated: collections.Counter = collections.Counter()

    def quality(self, c: Candidate) -> float:
        levels = np.log(np.array(self.space.levels_of(c)[:-1]))
        rho = self.space.rho_of(c)
        off = 0.0 if rho is None else abs(rho[0] - 1.0) + abs(rho[1] - 1.0)
        return float(np.abs(levels - self.target).sum() + 0.3 * c.skipped_count() + off)

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        self.calls += 1
        if self.clock is not None:
            self.clock[0] += 10.0
        if self.calls == self.fail_on_call:
            raise self.exc("interrupted")
        self.evaluated.update(c.key for c in candidates)
        return [self.quality(c) for c in candidates]

    def cost(self, c: Candidate) -> tuple[float, None]:
        return 1.0 * STEPS * BLOCKS - 0.7 * c.skipped_count(), None


def run(space=None, *, config=CONFIG, seed=0, state_path=None, resume=False, objective=None, settings=SETTINGS,
        **kw):
    space = space or make_test_space()
    objective = objective or Objective(space)
    state = evolve(space, config, evaluate=objective, cost=objective.cost, settings=settings, seed=seed,
                   state_path=state_path, resume=resume, **kw)
    return state, objective


def summary(state: SearchState) -> dict:
    return {k: (r.candidate, r.quality, r.gflops, r.generation, r.ms) for k, r in state.records.items()}


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_search_other_seed_other_search():
    a, _ = run(seed=0)
    b, _ = run(seed=0)
    c, _ = run(seed=1)
    assert summary(a) == summary(b) and a.population == b.population
    assert list(a.records) == list(b.records)  # the same order too
    assert len(a.records) > 2 * CONFIG.population
    assert set(a.records) != set(c.records)
    assert a.generation == b.generation == CONFIG.generations


def test_search_improves_on_the_synthetic_objective():
    state, objective = run(config=EvolutionConfig(population=16, parents=4, mutations=8, crossovers=4,
                                                  generations=8, steps_only=2, increments=2))
    by_gen = collections.defaultdict(list)
    for r in state.records.values():
        by_gen[r.generation].append(r.quality)
    first, last = min(by_gen[0]), min(min(v) for v in by_gen.values())
    assert last < first


# ------------------------------------------------------------------------------------------------ resume


def test_resume_equals_an_uninterrupted_run(tmp_path):
    path = tmp_path / "state.json"
    two = dataclasses.replace(CONFIG, generations=2)
    first, _ = run(config=two, state_path=path)
    assert first.generation == 2 and SearchState.load(path).generation == 2
    resumed, objective = run(config=CONFIG, state_path=path, resume=True)
    whole, _ = run(config=CONFIG)
    assert resumed.generation == whole.generation == 4
    assert summary(resumed) == summary(whole)
    assert resumed.population == whole.population
    assert objective.calls == 2  # only generations 3 and 4 were run after resuming
    assert summary(SearchState.load(path)) == summary(whole)


def test_interrupt_keeps_the_last_state_and_resume_finishes(tmp_path):
    path = tmp_path / "state.json"
    space = make_test_space()
    with pytest.raises(KeyboardInterrupt):
        run(space, state_path=path, objective=Objective(space, fail_on_call=3))
    saved = SearchState.load(path)
    assert saved.generation == 2
    assert {r.generation for r in saved.records.values()} == {0, 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
    resumed, _ = run(space, state_path=path, resume=True)
    whole, _ = run(space)
    assert summary(resumed) == summary(whole)


def test_a_failed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    """A disk that fills up halfway through writing the state leaves the last complete state."""
    path = tmp_path / "state.json"
    run(config=dataclasses.replace(CONFIG, generations=1), state_path=path)
    before = path.read_bytes()
    write_text = evolution.Path.write_text

    def half_written(self, text, *a, **k):
        write_text(self, text[: len(text) // 2], *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(evolution.Path, "write_text", half_written)
    with pytest.raises(OSError, match="disk full"):
        run(config=CONFIG, state_path=path, resume=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert SearchState.load(path).generation == 1


def test_resume_with_other_settings_names_them(tmp_path):
    path = tmp_path / "state.json"
    run(config=dataclasses.replace(CONFIG, generations=1), state_path=path)
    other = {**SETTINGS, "steps": 6, "objective": "other", "generations": 9, "time_budget_s": 3.0}
    with pytest.raises(UsageError, match=r"other settings \(objective, steps\)"):
        run(state_path=path, resume=True, settings=other)
    # generations and the time budget may change on resume
    state, _ = run(state_path=path, resume=True, settings={**SETTINGS, "generations": 9, "time_budget_s": 3.0})
    assert state.generation == CONFIG.generations


def test_resume_needs_a_state_file(tmp_path):
    with pytest.raises(UsageError, match="state file"):
        run(state_path=None, resume=True)
    with pytest.raises(UsageError, match="no search state"):
        run(state_path=tmp_path / "missing.json", resume=True)


@pytest.mark.parametrize("text", ["", "{not json", "[]", "null", "42", '{"version": 1}', '{"version": 99}',
                                  '{"version": 1, "settings": {}, "generation": "x", "rng": {}, "records": [],'
                                  ' "population": []}',
                                  '{"version": 1, "settings": {}, "generation": 1, "rng": {},'
                                  ' "records": [{"candidate": 3}], "population": []}',
                                  '{"version": 1, "settings": {}, "generation": 1, "rng": {"bit_generator": "MT"},'
                                  ' "records": [], "population": []}'],
                         ids=["empty", "truncated", "list", "null", "number", "no-fields", "version",
                              "generation", "record", "rng"])
def test_a_corrupt_state_file_is_a_usage_error(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(UsageError, match="not a readable search state"):
        SearchState.load(path)


def test_a_binary_state_file_is_a_usage_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not a readable search state"):
        run(state_path=path, resume=True)


# ------------------------------------------------------------------------------------------------- cache


def test_no_candidate_is_evaluated_twice(tmp_path):
    state, objective = run(config=dataclasses.replace(CONFIG, generations=6), state_path=tmp_path / "s.json")
    assert objective.evaluated and max(objective.evaluated.values()) == 1
    assert set(objective.evaluated) == set(state.records)


def test_no_candidate_is_evaluated_twice_in_an_exhausted_space():
    """3 of 6 levels and rho fixed: 20 candidates in all, fewer than the generations ask for, so the
    populations must repeat candidates; none may be scored twice."""
    space = SearchSpace(steps=3, grid=(6.0, 5.0, 4.0, 3.0, 2.0, 1.0), default=(0, 2, 4), blocks=0,
                        search_skips=False, search_rho=False)
    config = EvolutionConfig(population=8, parents=3, mutations=4, crossovers=2, generations=6)
    state, objective = run(space, config=config)
    assert max(objective.evaluated.values()) == 1
    assert len(state.records) == len(objective.evaluated) <= 20


# ----------------------------------------------------------------------------------------------- stages


def test_skip_bound_opens_in_increments_after_the_steps_only_stage():
    space = make_test_space(max_skip_ratio=0.2)
    config = EvolutionConfig(steps_only=3, increments=4)
    bounds = [config.skip_bound(space, g) for g in range(10)]
    assert bounds == pytest.approx([0, 0, 0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2])
    # nothing but skips searched: there is no stage one
    skips_only = make_space("edm", STEPS, BLOCKS, ("skips",), default_levels=edm_sigmas(STEPS), max_skip_ratio=0.2)
    assert config.skip_bound(skips_only, 0) == pytest.approx(0.05)
    # skips not searched: always closed
    steps_only = make_space("edm", STEPS, BLOCKS, ("steps",), default_levels=edm_sigmas(STEPS))
    assert {config.skip_bound(steps_only, g) for g in range(10)} == {0.0}


def test_candidates_follow_the_skip_bound_of_their_generation():
    space = make_test_space(max_skip_ratio=0.5)
    config = dataclasses.replace(CONFIG, generations=5, steps_only=2, increments=2)
    state, _ = run(space, config=config)
    skipped_by_gen = collections.defaultdict(int)
    for r in state.records.values():
        bound = config.skip_bound(space, r.generation)
        space.validate(r.candidate, bound)
        skipped_by_gen[r.generation] = max(skipped_by_gen[r.generation], r.candidate.skipped_count())
    assert skipped_by_gen[0] == skipped_by_gen[1] == 0
    assert skipped_by_gen[4] > 0


def test_config_is_checked():
    with pytest.raises(UsageError, match="exceed the population"):
        EvolutionConfig(population=10, mutations=6, crossovers=5)
    with pytest.raises(UsageError, match="mutation probabilities"):
        EvolutionConfig(mutation_p=0.0)
    with pytest.raises(UsageError):
        EvolutionConfig(population=1)


def test_sized_keeps_autodiffusions_proportions_at_any_size():
    assert EvolutionConfig.sized() == EvolutionConfig()
    small = EvolutionConfig.sized(24, 8)
    assert (small.parents, small.mutations, small.crossovers, small.steps_only, small.increments) == (4, 12, 7, 2, 2)
    for population in range(2, 60):
        config = EvolutionConfig.sized(population, 1)  # never raises: operators fit the population
        assert config.parents >= 1 and config.mutations + config.crossovers <= population
    with pytest.raises(UsageError, match="population of at least 2"):
        EvolutionConfig.sized(1, 5)


# ------------------------------------------------------------------------------------- time budget


def test_the_time_budget_stops_the_loop_early(monkeypatch):
    clock = [0.0]  # every evaluation takes 10 fake seconds
    monkeypatch.setattr(evolution, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    space = make_test_space()
    config = dataclasses.replace(CONFIG, generations=10)
    state, objective = run(space, config=config, objective=Objective(space, clock=clock), time_budget_s=25.0)
    assert state.generation == 3 and objective.calls == 3  # 0, 10, 20 s: under 25; 30 s: stop
    assert state.elapsed_s == pytest.approx(30.0)


def test_the_time_budget_carries_over_a_resume(monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(evolution, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    space, path = make_test_space(), tmp_path / "state.json"
    config = dataclasses.replace(CONFIG, generations=10)
    run(space, config=config, objective=Objective(space, clock=clock), time_budget_s=25.0, state_path=path)
    clock[0] = 1000.0  # a later session: only the saved 30 s count
    state, objective = run(space, config=config, objective=Objective(space, clock=clock), time_budget_s=25.0,
                           state_path=path, resume=True)
    assert state.generation == 3 and objective.calls == 0
    state, objective = run(space, config=config, objective=Objective(space, clock=clock), time_budget_s=45.0,
                           state_path=path, resume=True)
    assert state.generation == 5 and objective.calls == 2


# ------------------------------------------------------------------------------ select, best, front


def rec(quality: float, gflops: float, key_level: int, ms: float | None = None) -> Record:
    return Record(Candidate((key_level,), ((),), None), quality, gflops, 0, ms)


def test_select_prefers_feasible_records_under_the_budget():
    rng = np.random.default_rng(0)
    feasible = [rec(5.0 - i * 0.5, 1.0 + i * 0.2, i) for i in range(6)]  # a front under 2.0 GFLOPs
    infeasible = [rec(0.1 * i, 3.0 + i, 10 + i) for i in range(6)]  # better quality, over budget
    records = infeasible + feasible
    chosen = select(records, 4, 2.0, rng)
    assert len(chosen) == 4 and all(r.gflops <= 2.0 for r in chosen)
    chosen = select(records, 8, 2.0, rng)
    assert len(chosen) == 8 and set(map(id, feasible)) <= set(map(id, chosen))
    # the least-violating infeasible ones come next
    assert {r.gflops for r in chosen if r.gflops > 2.0} == {3.0, 4.0}
    # without a budget the better-quality ones are on the front
    assert any(r.gflops > 2.0 for r in select(records, 4, None, rng))


def test_select_takes_the_front_first_and_returns_count_records():
    rng = np.random.default_rng(0)
    front = [rec(4.0, 1.0, 0), rec(3.0, 2.0, 1), rec(2.0, 3.0, 2), rec(1.0, 4.0, 3)]
    dominated = [rec(4.5, 1.5, 4), rec(3.5, 2.5, 5), rec(5.0, 5.0, 6)]
    chosen = select(dominated + front, 4, None, rng)
    assert sorted(chosen, key=lambda r: r.gflops) == front
    for count in (1, 2, 5, 7):
        assert len(select(dominated + front, count, None, rng)) == count
    # the two front ends have infinite crowding distance: they survive a cut to 2
    assert {r.gflops for r in select(dominated + front, 2, None, rng)} == {1.0, 4.0}
    # fewer records than asked: all of them, best quality first
    assert select(front[:3], 5, None, rng) == sorted(front[:3], key=lambda r: r.quality)


def test_best_is_the_best_quality_within_budget_ties_cheaper():
    records = [rec(2.0, 3.0, 0), rec(1.0, 5.0, 1), rec(2.0, 2.0, 2), rec(3.0, 1.0, 3)]
    assert best(records, None) is records[1]
    assert best(records, 4.0) is records[2]  # ties on quality go to the cheaper
    assert best(records, 1.0) is records[3]
    assert best(records, 0.5) is None
    assert best([], None) is None


def test_pareto_front_on_hand_made_records():
    a, b, c, d, e = rec(5.0, 1.0, 0), rec(3.0, 2.0, 1), rec(4.0, 3.0, 2), rec(1.0, 4.0, 3), rec(3.0, 2.0, 4)
    assert pareto_front([d, c, b, a, e]) == [a, b, d]
    assert pareto_front([]) == []
    # latency, when measured, is the cost
    fast, slow = rec(2.0, 9.0, 5, ms=1.0), rec(1.0, 1.0, 6, ms=5.0)
    assert pareto_front([slow, fast]) == [fast, slow]


def test_record_and_state_json_round_trip(tmp_path):
    state, _ = run(config=dataclasses.replace(CONFIG, generations=2))
    state.records[next(iter(state.records))] = dataclasses.replace(next(iter(state.records.values())), ms=1.25)
    path = tmp_path / "s.json"
    state.save(path)
    back = SearchState.load(path)
    assert summary(back) == summary(state) and back.rng == state.rng and back.population == state.population
    assert json.loads(path.read_text())["version"] == evolution.STATE_VERSION
