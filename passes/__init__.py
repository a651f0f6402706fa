"""The passes graphopt ships, registered by name (installed as ``graphopt.passes``).

The registry is a read-only mapping built once from the pass objects; a caller who wants a pass of
their own passes the :class:`graphopt.pipeline.Pass` (exact) or :class:`graphopt.approx.ApproxPass`
(approximate) object itself wherever a name is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from graphopt.errors import UnknownPassError, UsageError
from graphopt.approx import ApproxPass
from graphopt.pipeline import Pass

from .atconv import ATCONV, ATConvOptions, atconv_pass
from .batch_branches import BATCH_BRANCHES
from .cse import CSE
from .dce import DCE
from .fold import FOLD
from .linear_attention import LINEAR_ATTENTION, LinearAttentionOptions, linear_attention_pass
from .merge_linears import MERGE_LINEARS
from .noop import NOOP
from .skip_scale import SKIP_SCALE
from .skip_tune import SKIP_TUNE
from .subnet import SUBNET, SubnetOptions, subnet_pass

REGISTRY: Mapping[str, Pass | ApproxPass] = MappingProxyType(
    {p.name: p for p in (NOOP, FOLD, CSE, MERGE_LINEARS, BATCH_BRANCHES, DCE, SKIP_SCALE, SKIP_TUNE, LINEAR_ATTENTION, ATCONV,
                         SUBNET)})

# The exact pipeline, in the order each pass's docstring argues for.
DEFAULT_PIPELINE: tuple[str, ...] = ("noop", "fold", "cse", "merge-linears", "batch-branches", "dce")


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


# Passes with options: their options dataclass and the factory that builds the pass from it.
CONFIGURABLE: Mapping[str, tuple[type, Callable[[Any], Pass | ApproxPass]]] = MappingProxyType({
    "linear-attention": (LinearAttentionOptions, linear_attention_pass),
    "atconv": (ATConvOptions, atconv_pass),
    "subnet": (SubnetOptions, subnet_pass),
})


def options_of(name: str) -> list[tuple[str, str, Any]]:
    """(option, type, default) of a configurable pass; [] for a pass without options."""
    if name not in CONFIGURABLE:
        return []
    cls = CONFIGURABLE[name][0]
    hints = typing.get_type_hints(cls)
    return [(f.name, _type_name(hints[f.name]), f.default) for f in dataclasses.fields(cls)]


def configure(name: str, settings: Mapping[str, str]) -> Pass | ApproxPass:
    """The pass ``name`` with options given as text (``{"heads": "2", "cross": "true"}``), each parsed
    by its option's type; an unknown option or a value of the wrong type is a UsageError."""
    get(name)
    if name not in CONFIGURABLE:
        raise UsageError(f"pass '{name}' takes no options (passes with options: {', '.join(CONFIGURABLE)})")
    cls, factory = CONFIGURABLE[name]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, text in settings.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"pass '{name}' has no option '{key}'{hint}; its options: {', '.join(known)}")
        values[key] = _parse(name, key, text, hints[key])
    return factory(cls(**values))


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return getattr(base, "__name__", str(base)) + (" or none" if type(None) in typing.get_args(hint) else "")


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse(name: str, key: str, text: str, hint: Any) -> Any:
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    value = text.strip().lower()
    if optional and value in ("none", ""):
        return None
    if base is bool and value in _BOOLS:
        return _BOOLS[value]
    if base in (int, float):
        try:
            return base(value)
        except ValueError:
            pass
    elif base is not bool:
        return text
    wanted = "true or false" if base is bool else f"a number ({_type_name(hint)})"
    raise UsageError(f"option {name}.{key} takes {wanted}, got {text!r}")
