"""The search space and AutoDiffusion's genetic operators over it.

A :class:`Candidate` is a sampling plan in genes:

- **time steps**: ``K`` distinct indices into a grid of noise levels (strictly decreasing), sorted,
  so the plan's levels are ``grid[i]`` for each index, then 0. The grid is a dense schedule of the
  sampler family (1000 levels) merged with the family's default schedule at ``K`` steps, so the
  default plan is a candidate. Flow matching keeps its first level at t = 1 (pure noise), where the
  sampler's starting noise is exact; EDM may start lower than sigma_max.
- **skipped blocks**: per step, the sorted ids of the residual blocks that step skips.
- **skip scales**: two indices into a grid of rho values, (rho_top, rho_bottom), expanded linearly
  in skip depth (:func:`graphopt.passes.skip_scale.linear_scales`) to every step's scales; with
  the per-step schedule, four: (rho_top, rho_bottom) at the first step and at the last, linear in
  the step index in between.

Operators, after AutoDiffusion (ICCV 2023) without its upstream bugs: mutation replaces each gene
with probability ``p`` by a value the candidate does not use yet, and always changes at least one
gene; uniform crossover takes each gene from either parent, keeps ``K`` steps and repairs a time
step both parents' picks would duplicate; no operator ever yields duplicate time steps. The skip
ratio bound (skipped block-steps over all block-steps) is enforced on every candidate produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np

SPACES = ("steps", "skips", "skip-scale")
RHO_GRID = tuple(round(0.5 + 0.025 * i, 3) for i in range(29))  # 0.5 .. 1.2, 1.0 included
GRID_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the space: level indices, per-step skipped block ids, and rho indices into the
    rho grid: (rho_top, rho_bottom), or with a per-step schedule (top, bottom) at the first step then
    at the last (None when skip scales are not searched)."""

    levels: tuple[int, ...]
    skipped: tuple[tuple[int, ...], ...]
    rho: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "skipped": [list(s) for s in self.skipped],
                "rho": None if self.rho is None else list(self.rho)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Candidate":
        rho = data.get("rho")
        return Candidate(tuple(int(i) for i in data["levels"]), tuple(tuple(int(b) for b in s) for s in data["skipped"]),
                         None if rho is None else tuple(int(r) for r in rho))

    @property
    def key(self) -> str:
        """A stable hash: the cache key of this candidate's evaluation."""
        return hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def skipped_count(self) -> int:
        return sum(len(s) for s in self.skipped)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What may vary: which of ``steps``, ``skips``, ``skip-scale``, over which values.

    ``grid`` holds the candidate levels (strictly decreasing, no 0), ``default`` the indices of the
    family's default schedule at ``steps`` steps, ``blocks`` the number of skippable blocks,
    ``max_skip_ratio`` the largest fraction of block-steps a candidate may skip once the bound has
    fully opened.
    """

    steps: int
    grid: tuple[float, ...]
    default: tuple[int, ...]
    blocks: int
    search_steps: bool = True
    search_skips: bool = True
    search_rho: bool = True
    fixed_first: bool = False
    max_skip_ratio: float = 0.1
    rho_grid: tuple[float, ...] = RHO_GRID
    rho_per_step: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("a plan needs at least one step")
        if len(self.grid) < self.steps:
            raise ValueError(f"the level grid has {len(self.grid)} values, fewer than {self.steps} steps")
        if any(a <= b for a, b in zip(self.grid, self.grid[1:])) or self.grid[-1] <= 0:
            raise ValueError("the level grid must be positive and strictly decreasing")
        if len(self.default) != self.steps or list(self.default) != sorted(set(self.default)):
            raise ValueError("the default schedule must be `steps` distinct increasing grid indices")
        if not 0 <= self.max_skip_ratio <= 1:
            raise ValueError(f"max_skip_ratio must be in [0, 1], got {self.max_skip_ratio}")

    @property
    def rho_genes(self) -> int:
        """2 for one (rho_top, rho_bottom) for all steps, 4 for a per-step schedule."""
        return 4 if self.rho_per_step else 2

    @property
    def one(self) -> int:
        """The rho grid index of 1.0 (no scaling)."""
        return self.rho_grid.index(1.0)

    def max_skipped(self, ratio: float) -> int:
        """How many block-steps a candidate may skip under a skip ratio bound ``ratio``."""
        if not self.search_skips or self.blocks == 0:
            return 0
        return int(np.floor(ratio * self.steps * self.blocks + 1e-9))

    def levels_of(self, candidate: Candidate) -> tuple[float, ...]:
        return tuple(self.grid[i] for i in candidate.levels) + (0.0,)

    def rho_of(self, candidate: Candidate) -> tuple[float, ...] | None:
        """(rho_top, rho_bottom) (per-step schedule: at the first step, then at the last), or None when
        skip scales are not part of the candidate."""
        if candidate.rho is None:
            return None
        return tuple(self.rho_grid[i] for i in candidate.rho)

    def step_rho(self, candidate: Candidate) -> tuple[tuple[float, float], ...] | None:
        """(rho_top, rho_bottom) of every step."""
        rho = self.rho_of(candidate)
        if rho is None:
            return None
        if len(rho) == 2:
            return tuple((rho[0], rho[1]) for _ in range(self.steps))
        out = []
        for i in range(self.steps):
            f = i / (self.steps - 1) if self.steps > 1 else 0.0
            out.append((rho[0] + (rho[2] - rho[0]) * f, rho[1] + (rho[3] - rho[1]) * f))
        return tuple(out)

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "grid": len(self.grid), "blocks": self.blocks,
                "search": [name for name, on in zip(SPACES, (self.search_steps, self.search_skips, self.search_rho))
                           if on],
                "fixed_first_level": self.fixed_first, "max_skip_ratio": self.max_skip_ratio,
                "rho_schedule": "per-step" if self.rho_per_step else "constant",
                "rho_grid": [self.rho_grid[0], self.rho_grid[-1], len(self.rho_grid)]}

    # -------------------------------------------------------------------------------- candidates

    def uniform(self) -> Candidate:
        """The family's default schedule, nothing skipped, rho = 1."""
        return Candidate(self.default, tuple(() for _ in range(self.steps)),
                         (self.one,) * self.rho_genes if self.search_rho else None)

    def validate(self, c: Candidate, ratio: float | None = None) -> None:
        """Raise ValueError unless ``c`` is a well-formed candidate of this space (and, with ``ratio``,
        within that skip ratio bound)."""
        if len(c.levels) != self.steps:
            raise ValueError(f"{len(c.levels)} time steps, expected {self.steps}")
        if list(c.levels) != sorted(set(c.levels)) or c.levels[0] < 0 or c.levels[-1] >= len(self.grid):
            raise ValueError(f"time steps must be distinct sorted grid indices, got {c.levels}")
        if self.fixed_first and c.levels[0] != 0:
            raise ValueError("the first level is fixed to the grid's first")
        if not self.search_steps and c.levels != self.default:
            raise ValueError("time steps are not searched: the candidate must keep the default schedule")
        if len(c.skipped) != self.steps:
            raise ValueError(f"{len(c.skipped)} skip sets, expected {self.steps}")
        for ids in c.skipped:
            if list(ids) != sorted(set(ids)) or any(not 0 <= b < self.blocks for b in ids):
                raise ValueError(f"skip sets must hold distinct sorted block ids, got {ids}")
        if not self.search_skips and c.skipped_count():
            raise ValueError("blocks are not searched: the candidate must skip none")
        if ratio is not None and c.skipped_count() > self.max_skipped(ratio):
            raise ValueError(f"{c.skipped_count()} skipped block-steps exceed the bound {self.max_skipped(ratio)}")
        if (c.rho is not None) != self.search_rho:
            raise ValueError("rho genes present exactly when skip scales are searched")
        if c.rho is not None and len(c.rho) != self.rho_genes:
            raise ValueError(f"{len(c.rho)} rho genes, expected {self.rho_genes}")
        if c.rho is not None and not all(0 <= r < len(self.rho_grid) for r in c.rho):
            raise ValueError(f"rho indices out of the grid: {c.rho}")

    def random(self, rng: np.random.Generator, ratio: float) -> Candidate:
        """A random candidate under the skip ratio bound ``ratio``."""
        levels = self.default
        if self.search_steps:
            levels = self._random_levels(rng)
        skipped = self._random_skips(rng, rng.integers(0, self.max_skipped(ratio) + 1))
        rho = tuple(int(rng.integers(len(self.rho_grid))) for _ in range(self.rho_genes)) if self.search_rho else None
        return Candidate(levels, skipped, rho)

    def _random_levels(self, rng: np.random.Generator) -> tuple[int, ...]:
        if self.fixed_first:
            rest = rng.choice(np.arange(1, len(self.grid)), size=self.steps - 1, replace=False)
            return tuple(sorted([0, *(int(i) for i in rest)]))
        return tuple(sorted(int(i) for i in rng.choice(len(self.grid), size=self.steps, replace=False)))

    def _random_skips(self, rng: np.random.Generator, count: int) -> tuple[tuple[int, ...], ...]:
        sets: list[set[int]] = [set() for _ in range(self.steps)]
        if count and self.blocks:
            cells = rng.choice(self.steps * self.blocks, size=int(count), replace=False)
            for cell in cells:
                sets[int(cell) // self.blocks].add(int(cell) % self.blocks)
        return tuple(tuple(sorted(s)) for s in sets)

    # --------------------------------------------------------------------------------- operators

    def mutate(self, c: Candidate, rng: np.random.Generator, ratio: float, p: float = 0.25) -> Candidate:
        """Replace each gene with probability ``p`` by a value ``c`` does not use; at least one gene
        always changes (when the space has any gene that can)."""
        for attempt in range(100):
            levels, skipped, rho = self._mutate_once(c, rng, ratio, p)
            out = Candidate(levels, skipped, rho)
            if out != c:
                return out
            if attempt >= 50:  # redrawing at p samples "at least one change"; a tiny p gives up on that
                p = max(p, 0.5)
        return c  # a space with nothing to vary (no searched gene): the only candidate is itself

    def _mutate_once(self, c: Candidate, rng: np.random.Generator, ratio: float, p: float
                     ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[int, int] | None]:
        levels = list(c.levels)
        if self.search_steps:
            for i in range(self.steps):
                if self.fixed_first and i == 0:
                    continue
                if rng.random() < p:
                    used = set(levels)
                    free = [j for j in range(len(self.grid)) if j not in used and not (self.fixed_first and j == 0)]
                    if free:
                        levels[i] = int(free[int(rng.integers(len(free)))])
            levels = sorted(levels)
        sets = [set(s) for s in c.skipped]
        limit = self.max_skipped(ratio)
        if limit:
            for step in range(self.steps):
                if rng.random() >= p:
                    continue
                current = sorted(sets[step])
                unused = [b for b in range(self.blocks) if b not in sets[step]]
                total = sum(len(s) for s in sets)
                action = rng.integers(3)  # 0: replace one skipped block, 1: add one, 2: drop one
                if action == 0 and current and unused:
                    sets[step].discard(current[int(rng.integers(len(current)))])
                    sets[step].add(unused[int(rng.integers(len(unused)))])
                elif (action == 1 or not current) and unused and total < limit:
                    sets[step].add(unused[int(rng.integers(len(unused)))])
                elif current:
                    sets[step].discard(current[int(rng.integers(len(current)))])
        rho = c.rho
        if rho is not None:
            genes = list(rho)
            for g in range(len(genes)):
                if rng.random() < p:
                    others = [j for j in range(len(self.rho_grid)) if j != genes[g]]
                    genes[g] = others[int(rng.integers(len(others)))]
            rho = tuple(genes)
        skipped = self._bounded(tuple(tuple(sorted(s)) for s in sets), rng, limit)
        return tuple(levels), skipped, rho

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator, ratio: float) -> Candidate:
        """Uniform crossover: each gene from either parent; ``K`` distinct time steps, always."""
        levels = list(a.levels)
        if self.search_steps:
            picks = [a.levels[i] if rng.random() < 0.5 else b.levels[i] for i in range(self.steps)]
            chosen: list[int] = []
            for i, pick in enumerate(picks):
                if pick in chosen:  # both parents' picks collide: take the other parent's gene, else a free one
                    other = b.levels[i] if pick == a.levels[i] else a.levels[i]
                    pick = other
                    if pick in chosen:
                        free = [j for j in range(len(self.grid)) if j not in chosen and j not in picks
                                and not (self.fixed_first and j == 0)]
                        pick = free[int(rng.integers(len(free)))]
                chosen.append(pick)
            levels = sorted(chosen)
        skipped = tuple(a.skipped[i] if rng.random() < 0.5 else b.skipped[i] for i in range(self.steps))
        skipped = self._bounded(skipped, rng, self.max_skipped(ratio))
        rho = None
        if a.rho is not None and b.rho is not None:
            rho = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.rho, b.rho))
        return Candidate(tuple(levels), skipped, rho)

    def _bounded(self, skipped: tuple[tuple[int, ...], ...], rng: np.random.Generator,
                 limit: int) -> tuple[tuple[int, ...], ...]:
        """Drop random skipped block-steps until at most ``limit`` remain."""
        cells = [(step, block) for step, ids in enumerate(skipped) for block in ids]
        if len(cells) <= limit:
            return skipped
        keep = {cells[int(i)] for i in rng.choice(len(cells), size=limit, replace=False)} if limit else set()
        return tuple(tuple(b for b in ids if (step, b) in keep) for step, ids in enumerate(skipped))


def make_space(family: str, steps: int, blocks: int, space: Sequence[str], *,
               default_levels: Sequence[float], max_skip_ratio: float = 0.1,
               grid_size: int = GRID_SIZE, rho_per_step: bool = False) -> SearchSpace:
    """The space for a sampler family at ``steps`` steps: a dense grid of the family's levels merged
    with its default schedule (``default_levels``, ending at 0)."""
    from graphopt.models.samplers import edm_sigmas, flow_times

    if family not in ("edm", "flow"):
        raise ValueError(f"unknown sampler family {family!r}; expected edm or flow")
    unknown = sorted(set(space) - set(SPACES))
    if unknown:
        raise ValueError(f"unknown search space part(s) {', '.join(unknown)}; choose from {', '.join(SPACES)}")
    dense = edm_sigmas(grid_size) if family == "edm" else flow_times(grid_size)
    values = sorted({round(float(v), 12) for v in (*dense[:-1], *default_levels[:-1])}, reverse=True)
    index = {v: i for i, v in enumerate(values)}
    default = tuple(index[round(float(v), 12)] for v in default_levels[:-1])
    return SearchSpace(steps=steps, grid=tuple(values), default=default, blocks=blocks,
                       search_steps="steps" in space, search_skips="skips" in space and blocks > 0,
                       search_rho="skip-scale" in space, fixed_first=family == "flow",
                       max_skip_ratio=max_skip_ratio, rho_per_step=rho_per_step)
