"""AutoDiffusion's search space and genetic operators: every operator output is a valid candidate, and
none of the upstream bugs (mutation that never mutates, a crossover that loses time steps, duplicate
time steps collapsed) is here."""

import json

import numpy as np
import pytest

from graphopt.autodiffusion.space import Candidate, SearchSpace, make_space
from graphopt.models.samplers import Sampler, edm_sigmas, flow_times

SEEDS = range(150)
BLOCKS = 6
ALL = ("steps", "skips", "skip-scale")
PARTS = [("steps",), ("steps", "skips"), ALL, ("skips",), ("skips", "skip-scale"), ("skip-scale",)]


def sampler(family: str) -> Sampler:
    levels = edm_sigmas(16) if family == "edm" else flow_times(16)
    return Sampler(family, "euler", levels, (1, 8, 8))


def space_for(family: str, steps: int, parts, blocks: int = BLOCKS, max_skip_ratio: float = 0.25) -> SearchSpace:
    return make_space(family, steps, blocks, parts, default_levels=sampler(family).with_steps(steps).levels,
                      max_skip_ratio=max_skip_ratio)


def varies(space: SearchSpace) -> bool:
    """Whether any gene of the space can change (at the space's full skip bound)."""
    free_levels = len(space.grid) - space.steps if space.search_steps else 0
    if space.fixed_first and space.steps in (1, len(space.grid)):  # flow: the first level never moves
        free_levels = 0
    return bool(free_levels or space.max_skipped(space.max_skip_ratio) or space.search_rho)


SPACE_CASES = [(family, steps, parts) for family in ("edm", "flow") for steps in (1, 2, 4, 10) for parts in PARTS]
SPACE_IDS = [f"{f}-{k}-{'+'.join(p)}" for f, k, p in SPACE_CASES]


@pytest.fixture(params=SPACE_CASES, ids=SPACE_IDS)
def space(request):
    return space_for(*request.param)


def tiny_space(steps: int = 4, grid: int = 8, blocks: int = 3, **kw) -> SearchSpace:
    """A hand-built space with a small grid, so collisions between genes are likely."""
    return SearchSpace(steps=steps, grid=tuple(float(grid - i) for i in range(grid)), default=tuple(range(steps)),
                       blocks=blocks, **kw)


def assert_levels_ok(space: SearchSpace, c: Candidate) -> None:
    assert len(c.levels) == space.steps
    assert list(c.levels) == sorted(set(c.levels)), c.levels
    assert 0 <= c.levels[0] and c.levels[-1] < len(space.grid)
    if space.fixed_first:
        assert c.levels[0] == 0


def some_candidates(space: SearchSpace, n: int, ratio: float) -> list[Candidate]:
    rng = np.random.default_rng(1234)
    return [space.uniform()] + [space.random(rng, ratio) for _ in range(n - 1)]


# ------------------------------------------------------------------------------------------- make_space


def test_make_space_rejects_unknown_parts():
    with pytest.raises(ValueError, match="unknown search space part.*steeps"):
        space_for("edm", 4, ("steeps", "skips"))
    with pytest.raises(ValueError, match="skip_scale"):
        space_for("flow", 4, ("skip_scale",))


@pytest.mark.parametrize("family", ["edm", "flow"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 16])
def test_uniform_candidate_is_the_default_schedule(family, steps):
    space = space_for(family, steps, ALL)
    uniform = space.uniform()
    space.validate(uniform, 0.0)
    expected = sampler(family).with_steps(steps).levels
    # make_space rounds levels to 12 decimals to merge the default schedule into the dense grid
    assert space.levels_of(uniform) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert uniform.skipped == ((),) * steps and space.rho_of(uniform) == (1.0, 1.0)
    assert space.fixed_first == (family == "flow")
    # the grid is the dense family schedule merged with the default one
    assert len(space.grid) >= 999 and space.grid[0] == pytest.approx(expected[0])


def test_make_space_without_blocks_does_not_search_skips():
    space = space_for("edm", 4, ALL, blocks=0)
    assert not space.search_skips and space.max_skipped(1.0) == 0
    assert space.uniform().rho is not None


# ------------------------------------------------------------------------------------- random candidates


def test_random_candidates_are_valid(space):
    rng = np.random.default_rng(0)
    for ratio in (0.0, space.max_skip_ratio / 2, space.max_skip_ratio):
        seen = set()
        for _ in range(50):
            c = space.random(rng, ratio)
            space.validate(c, ratio)
            assert_levels_ok(space, c)
            seen.add(c.key)
    if varies(space):  # at the full bound: random, not a constant
        assert len(seen) > 1


def test_random_candidates_use_the_skip_budget():
    space = space_for("edm", 4, ("steps", "skips"))
    rng = np.random.default_rng(0)
    limit = space.max_skipped(space.max_skip_ratio)
    counts = {space.random(rng, space.max_skip_ratio).skipped_count() for _ in range(200)}
    assert limit == 6 and counts == set(range(limit + 1))


# ------------------------------------------------------------------------------------------------ validate


def test_validate_rejects_bad_candidates():
    space = tiny_space(steps=3, grid=8, blocks=3, max_skip_ratio=1.0)
    ok = Candidate((1, 4, 6), ((0,), (), (1, 2)), (space.one, 3))
    space.validate(ok, 1.0)
    bad = {
        "duplicate time steps": Candidate((1, 4, 4), ((), (), ()), (0, 0)),
        "unsorted time steps": Candidate((4, 1, 6), ((), (), ()), (0, 0)),
        "time step past the grid": Candidate((1, 4, 8), ((), (), ()), (0, 0)),
        "negative time step": Candidate((-1, 4, 6), ((), (), ()), (0, 0)),
        "too few time steps": Candidate((1, 4), ((), ()), (0, 0)),
        "skip sets per step": Candidate((1, 4, 6), ((), ()), (0, 0)),
        "block id past the model": Candidate((1, 4, 6), ((3,), (), ()), (0, 0)),
        "negative block id": Candidate((1, 4, 6), ((-1,), (), ()), (0, 0)),
        "duplicate block id": Candidate((1, 4, 6), ((1, 1), (), ()), (0, 0)),
        "rho past the grid": Candidate((1, 4, 6), ((), (), ()), (0, len(space.rho_grid))),
        "rho missing": Candidate((1, 4, 6), ((), (), ()), None),
    }
    for why, c in bad.items():
        with pytest.raises(ValueError):
            space.validate(c)
            pytest.fail(f"validate accepted a candidate with {why}")


def test_validate_enforces_the_skip_ratio_bound():
    space = tiny_space(steps=4, grid=8, blocks=5, max_skip_ratio=0.5)  # 20 block-steps
    c = Candidate((0, 1, 2, 3), ((0, 1), (2,), (), ()), (0, 0))
    space.validate(c, 0.15)  # floor(0.15 * 20) = 3 skipped allowed
    with pytest.raises(ValueError, match="3 skipped block-steps exceed the bound 2"):
        space.validate(c, 0.1)
    with pytest.raises(ValueError, match="exceed"):
        space.validate(c, 0.0)


def test_validate_keeps_fixed_first_and_default_schedule():
    flow = space_for("flow", 4, ALL)
    with pytest.raises(ValueError, match="first level"):
        flow.validate(Candidate((1, 2, 3, 4), ((),) * 4, (flow.one, flow.one)))
    skips_only = space_for("edm", 4, ("skips",))
    with pytest.raises(ValueError, match="not searched"):
        skips_only.validate(Candidate((0, 1, 2, 3), ((),) * 4))


def test_duplicate_time_steps_are_not_collapsed():
    """Upstream collapsed duplicate time steps into a shorter schedule; here the candidate keeps what
    it was given and validation refuses it, so a plan never silently loses a step."""
    space = tiny_space(steps=4, grid=8)
    c = Candidate((1, 3, 3, 5), ((),) * 4, (0, 0))
    assert len(c.levels) == 4 and len(space.levels_of(c)) == 5
    with pytest.raises(ValueError, match="distinct"):
        space.validate(c)


# --------------------------------------------------------------------------------------------------- keys


def test_candidate_key_survives_json_and_tells_candidates_apart():
    space = space_for("edm", 4, ALL)
    cands = some_candidates(space, 60, space.max_skip_ratio)
    for c in cands:
        back = Candidate.from_json(json.loads(json.dumps(c.to_json())))
        assert back == c and back.key == c.key
        assert len(c.key) == 16 and c.key == Candidate(c.levels, c.skipped, c.rho).key
    assert len({c.key for c in cands}) == len(set(cands)) > 50
    base = Candidate((0, 1, 2), ((), (), ()), (3, 4))
    others = [Candidate((0, 1, 3), ((), (), ()), (3, 4)), Candidate((0, 1, 2), ((0,), (), ()), (3, 4)),
              Candidate((0, 1, 2), ((), (0,), ()), (3, 4)), Candidate((0, 1, 2), ((), (), ()), (4, 3)),
              Candidate((0, 1, 2), ((), (), ()), None)]
    assert len({base.key, *(o.key for o in others)}) == 1 + len(others)


# ------------------------------------------------------------------------------------------------ mutation


def test_mutation_always_mutates(space):
    """Upstream's skip-layer mutation compared (==) instead of assigning and never changed anything."""
    if not varies(space):
        pytest.skip("nothing in this space can vary")
    ratio = space.max_skip_ratio
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        c = space.random(rng, ratio)
        m = space.mutate(c, rng, ratio)
        assert m != c and m.key != c.key
        space.validate(m, ratio)
        assert_levels_ok(space, m)


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_skip_only_mutation_changes_the_skipped_blocks(family):
    """The upstream bug concerned the skip genes: with only skips searched, every mutation must
    change which blocks are skipped."""
    space = space_for(family, 4, ("skips",))
    ratio = space.max_skip_ratio
    changed_steps = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        c = space.random(rng, ratio)
        m = space.mutate(c, rng, ratio)
        assert m.levels == c.levels == space.default and m.rho is None
        assert m.skipped != c.skipped
        space.validate(m, ratio)
        changed_steps |= {i for i in range(4) if m.skipped[i] != c.skipped[i]}
    assert changed_steps == {0, 1, 2, 3}


def test_mutation_with_small_p_still_changes_a_gene(space):
    if not varies(space):
        pytest.skip("nothing in this space can vary")
    ratio = space.max_skip_ratio
    for seed in range(40):
        rng = np.random.default_rng(seed)
        c = space.random(rng, ratio)
        m = space.mutate(c, rng, ratio, p=1e-9)
        assert m != c
        space.validate(m, ratio)


def test_mutation_changes_as_many_genes_as_p_says():
    """p is the per-gene probability, and "at least one change" conditions on it: with K = 10 time
    steps the mean number of replaced steps is E[X | X >= 1] for X ~ Bin(10, p), about 1.54 at
    p = 0.1 (raising p after a draw that changed nothing would give about 2.7)."""
    space = space_for("edm", 10, ("steps",))
    for p in (0.1, 0.25, 1.0):
        counts = []
        for seed in range(300):
            rng = np.random.default_rng(seed)
            c = space.random(rng, 0.0)
            m = space.mutate(c, rng, 0.0, p=p)
            counts.append(len(set(c.levels) - set(m.levels)))
        expected = 10 * p / (1 - (1 - p) ** 10)
        assert float(np.mean(counts)) == pytest.approx(expected, rel=0.1), p


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25])
def test_mutation_respects_the_skip_ratio_bound(ratio):
    space = space_for("edm", 6, ALL, max_skip_ratio=0.25)
    limit = space.max_skipped(ratio)
    full = space.max_skipped(space.max_skip_ratio)
    reached = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        c = space.random(rng, space.max_skip_ratio)  # may hold more skips than the bound allows
        for _ in range(3):
            c = space.mutate(c, rng, ratio, p=0.5)
            assert c.skipped_count() <= limit
            space.validate(c, ratio)
            reached = max(reached, c.skipped_count())
    assert full == 9 and reached == limit  # the bound is reached, not just respected


def test_mutation_keeps_the_flow_first_level():
    space = space_for("flow", 5, ALL)
    assert space.fixed_first and space.grid[0] == 1.0
    moved = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        c = space.mutate(space.random(rng, 0.1), rng, 0.1, p=1.0)
        assert c.levels[0] == 0 and space.levels_of(c)[0] == 1.0
        assert_levels_ok(space, c)
        moved |= set(c.levels[1:])
    assert 0 not in moved


def test_mutation_never_duplicates_time_steps_on_a_crowded_grid():
    """With K close to the grid size every replacement value must be one the candidate does not use."""
    for fixed_first in (False, True):
        space = tiny_space(steps=5, grid=7, blocks=2, fixed_first=fixed_first, max_skip_ratio=0.5)
        for seed in SEEDS:
            rng = np.random.default_rng(seed)
            c = space.random(rng, 0.5)
            m = space.mutate(c, rng, 0.5, p=1.0)
            assert m != c
            assert_levels_ok(space, m)
            space.validate(m, 0.5)


def test_mutation_of_a_space_with_nothing_to_vary_returns_the_candidate():
    space = tiny_space(steps=4, grid=4, blocks=0, search_rho=False, search_skips=False)
    c = space.uniform()
    assert space.mutate(c, np.random.default_rng(0), 0.1) == c


# ----------------------------------------------------------------------------------------------- crossover


def crossover_pairs(space: SearchSpace, ratio: float):
    rng = np.random.default_rng(99)
    for _ in range(40):
        yield space.random(rng, ratio), space.random(rng, ratio)


def test_crossover_gives_valid_children(space):
    ratio = space.max_skip_ratio
    for n, (a, b) in enumerate(crossover_pairs(space, ratio)):
        for seed in range(5):
            child = space.crossover(a, b, np.random.default_rng(n * 10 + seed), ratio)
            space.validate(child, ratio)
            assert_levels_ok(space, child)


def test_crossover_with_colliding_parents_keeps_k_distinct_steps():
    """Parents a = (0, 1, 2, 3) and b = (1, 2, 3, 4): picking b's gene at position i and a's at i + 1
    picks the same step twice. Upstream checked the child's length by comparing lists and let such
    duplicates through (then collapsed them); the child must keep K distinct steps."""
    space = tiny_space(steps=4, grid=8, blocks=0, search_rho=False, search_skips=False)
    a = Candidate((0, 1, 2, 3), ((),) * 4)
    b = Candidate((1, 2, 3, 4), ((),) * 4)
    children = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        for x, y in ((a, b), (b, a)):
            child = space.crossover(x, y, rng, 0.0)
            assert_levels_ok(space, child)
            space.validate(child)
            children.add(child.levels)
    assert len(children) > 1


def test_crossover_repairs_collisions_on_hand_built_and_real_spaces():
    """Parents that share steps at shifted positions, on a tiny grid (where the repair has few free
    values) and on the real EDM and flow grids."""
    cases = [(tiny_space(steps=4, grid=5, blocks=0, search_rho=False, search_skips=False),
              (0, 1, 2, 3), (1, 2, 3, 4)),
             (tiny_space(steps=5, grid=7, blocks=0, search_rho=False, search_skips=False, fixed_first=True),
              (0, 2, 3, 4, 5), (0, 1, 2, 3, 4)),
             (space_for("edm", 6, ("steps",)), (10, 20, 30, 40, 50, 60), (20, 30, 40, 50, 60, 70)),
             (space_for("flow", 6, ("steps",)), (0, 5, 10, 15, 20, 25), (0, 10, 15, 20, 25, 30))]
    for space, la, lb in cases:
        a, b = (Candidate(levels, ((),) * space.steps, None) for levels in (la, lb))
        for seed in SEEDS:
            child = space.crossover(a, b, np.random.default_rng(seed), 0.0)
            assert_levels_ok(space, child)


def test_crossover_takes_every_gene_from_a_parent_without_collisions():
    space = space_for("edm", 5, ALL, max_skip_ratio=1.0)
    # interleaved levels never collide: a's i-th step < b's i-th step < a's (i+1)-th step
    a = Candidate((10, 30, 50, 70, 90), ((0,), (), (1, 2), (), (5,)), (2, 20))
    b = Candidate((20, 40, 60, 80, 100), ((), (3,), (4,), (0, 1, 2), ()), (8, 12))
    from_a = from_b = 0
    for seed in SEEDS:
        child = space.crossover(a, b, np.random.default_rng(seed), 1.0)
        space.validate(child, 1.0)
        for i in range(5):
            assert child.levels[i] in (a.levels[i], b.levels[i])
            assert child.skipped[i] in (a.skipped[i], b.skipped[i])
            from_a += child.levels[i] == a.levels[i]
            from_b += child.levels[i] == b.levels[i]
        assert child.rho[0] in (a.rho[0], b.rho[0]) and child.rho[1] in (a.rho[1], b.rho[1])
    assert from_a > 0.3 * 5 * len(SEEDS) and from_b > 0.3 * 5 * len(SEEDS)  # uniform crossover


def test_crossover_gene_sets_come_from_the_parents_when_picks_are_distinct():
    space = space_for("edm", 6, ("steps",))
    rng = np.random.default_rng(5)
    for _ in range(100):
        a, b = space.random(rng, 0.0), space.random(rng, 0.0)
        if set(a.levels) & set(b.levels):
            continue  # shared steps may collide; covered above
        child = space.crossover(a, b, rng, 0.0)
        assert set(child.levels) <= set(a.levels) | set(b.levels)
        assert_levels_ok(space, child)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1])
def test_crossover_respects_the_skip_ratio_bound(ratio):
    space = space_for("flow", 6, ALL, max_skip_ratio=0.25)
    limit = space.max_skipped(ratio)
    counts = []
    for n, (a, b) in enumerate(crossover_pairs(space, 0.25)):  # parents skip more than the bound
        for seed in range(4):
            child = space.crossover(a, b, np.random.default_rng(n * 4 + seed), ratio)
            space.validate(child, ratio)
            counts.append(child.skipped_count())
    assert max(counts) == limit



def test_a_per_step_rho_schedule_has_four_genes_linear_in_the_step():
    space = make_space("edm", 5, BLOCKS, ALL, default_levels=sampler("edm").with_steps(5).levels,
                       rho_per_step=True)
    rng = np.random.default_rng(0)
    uniform = space.uniform()
    assert uniform.rho == (space.one,) * 4 and space.step_rho(uniform) == ((1.0, 1.0),) * 5
    for _ in range(50):
        c = space.mutate(space.random(rng, 0.1), rng, 0.1)
        space.validate(c, 0.1)
        assert len(c.rho) == 4
        first_top, first_bottom, last_top, last_bottom = space.rho_of(c)
        steps = space.step_rho(c)
        assert steps[0] == pytest.approx((first_top, first_bottom))
        assert steps[-1] == pytest.approx((last_top, last_bottom))
        assert steps[2] == pytest.approx(((first_top + last_top) / 2, (first_bottom + last_bottom) / 2))
    child = space.crossover(space.random(rng, 0.1), space.random(rng, 0.1), rng, 0.1)
    assert len(child.rho) == 4
    with pytest.raises(ValueError, match="2 rho genes, expected 4"):
        space.validate(Candidate(uniform.levels, uniform.skipped, (0, 0)))
