"""The launch configs lowering's call sites choose from, and the cost model that orders them.

Each family (generated pointwise and norm kernels) lists its candidates with the heuristic default
first; :data:`ATEN`, the eager ATen ops a kernel replaces, is a candidate of every call site and is
always timed, so a tuned site is never slower than eager as timed (an untuned site runs its family's
default, checked but not timed). :func:`prune_blocks` orders a family's configs for a shape
(blocks that fit the work first, split rows for few long rows) before the tuner times them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .cache import Config

ATEN = {"ATEN": 1}
"""The candidate config that runs the eager ATen ops a kernel replaces. Every call site can fall back on
them, and tuning times them even when a budget cuts the other candidates short, so after tuning a
kernel is used only where it measured faster. Untuned, a site runs its default without timing."""


def is_aten(config: Mapping[str, int]) -> bool:
    return config.get("ATEN", 0) == 1


def aten_first(configs: Sequence[Config]) -> list[Config]:
    """``configs`` with :data:`ATEN` moved to the front, the rest in their order: the untuned default of a
    site with nothing to fuse (its kernel would move the same bytes as the eager ops)."""
    return [c for c in configs if is_aten(c)] + [c for c in configs if not is_aten(c)]


def pointwise_configs() -> list[dict[str, int]]:
    """Elements per program and warps for a generated pointwise kernel; the first is the default."""
    return [
        {"XBLOCK": 1024, "num_warps": 4, "num_stages": 1},
        {"XBLOCK": 512, "num_warps": 4, "num_stages": 1},
        {"XBLOCK": 2048, "num_warps": 8, "num_stages": 1},
        {"XBLOCK": 256, "num_warps": 2, "num_stages": 1},
        {"XBLOCK": 4096, "num_warps": 8, "num_stages": 1},
        {"XBLOCK": 128, "num_warps": 1, "num_stages": 1},
        ATEN,
    ]


def norm_configs() -> list[dict[str, int]]:
    """Row elements per loop step and warps for a generated norm kernel."""
    return [
        {"RBLOCK": 1024, "num_warps": 4, "num_stages": 1},
        {"RBLOCK": 256, "num_warps": 2, "num_stages": 1},
        {"RBLOCK": 512, "num_warps": 4, "num_stages": 1},
        {"RBLOCK": 2048, "num_warps": 8, "num_stages": 1},
        {"RBLOCK": 4096, "num_warps": 8, "num_stages": 1},
        {"RBLOCK": 128, "num_warps": 1, "num_stages": 1},
        {"RBLOCK": 1024, "num_warps": 8, "num_stages": 1},
        # few long rows (GroupNorm at batch 1: B x 32 rows of thousands): RSPLIT programs per row
        {"RBLOCK": 1024, "RSPLIT": 8, "num_warps": 4, "num_stages": 1},
        {"RBLOCK": 512, "RSPLIT": 16, "num_warps": 4, "num_stages": 1},
        {"RBLOCK": 1024, "RSPLIT": 4, "num_warps": 4, "num_stages": 1},
        {"RBLOCK": 256, "RSPLIT": 32, "num_warps": 2, "num_stages": 1},
        ATEN,
    ]


FEW_ROWS, LONG_ROW = 256, 2048
"""A norm with fewer rows than this (one program each cannot fill a GPU) and rows at least this long
(worth splitting) tries RSPLIT programs per row first, then one; otherwise the split form is not timed."""


def prune_blocks(key: str) -> Callable[[Sequence[Config], tuple[int, ...]], list[Config]]:
    """Cost model: a block much larger than the work only masks lanes off; try the best-fitting first."""

    def prune(configs: Sequence[Config], shape: tuple[int, ...]) -> list[Config]:
        split = len(shape) == 2 and shape[0] < FEW_ROWS and shape[1] >= LONG_ROW
        # few long rows: both forms are timed, the split one first; otherwise the split form is not
        blocks = [c for c in configs if key in c and (split or c.get("RSPLIT", 1) == 1)]

        def fit(c: Config) -> int:  # the work one program loops over: a row, its chunk, or all elements
            work = -(-shape[-1] // c.get("RSPLIT", 1))
            return max(128, 1 << max(work - 1, 0).bit_length())

        kept = [c for c in blocks if c[key] <= fit(c)] or [min(blocks, key=lambda c: c[key])]
        # one step over the whole row (or one program for tiny tensors) first: the best untuned guess
        cap = 1024 if key == "XBLOCK" else 4096
        kept.sort(key=lambda c: (split and c.get("RSPLIT", 1) == 1, abs(math.log2(c[key]) - math.log2(min(fit(c), cap)))))
        return kept + [c for c in configs if key not in c]

    return prune
