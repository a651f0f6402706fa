"""A stored forward's launches bound to this process's compiled launchers, on its first call.

Where it belongs: between :mod:`.stored` and the caller, on a GPU. A stored forward (the
:class:`~.runtime.Portable` form of one the runtime wrote) launches every kernel through
``kernel[grid](...)``: nothing in it is bound to a process. Each such launch runs Triton's argument
binding, specialisation key and kernel-cache lookup (about 8 us per launch on this project's CPU, a
DiT-S/2 call has 27), where a forward the runtime writes calls each compiled launcher directly
(:class:`~.launches.LaunchBinder`). CUDA graphs replay either at the same cost; without them (and on
the first call of each layout) :func:`bind` gives a stored forward the runtime's launches:

1. the source is parsed, and each top-level statement ``kernel[(grid)](args..., NAME=value...)`` whose
   arguments are names (a value, a weight) and literals is read as a :class:`~.launches.KernelCall`;
2. the forward runs once with each such launch made as before and then recorded by a
   :class:`~.launches.LaunchBinder` (the kernels compile, or load from Triton's cache, as on any first
   call; recording launches nothing);
3. the source is written again with each bound statement calling its launcher, behind the device guard
   and stream read the runtime writes (:func:`~.runtime.launcher_guard`), and compiled;
4. that forward runs on the same inputs and is kept only if it gives the same outputs; otherwise the
   stored form stays, and a warning says why.

A statement the binder leaves unbound (another device, a launch hook installed, arguments it cannot
match) keeps its ``kernel[grid]`` line.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .launches import DirectLaunch, KernelCall, LaunchBinder, Ref, Streams
from .runtime import (GeneratedForward, Portable, _mismatch, aligned_inputs, compile_forward, direct_launch_line,
                      fresh_name, launcher_guard, literal)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """A launch statement of the source: its line (0-based), where ``kernel[grid]`` lies on it (in
    UTF-8 bytes, as :mod:`ast` counts columns), the kernel's name and the call it makes."""

    line: int
    start: int
    end: int
    kernel: str
    call: KernelCall


def launches_in(portable: Portable, tree: ast.Module | None = None) -> list[_Launch]:
    """The launch statements of ``portable``'s function that can be bound, in source order (``tree``:
    its source parsed, when the caller has it)."""
    fn = _function(portable, tree or ast.parse(portable.source))
    found = []
    for stmt in fn.body if fn is not None else ():
        call = _kernel_call(stmt, portable.namespace)
        if call is not None and stmt.lineno == stmt.end_lineno:
            func = stmt.value.func  # type: ignore[attr-defined]
            found.append(_Launch(stmt.lineno - 1, func.col_offset, func.end_col_offset, func.value.id, call))
    return found


def _kernel_call(stmt: ast.stmt, namespace: dict[str, Any]) -> KernelCall | None:
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
        return None
    func = stmt.value.func
    if not (isinstance(func, ast.Subscript) and isinstance(func.value, ast.Name)):
        return None
    kernel = namespace.get(func.value.id)
    if not (callable(getattr(kernel, "fn", None)) and hasattr(kernel, "run")):  # not a Triton kernel
        return None
    try:
        grid = ast.literal_eval(func.slice)
        args = tuple(Ref(a.id) if isinstance(a, ast.Name) else _value(a) for a in stmt.value.args)
        constexprs = tuple((k.arg, _value(k.value)) for k in stmt.value.keywords)
    except (ValueError, TypeError, SyntaxError):  # not a literal: leave the launch as it is
        return None
    if not (isinstance(grid, tuple) and all(type(g) is int for g in grid)) or any(k is None for k, _ in constexprs):
        return None
    return KernelCall(kernel, grid, args, constexprs)  # type: ignore[arg-type]


def _value(node: ast.expr) -> Any:
    """A literal argument, ``float('inf')`` as :func:`~.runtime.literal` writes it included."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and not node.keywords):
        return float(node.args[0].value)
    return ast.literal_eval(node)


def bind(portable: Portable, tensors: Sequence[torch.Tensor], streams: Streams, *,
         dump_dir: str | os.PathLike | None = None) -> tuple[tuple[torch.Tensor, ...] | None, GeneratedForward | None]:
    """Run ``portable``'s forward on ``tensors`` with its launches recorded, and write it again with them
    bound to the launchers Triton compiled (module docstring). Returns that run's outputs (``None`` when
    its guard refused ``tensors``) and the bound forward, or ``None`` when nothing could be bound or
    the bound forward does not reproduce those outputs (with a warning)."""
    tree = ast.parse(portable.source)
    launches = launches_in(portable, tree)
    if not launches:
        return portable.namespace[portable.name](*tensors), None
    lines = portable.source.splitlines()
    binder = LaunchBinder(streams)
    bound: dict[int, DirectLaunch | None] = {}
    recording, names = dict(portable.namespace), _Names(portable, tree)
    text = list(lines)
    for i, launch in enumerate(launches):
        hook = names.fresh(f"record_{launch.kernel}")
        recording[hook] = functools.partial(_record, binder, launch.call, bound, i)
        text[launch.line] = _splice(lines[launch.line], launch.start, launch.end, hook)
    exec(compile("\n".join(text) + "\n", f"<graphopt binding {portable.name}>", "exec"), recording)  # noqa: S102
    with torch.no_grad():
        outputs = recording[portable.name](*tensors)
    directs = {i: d for i, d in bound.items() if d is not None}
    if outputs is None or not directs:
        return outputs, None
    device = directs[min(directs)].device
    namespace, names = dict(portable.namespace), _Names(portable, tree)
    stream = names.fresh("stream")
    names.const(namespace, [d.compiled for d in directs.values()], "_compiled_kernels")  # kept loaded while bound
    text = list(lines)
    n_direct = 0
    for i, launch in enumerate(launches):
        direct = directs.get(i)
        if direct is None or direct.device != device:
            continue
        n_direct += 1
        launcher = names.const(namespace, direct.launcher, f"{launch.kernel}_launcher")
        metadata = names.const(namespace, direct.metadata, f"{launch.kernel}_metadata")
        args = [a.name if isinstance(a, Ref) else names.expr(namespace, a) for a in direct.args]
        indent = re.match(r"\s*", lines[launch.line]).group(0)  # type: ignore[union-attr]
        function = names.expr(namespace, direct.function)
        text[launch.line] = indent + direct_launch_line(launcher, direct.grid, stream, function, metadata, args,
                                                        launch.kernel)
    at, indent, params = _after_guard(portable, tree)
    guard = launcher_guard(names.const(namespace, streams.device, "current_device"),
                           names.const(namespace, streams.stream, "current_stream"), device, stream,
                           [params[i] for i in aligned_inputs(tensors) if i < len(params)])
    text[at:at] = [indent + line for line in guard]
    forward = compile_forward("\n".join(text) + "\n", namespace, portable.name, portable.layout, dump_dir,
                              len(launches), n_direct)
    why = _mismatch(forward, tensors, outputs)
    if why is not None:
        warnings.warn(f"graphopt: the stored {portable.name} with its launches bound to the compiled kernels {why}; "
                      "it keeps its kernel[grid] launches", RuntimeWarning, stacklevel=2)
        return outputs, None
    return outputs, forward


def _record(binder: LaunchBinder, call: KernelCall, bound: dict[int, DirectLaunch | None], i: int,
            *args: Any, **constexprs: Any) -> None:
    """Launch as the stored line does, then record the launch (:meth:`LaunchBinder.bind`)."""
    compiled = call.kernel[call.grid](*args, **constexprs)
    binder.bind(call, args, compiled)
    bound[i] = binder.launches[-1]


def _splice(line: str, start: int, end: int, text: str) -> str:
    raw = line.encode()
    return (raw[:start] + text.encode() + raw[end:]).decode()


def _function(portable: Portable, tree: ast.Module) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == portable.name), None)


def _after_guard(portable: Portable, tree: ast.Module) -> tuple[int, str, list[str]]:
    """Where the launcher guard goes (a line index: after the entry guard, else first in the body), the
    body's indentation and the function's parameters."""
    fn = _function(portable, tree)
    assert fn is not None  # it holds the launches found
    first = fn.body[0]
    line = portable.source.splitlines()[first.lineno - 1]
    indent = line[:len(line) - len(line.lstrip())]
    guard = (isinstance(first, ast.If) and len(first.body) == 1 and isinstance(first.body[0], ast.Return)
             and isinstance(first.body[0].value, ast.Constant) and first.body[0].value.value is None)
    at = first.end_lineno if guard else first.lineno - 1
    return at, indent, [a.arg for a in fn.args.args]  # type: ignore[return-value]


class _Names:
    """New module-level names for a forward's namespace, none of them a name its source or namespace uses."""

    def __init__(self, portable: Portable, tree: ast.Module):
        used = {n.id if isinstance(n, ast.Name) else n.arg for n in ast.walk(tree)
                if isinstance(n, (ast.Name, ast.arg))}
        self.taken = set(portable.namespace) | used | {portable.name}

    def fresh(self, hint: str) -> str:
        return fresh_name(hint, self.taken)

    def const(self, namespace: dict[str, Any], value: Any, hint: str) -> str:
        name = self.fresh(re.sub(r"\W+", "_", hint))
        namespace[name] = value
        return name

    def expr(self, namespace: dict[str, Any], value: Any) -> str:
        text = literal(value)
        return text if text is not None else self.const(namespace, value, type(value).__name__.lower())
