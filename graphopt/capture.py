"""Capture: turn an nn.Module and example inputs into an ATen-level FX graph with a dynamic batch.

The model is wrapped so that torch.export (non-strict: the model's Python runs as written) sees a
flat tuple of tensors in and out; :mod:`graphopt.structure` remembers how to rebuild the caller's
arguments and the model's outputs (tuples, dicts, dataclasses) around it. The batch dimension of
every input whose leading size equals the batch is marked ``Dim.AUTO``: torch.export keeps it
symbolic over the range it can prove and specialises it otherwise. That range starts at 2, since
torch.export traces as if sizes 0 and 1 were special; batch 1 (what a sampler runs for a single
image) is added when the graph reproduces the model at batch 1, and left out when the model treats
it differently (a squeeze of the batch dim, a branch on ``shape[0] == 1``). Every node then carries ``val``
(a fake tensor with shape and dtype, the batch as a symbol) and ``graphopt_module``, the dotted path
of the module whose forward produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import linecache
import math
import os
import time
import traceback
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.export import Dim

from . import structure
from .errors import CaptureError, InputError, SignatureError, UsageError, first_line
from .logs import quiet
from .structure import Spec

_WRAPPED = "model"  # attribute name of the user's model inside the flat wrapper


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """How a call ``model(*args, **kwargs)`` maps to the graph's flat tensor inputs and back.

    ``params`` are the forward signature's (name, kind) pairs, ``defaults`` its default values,
    ``in_spec`` the structure of the bound arguments (a dict keyed by parameter name) with tensors
    numbered in graph-input order, ``out_spec`` the structure of the outputs.
    """

    params: tuple[tuple[str, str], ...]
    defaults: dict[str, Any]
    in_spec: Spec
    out_spec: Spec
    objects: tuple[Any, ...] = ()
    extras: tuple[str, ...] = ()
    """Names of the flat inputs passes added after the model's own (``skip_scales``). The optimized
    module takes them as keyword arguments; an omitted one gets its example value."""

    def signature(self) -> inspect.Signature:
        return inspect.Signature([
            inspect.Parameter(name, getattr(inspect.Parameter, kind),
                              default=self.defaults.get(name, inspect.Parameter.empty))
            for name, kind in self.params
        ])

    def flatten_call(self, args: tuple, kwargs: dict) -> tuple[Spec, list[torch.Tensor], list[Any]]:
        """Bind a call to the signature and flatten it; a call that does not bind raises SignatureError."""
        try:
            bound = self.signature().bind(*args, **kwargs)
        except TypeError as e:
            raise SignatureError(f"call does not match forward{self.signature()}: {e}") from None
        bound.apply_defaults()
        return structure.flatten(dict(bound.arguments))

    def rebuild_call(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[tuple, dict]:
        """The positional and keyword arguments that ``in_spec`` describes, with ``tensors`` filled in."""
        values = structure.unflatten(self.in_spec, tensors, self.objects)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for name, kind in self.params:
            value = values[name]
            if kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"):
                args.append(value)
            elif kind == "VAR_POSITIONAL":
                args.extend(value)
            elif kind == "KEYWORD_ONLY":
                kwargs[name] = value
            else:
                kwargs.update(value)
        return tuple(args), kwargs

    def rebuild_output(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Any:
        return structure.unflatten(self.out_spec, tensors)

    def input_names(self) -> list[str]:
        """A readable name per flat tensor input: the parameter name, with a path for nested ones,
        then the extras' names."""
        return _leaf_names(self.in_spec, "", top=True) + list(self.extras)

    def output_names(self) -> list[str]:
        """``out`` for a single tensor, field or key names for dicts and dataclasses, ``out_i`` for tuples."""
        if self.out_spec["kind"] in ("dict", "dataclass", "namedtuple"):
            return _leaf_names(self.out_spec, "", top=True)
        return _leaf_names(self.out_spec, "out", top=False)


def _leaf_names(spec: Spec, prefix: str, top: bool) -> list[str]:
    kind = spec["kind"]
    if kind == "tensor":
        return [prefix or "input"]
    if kind not in ("tuple", "list", "dict", "dataclass", "namedtuple"):
        return []
    keys = spec.get("keys") or spec.get("fields") or list(range(len(spec["items"])))
    names: list[str] = []
    for key, child in zip(keys, spec["items"]):
        name = str(key) if top else f"{prefix}_{key}" if prefix else str(key)
        names.extend(_leaf_names(child, name, top=False))
    return names


@dataclasses.dataclass(frozen=True)
class TensorGuard:
    """What one flat input must look like: dtype, device type, and per dim a size or a symbol."""

    dtype: str
    device: str
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class InputGuards:
    """The inputs a captured graph is valid for. ``ranges`` maps each symbol to (min, max or None)."""

    tensors: tuple[TensorGuard, ...]
    ranges: dict[str, tuple[int, int | None]]

    def mismatch(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
                 names: Sequence[str] | None = None) -> str | None:
        """Why ``tensors`` fall outside these guards, or None when the graph is valid for them.

        ``names`` (one per tensor, e.g. :meth:`CallSpec.input_names`) name the caller's inputs in the
        reason; the reason says what the input is and what was expected."""
        if len(tensors) != len(self.tensors):
            return f"expected {len(self.tensors)} tensor inputs, got {len(tensors)}"
        label = list(names) if names is not None and len(names) == len(tensors) else \
            [f"input {i}" for i in range(len(tensors))]
        bound: dict[str, tuple[int, str]] = {}
        for i, (t, g) in enumerate(zip(tensors, self.tensors)):
            if str(t.dtype).removeprefix("torch.") != g.dtype:
                return f"{label[i]} has dtype {str(t.dtype).removeprefix('torch.')}, expected {g.dtype}"
            if t.device.type != g.device:
                return f"{label[i]} is on {t.device.type}, expected on {g.device}"
            if t.dim() != len(g.shape):
                return (f"{label[i]} has {t.dim()} dims {tuple(t.shape)}, expected {len(g.shape)} "
                        f"({self.describe(i)})")
            for d, (size, want) in enumerate(zip(t.shape, g.shape)):
                if isinstance(want, int):
                    if size != want:
                        return f"{label[i]} dim {d} is {size}, expected {want} ({self.describe(i)})"
                    continue
                seen, where = bound.setdefault(want, (size, f"{label[i]} dim {d}"))
                if seen != size:
                    return f"{label[i]} dim {d} is {size} but {where} is {seen}: they must match"
                lo, hi = self.ranges.get(want, (0, None))
                if size < lo or (hi is not None and size > hi):
                    top = "inf" if hi is None else hi
                    return f"{label[i]} dim {d} is {size}, outside the captured range [{lo}, {top}]"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"tensors": [[g.dtype, g.device, list(g.shape)] for g in self.tensors],
                "ranges": {name: list(r) for name, r in self.ranges.items()}}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "InputGuards":
        tensors = tuple(TensorGuard(str(dtype), str(device), tuple(s if isinstance(s, str) else int(s) for s in shape))
                        for dtype, device, shape in data["tensors"])
        ranges = {str(name): (int(lo), None if hi is None else int(hi)) for name, (lo, hi) in data["ranges"].items()}
        return InputGuards(tensors, ranges)

    def on(self, device: str) -> "InputGuards":
        """These guards for inputs on ``device`` (a device type): a graph captured on one device and
        moved to another (:func:`graphopt.fxgraph.move_to`) takes its inputs there."""
        return dataclasses.replace(self, tensors=tuple(dataclasses.replace(g, device=device) for g in self.tensors))

    def same_as(self, other: "InputGuards") -> bool:
        """Whether both admit the same inputs: equal up to the names of their symbols."""
        return self._renamed() == other._renamed()

    def _renamed(self) -> tuple:
        names: dict[str, str] = {}
        tensors = tuple((g.dtype, g.device, tuple(names.setdefault(s, f"s{len(names)}") if isinstance(s, str) else s
                                                  for s in g.shape)) for g in self.tensors)
        return tensors, sorted((names.get(k, k), r) for k, r in self.ranges.items() if k in names)

    def describe(self, i: int) -> str:
        """Input ``i``'s expected shape, symbols shown as their range (``[1, inf]x4x32x32``)."""
        parts = []
        for s in self.tensors[i].shape:
            if isinstance(s, int):
                parts.append(str(s))
            else:
                lo, hi = self.ranges.get(s, (0, None))
                parts.append(f"[{lo}, {'inf' if hi is None else hi}]")
        return "shape " + "x".join(parts) if parts else "a scalar"

    def batch_symbol(self) -> str | None:
        """The symbol of the first input whose leading dim is symbolic (the dynamic batch), else None."""
        return next((g.shape[0] for g in self.tensors if g.shape and isinstance(g.shape[0], str)), None)

    def with_batch_from(self, lo: int, symbols: Iterable[str] = ()) -> "InputGuards":
        """These guards with the batch range, and that of each of ``symbols`` (other inputs' batch
        symbols), starting at ``lo`` (unchanged without a symbolic batch)."""
        symbol = self.batch_symbol()
        if symbol is None:
            return self
        ranges = dict(self.ranges)
        for name in {symbol, *symbols}:
            ranges[name] = (lo, ranges.get(name, (0, None))[1])
        return dataclasses.replace(self, ranges=ranges)

    def batch_range(self) -> tuple[int, int | None] | None:
        """The range of the first input's leading dim when it is symbolic, else None."""
        for g in self.tensors:
            if g.shape:
                return self.ranges.get(g.shape[0]) if isinstance(g.shape[0], str) else None
        return None


@dataclasses.dataclass(frozen=True)
class CapturedGraph:
    """A captured model: the graph, how to call it, what it is valid for, and the eager reference.

    ``example_inputs`` are the flat tensors the graph was captured (and is verified) with and
    ``reference_outputs`` the original model's flat outputs on them.
    """

    graph_module: torch.fx.GraphModule
    call: CallSpec
    guards: InputGuards
    example_inputs: tuple[torch.Tensor, ...]
    reference_outputs: tuple[torch.Tensor, ...]
    capture_time_s: float
    dynamic_batch: bool

    def run(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run the graph on flat tensor inputs; returns flat outputs."""
        return tuple(self.graph_module(*tensors))

    @property
    def model_inputs(self) -> int:
        """How many flat inputs come from the model's own arguments (the rest are extras)."""
        return len(self.example_inputs) - len(self.call.extras)

    def flatten_call(self, args: tuple, kwargs: dict) -> tuple[Spec, list[torch.Tensor], list[Any]]:
        """Bind ``model(*args, **kwargs)``: the model's flat tensors, then each extra input, taken from
        ``kwargs`` by name or else its example value."""
        extras = {name: kwargs[name] for name in self.call.extras if name in kwargs}
        if extras:
            kwargs = {k: v for k, v in kwargs.items() if k not in extras}
        spec, tensors, objects = self.call.flatten_call(args, kwargs)
        for name, example in zip(self.call.extras, self.example_inputs[self.model_inputs:]):
            value = extras.get(name, example)
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value, dtype=example.dtype, device=example.device)
            tensors.append(value)
        return spec, tensors, objects

    def batch_symbol(self) -> str | None:
        return self.guards.batch_symbol()

    def batch_symbols(self) -> frozenset[str]:
        """The batch symbol and any other input's batch symbol
        (:func:`graphopt.analysis.graph.batch_symbols`); empty without a symbolic batch."""
        from .analysis.graph import batch_symbols

        return batch_symbols(self.graph_module, self.batch_symbol()) if self.batch_symbol() else frozenset()


class _FlatCall(nn.Module):
    """The user's model seen through flat tensors: what torch.export traces."""

    def __init__(self, model: nn.Module, call: CallSpec):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self._call = call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self._call.rebuild_call(tensors)
        out = getattr(self, _WRAPPED)(*args, **kwargs)
        _, leaves, _ = structure.flatten(out)
        return tuple(leaves)


def capture(model: nn.Module, args: Any = (), kwargs: dict[str, Any] | None = None,
            dynamic_batch: bool = True) -> CapturedGraph:
    """Capture ``model(*args, **kwargs)`` as an ATen FX graph (torch.export, non-strict).

    With ``dynamic_batch`` the leading dim of every input that shares the first input's batch size is
    symbolic over the range torch.export proves, and batch 1 too when the graph reproduces the model
    there (an example batch of 1 is tiled to 2 for the capture, since torch.export specialises sizes
    0 and 1). Raises :class:`InputError` when the model fails on
    the example inputs eagerly, :class:`CaptureError` (with module path, source line and hint) when
    torch.export fails.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    args = args if isinstance(args, tuple) else (tuple(args) if isinstance(args, list) else (args,))
    kwargs = dict(kwargs or {})
    if model.training:
        warnings.warn("capturing a model in training mode: dropout and batch-norm keep their training "
                      "behaviour; call model.eval() first for inference", stacklevel=2)
    sig = inspect.signature(model.forward)
    params = tuple((p.name, p.kind.name) for p in sig.parameters.values())
    defaults = {p.name: p.default for p in sig.parameters.values() if p.default is not inspect.Parameter.empty}
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise SignatureError(f"example inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
    bound.apply_defaults()
    in_spec, in_tensors, objects = structure.flatten(dict(bound.arguments))
    if not in_tensors:
        raise InputError("the example inputs hold no tensor; graphopt needs at least one tensor input")

    batch = _batch_size(in_tensors) if dynamic_batch else None
    if batch == 1:
        in_tensors = [torch.cat([t, t]) if _is_batched(t, 1) else t for t in in_tensors]
        batch = 2
    call = CallSpec(params, defaults, in_spec, {"kind": "tuple", "items": []}, tuple(objects))
    with kept_state(model):  # a training-mode batch norm would update its statistics
        reference = _run_eager(model, call, in_tensors)
    out_spec, ref_tensors, out_objects = structure.flatten(reference)
    if out_objects:
        raise InputError(f"the model returns {structure.describe(out_spec)}: graphopt can rebuild tensors, "
                         "containers, dataclasses and plain constants, not arbitrary objects")
    if not ref_tensors:
        raise InputError("the model returns no tensor")
    call = dataclasses.replace(call, out_spec=out_spec)

    start = time.perf_counter()
    with kept_state(model):
        ep = _export(model, call, in_tensors, batch)
    gm = ep.module()
    _annotate_modules(gm)
    guards = _guards(gm, ep)
    guards = _with_batch_one(model, call, gm, guards, in_tensors, batch)
    return CapturedGraph(gm, call, guards, tuple(in_tensors), tuple(t.detach() for t in ref_tensors),
                         time.perf_counter() - start, dynamic_batch=batch is not None)


def _with_batch_one(model: nn.Module, call: CallSpec, gm: torch.fx.GraphModule, guards: InputGuards,
                    tensors: list[torch.Tensor], batch: int | None) -> InputGuards:
    """``guards`` with the batch range starting at 1 when the graph matches the model at batch 1.

    torch.export traces a symbolic size as if it were neither 0 nor 1, so the graph's range starts
    at 2; a model that treats batch 1 alike gives the same outputs there, one that does not (a
    squeeze, a branch on the size) shows it in shape or value, and keeps the range from 2."""
    rng = guards.ranges.get(guards.batch_symbol() or "")
    if batch is None or rng is None or rng[0] != 2 or not batch_one_matches(model, call, gm, tensors):
        return guards
    from .analysis.graph import batch_symbols  # batch_one_matches sliced every input of the batch's size

    return guards.with_batch_from(1, batch_symbols(gm, guards.batch_symbol()))


def without_batch_one(captured: CapturedGraph) -> CapturedGraph:
    """``captured`` with its batch range starting at 2 (a pass made the graph differ at batch 1)."""
    if captured.guards.ranges.get(captured.guards.batch_symbol() or "", (0, None))[0] != 1:
        return captured
    return dataclasses.replace(captured, guards=captured.guards.with_batch_from(2, captured.batch_symbols()))


def batch_one_matches(model: nn.Module, call: CallSpec, gm: torch.fx.GraphModule,
                      tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> bool:
    """Whether ``gm`` gives the model's outputs (shapes, dtypes, values) on the batch-1 slice of ``tensors``
    (flat inputs at a batch of 2 or more; inputs of another leading size are passed whole)."""
    from .verify import compare

    n = len(tensors) - len(call.extras)  # the extras passes added (skip scales) are not batched
    batch = _batch_size(list(tensors[:n]))
    one = [t[:1] if i < n and _is_batched(t, batch) else t for i, t in enumerate(tensors)]
    args, kwargs = call.rebuild_call(one[:n])
    try:
        with kept_state(model), torch.no_grad():
            _, expected, _ = structure.flatten(model(*args, **kwargs))
            got = list(gm(*one))
    except Exception:  # the model or the graph cannot run at batch 1
        return False
    return all(a.dtype == b.dtype for a, b in zip(got, expected)) and compare(got, expected).within


def retrace(captured: CapturedGraph, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> CapturedGraph:
    """Trace ``captured``'s graph again for exactly the shapes of ``tensors`` (flat inputs, extras
    included): a static variant of the same computation, whatever passes made it. The original
    model is not needed and no pass runs again; the reference outputs are the graph's own."""
    from .fxgraph import copy_sharing_weights, drop_guards

    tensors = tuple(tensors)
    start = time.perf_counter()
    try:
        # a graph that does not hold at these shapes fails inside tracing, where torch logs the
        # failure as an error of its own before raising it; the CaptureError below says it once
        with warnings.catch_warnings(), quiet(), quiet("torch._subclasses.fake_tensor", level=logging.CRITICAL), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            gm = copy_sharing_weights(captured.graph_module)
            drop_guards(gm)
            ep = torch.export.export(gm, tensors, strict=False)
            with torch.no_grad():
                outputs = tuple(t.detach() for t in gm(*tensors))
    except Exception as e:
        raise CaptureError(f"could not trace the optimized graph for these inputs ({type(e).__name__}: "
                           f"{first_line(e)})") from e
    traced = ep.module()
    _annotate_modules(traced)
    return CapturedGraph(traced, captured.call, _guards(traced, ep), tensors, outputs,
                         time.perf_counter() - start, dynamic_batch=False)


@contextlib.contextmanager
def kept_state(model: nn.Module, *, eval_mode: bool = False) -> Iterator[None]:
    """Run ``model`` without leaving a trace on it: its buffers (batch-norm statistics and counters)
    and every module's training flag are restored on exit. ``eval_mode`` runs it as in ``eval()``."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    if eval_mode:
        for m, _ in flags:
            m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def training_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` in training mode whose outputs depend on it (dropout, batch statistics),
    or the model itself when it is in training mode and holds none of those; ``[]`` in eval mode."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    named = [name or type(model).__name__ for name, m in model.named_modules() if m.training and isinstance(m, kinds)]
    if named or not any(m.training for m in model.modules()):
        return named
    return [type(model).__name__]


def _batch_size(tensors: list[torch.Tensor]) -> int | None:
    for t in tensors:
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _is_batched(t: torch.Tensor, batch: int | None) -> bool:
    return batch is not None and t.dim() >= 1 and int(t.shape[0]) == batch


def _run_eager(model: nn.Module, call: CallSpec, tensors: list[torch.Tensor]) -> Any:
    args, kwargs = call.rebuild_call(tensors)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:  # the model's own error on the user's inputs
        module_path, source = _locate(e, model)
        where = (f" in module '{module_path}'" if module_path else "") + (f" at {source}" if source else "")
        raise InputError(f"the model raised {type(e).__name__} on the example inputs{where}: "
                         f"{first_line(e)}") from e


def _export(model: nn.Module, call: CallSpec, tensors: list[torch.Tensor], batch: int | None):
    """torch.export with the batch dims AUTO; on failure retry static, then raise CaptureError."""
    flat = _FlatCall(model, call)
    attempts: list[Any] = [Dim.AUTO, None] if batch is not None else [None]
    for dim in attempts:
        dims = tuple({0: dim} if dim is not None and _is_batched(t, batch) else None for t in tensors)
        try:
            # torch.export prints the partial graph of a failed trace to stderr; the CaptureError
            # below says what the user needs, so that dump is dropped.
            with warnings.catch_warnings(), quiet(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                return torch.export.export(flat, tuple(tensors), dynamic_shapes=(dims,), strict=False)
        except Exception as e:  # torch.export raises many types; all become one clear error
            last = e
    module_path, source = _locate(last, model)
    raise CaptureError(f"torch.export could not capture the model ({type(last).__name__}: {first_line(last)})",
                       module_path=module_path, source=source, hint=_hint(last)) from last


_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("data-dependent", "datadependent", "guardondatadependent", "item()", "unbacked", "non-nested symint"),
     "the model reads a tensor's value in Python (.item(), int(t), `if t:`, a loop over t); keep it a "
     "tensor with torch.where / torch.cond, or pass the value as a Python number"),
    (("constraint", "specializ", "specialis"),
     "a batch-dependent size is fixed in the model (e.g. view(2, ...)); capture with dynamic_batch=False"),
    (("not supported", "unsupported", "no fake", "meta"),
     "an operator or Python feature cannot be traced; replace it with plain torch ops or register a "
     "torch.library custom op with a fake implementation"),
)


def _hint(e: BaseException) -> str:
    text = (type(e).__name__ + " " + str(e)).lower()
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return hint
    return "check that the model runs eagerly on the same inputs, then try dynamic_batch=False"


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, inspect) if m.__file__) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _locate(e: BaseException, model: nn.Module) -> tuple[str, str]:
    """The innermost submodule of ``model`` and the innermost user source line on ``e``'s traceback."""
    paths = {id(m): name for name, m in model.named_modules()}
    module_path, source = "", ""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in chain:
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in paths:
                module_path = paths[id(owner)] or type(model).__name__
            filename = frame.f_code.co_filename
            if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
                text = linecache.getline(filename, lineno).strip()
                source = f"{filename}:{lineno}" + (f" `{text}`" if text else "")
        if module_path or source:
            break
    return module_path, source


def _annotate_modules(gm: torch.fx.GraphModule) -> None:
    """Tag each node with the dotted path of the user module that produced it (``""``: the root)."""
    prefix = _WRAPPED + "."
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            path = list(stack.values())[-1][0]
            path = "" if path == _WRAPPED else path.removeprefix(prefix)
        if node.op == "get_attr":
            path = str(node.target).removeprefix(prefix).rpartition(".")[0]
        node.meta["graphopt_module"] = path


def _guards(gm: torch.fx.GraphModule, ep: torch.export.ExportedProgram) -> InputGuards:
    ranges: dict[str, tuple[int, int | None]] = {}
    for sym, vr in ep.range_constraints.items():
        lo, hi = int(vr.lower), vr.upper
        ranges[str(sym)] = (lo, None if not math.isfinite(float(hi)) or int(hi) > 2**62 else int(hi))
    tensors = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        shape = tuple(str(s.node.expr) if isinstance(s, torch.SymInt) else int(s) for s in val.shape)
        tensors.append(TensorGuard(str(val.dtype).removeprefix("torch."), val.device.type, shape))
    return InputGuards(tuple(tensors), ranges)
