"""The passes graphopt ships, registered by name (installed as ``graphopt.passes``).

The registry is a read-only mapping built once from the pass objects; a caller who wants a pass of
their own passes the :class:`graphopt.pipeline.Pass` (exact) or :class:`graphopt.approx.ApproxPass`
(approximate) object itself wherever a name is accepted.
"""

from __future__ import annotations

import difflib
from types import MappingProxyType
from typing import Iterable, Mapping

from graphopt.errors import UnknownPassError
from graphopt.approx import ApproxPass
from graphopt.pipeline import Pass

from .atconv import ATCONV
from .dce import DCE
from .fold import FOLD
from .linear_attention import LINEAR_ATTENTION
from .noop import NOOP
from .skip_scale import SKIP_SCALE
from .skip_tune import SKIP_TUNE

REGISTRY: Mapping[str, Pass | ApproxPass] = MappingProxyType(
    {p.name: p for p in (NOOP, FOLD, DCE, SKIP_SCALE, SKIP_TUNE, LINEAR_ATTENTION, ATCONV)})

# The exact pipeline, in the order each pass's docstring argues for.
DEFAULT_PIPELINE: tuple[str, ...] = ("noop", "fold", "dce")


def get(name: str) -> Pass | ApproxPass:
    """The registered pass called ``name``; an unknown name raises UnknownPassError with suggestions."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPassError(f"unknown pass '{name}'{hint}; available: {', '.join(REGISTRY)}") from None


def resolve(passes: Iterable[str | Pass | ApproxPass] | None) -> tuple[Pass | ApproxPass, ...]:
    """Names or pass objects -> pass objects; None means :data:`DEFAULT_PIPELINE`."""
    if passes is None:
        passes = DEFAULT_PIPELINE
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
    return tuple(p if isinstance(p, (Pass, ApproxPass)) else get(p.strip()) for p in passes)


def describe() -> list[tuple[str, bool, str]]:
    """(name, exact, first docstring line) for every registered pass."""
    return [(p.name, p.exact, (p.doc.strip().splitlines() or [""])[0]) for p in REGISTRY.values()]
