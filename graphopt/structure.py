"""Flatten call arguments and outputs to a list of tensors plus a JSON-able description, and back.

The exported graph only ever sees a flat tuple of tensors; everything else a model takes or returns
(tuples, lists, dicts, dataclasses, named tuples, None, numbers, strings, dtypes) lives in a *spec*:
a tree of plain dicts that survives ``json.dumps``. Leaves that have no JSON form (arbitrary Python
objects passed as arguments) are kept in a side list, ``objects``; such a structure works in memory
but cannot be saved.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch

Spec = dict[str, Any]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_type(path: str) -> type | None:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside its tuples, named tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if _is_namedtuple(value):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def flatten(value: Any) -> tuple[Spec, list[torch.Tensor], list[Any]]:
    """Split ``value`` into (spec, tensors, objects); :func:`unflatten` inverts it."""
    tensors: list[torch.Tensor] = []
    objects: list[Any] = []

    def walk(v: Any) -> Spec:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return {"kind": "tensor", "index": len(tensors) - 1}
        if v is None or isinstance(v, (bool, int, str)):
            return {"kind": "const", "value": v}
        if isinstance(v, float):
            if math.isfinite(v):
                return {"kind": "const", "value": v}
            return {"kind": "float", "value": repr(v)}
        if isinstance(v, torch.dtype):
            return {"kind": "dtype", "value": str(v).removeprefix("torch.")}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields = [f.name for f in dataclasses.fields(v) if f.init]
            return {"kind": "dataclass", "type": _qualname(type(v)), "fields": fields,
                    "items": [walk(getattr(v, f)) for f in fields]}
        if _is_namedtuple(v):
            return {"kind": "namedtuple", "type": _qualname(type(v)), "fields": list(v._fields),
                    "items": [walk(x) for x in v]}
        if isinstance(v, (tuple, list)):
            return {"kind": type(v).__name__ if type(v) in (tuple, list) else "list",
                    "items": [walk(x) for x in v]}
        if isinstance(v, dict) and all(isinstance(k, (str, int)) for k in v):
            return {"kind": "dict", "keys": list(v.keys()), "items": [walk(x) for x in v.values()]}
        objects.append(v)
        return {"kind": "object", "index": len(objects) - 1, "type": _qualname(type(v))}

    return walk(value), tensors, objects


def unflatten(spec: Spec, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
              objects: list[Any] | tuple[Any, ...] = ()) -> Any:
    """Rebuild the value :func:`flatten` described, with ``tensors`` in place of the originals.

    A dataclass or named tuple whose type cannot be imported (a structure loaded in a process that
    lacks the model's code) comes back as a dict of its fields.
    """
    kind = spec["kind"]
    if kind == "tensor":
        return tensors[spec["index"]]
    if kind == "const":
        return spec["value"]
    if kind == "float":
        return float(spec["value"])
    if kind == "dtype":
        return getattr(torch, spec["value"])
    if kind == "object":
        return objects[spec["index"]]
    items = [unflatten(s, tensors, objects) for s in spec.get("items", [])]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if kind == "dict":
        return dict(zip(spec["keys"], items))
    if kind in ("dataclass", "namedtuple"):
        cls = _import_type(spec["type"])
        values = dict(zip(spec["fields"], items))
        if cls is None:
            return values
        return cls(**values)
    raise ValueError(f"unknown structure kind {kind!r}")


def count_tensors(spec: Spec) -> int:
    """How many tensor leaves ``spec`` holds."""
    if spec["kind"] == "tensor":
        return 1
    return sum(count_tensors(s) for s in spec.get("items", []))


def has_objects(spec: Spec) -> bool:
    """True when ``spec`` has a leaf with no JSON form (it cannot be saved)."""
    if spec["kind"] == "object":
        return True
    return any(has_objects(s) for s in spec.get("items", []))


def describe(spec: Spec) -> str:
    """A short human form of a structure, e.g. ``(Tensor, {'eps': Tensor, 'aux': 3})``."""
    kind = spec["kind"]
    if kind == "tensor":
        return "Tensor"
    if kind in ("const", "float", "dtype"):
        return repr(unflatten(spec, []))
    if kind == "object":
        return f"<{spec['type']}>"
    inner = [describe(s) for s in spec["items"]]
    if kind == "tuple":
        return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
    if kind == "list":
        return "[" + ", ".join(inner) + "]"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(spec["keys"], inner)) + "}"
    name = spec["type"].rpartition(":")[2]
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in zip(spec["fields"], inner)) + ")"
