"""Emission: the optimized model as an nn.Module with the original call signature.

:func:`graphopt.optimize` (:mod:`graphopt.driver`) captures, runs the pass pipeline (verified after
each pass) and returns an :class:`OptimizedModule`; its report is :mod:`graphopt.report`'s, and a
target="cuda" module's variants are lowered and checked by :mod:`graphopt.lowering`. Calls bind to the original forward signature, are checked against what
the graph was captured for (dtypes, static sizes, the symbolic batch's range, non-tensor
arguments), and come back in the original output structure. A call outside the captured range is
re-captured for its shapes (counted in the report) when the original model is at hand; a loaded
module, which has no Python model, says so instead of guessing. Saving and loading live in
:mod:`graphopt.saved`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn
from torch.export import Dim

from . import structure
from .capture import CapturedGraph, _locate, batch_one_matches, capture, kept_state, retrace, without_batch_one
from .errors import CaptureError, InputError, UsageError, first_line
from .logs import quiet
from .pipeline import Pass, run_pipeline
from .report import OptimizationReport

@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What an optimized module keeps of its original model beyond the graph, saved with it.

    ``config`` is the original's ``config`` as JSON when it was a plain dict or a diffusers
    ``ConfigMixin`` config (``config_kind`` "dict" or "diffusers"); otherwise None and ``note`` says why.
    """

    class_name: str
    config_kind: str | None = None
    config: dict[str, Any] | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> "SourceInfo":
        kind = data.get("config_kind")
        config = data.get("config")
        if kind not in (None, "dict", "diffusers") or not (config is None or isinstance(config, dict)):
            raise ValueError(f"unknown config kind {kind!r}")
        return SourceInfo(str(data["class_name"]), kind, config, str(data.get("note", "")))

    def config_view(self) -> Any:
        """The config as the original exposed it: a dict, or a diffusers FrozenDict (attribute access too)."""
        if self.config is None:
            return None
        if self.config_kind == "dict":
            return copy.deepcopy(self.config)
        try:
            from diffusers.configuration_utils import FrozenDict
        except ImportError:
            return ConfigView(self.config)
        return FrozenDict(copy.deepcopy(self.config))


class ConfigView(dict):
    """A read-only dict with attribute access: a diffusers config read back where diffusers is not installed."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no {name!r}") from None

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the config of an optimized module is read-only")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore


def source_info(model: nn.Module) -> SourceInfo:
    """The :class:`SourceInfo` of ``model``: its class, and its config where it is a dict of JSON values."""
    import json

    name = type(model).__name__
    config = model.__dict__.get("_internal_dict")  # diffusers' ConfigMixin keeps its FrozenDict there
    kind = "diffusers"
    if config is None:
        try:
            config = getattr(model, "config", None)
        except Exception:  # a property that fails: the same as none to keep
            config = None
        kind = "dict"
    if config is None:
        return SourceInfo(name, note=f"{name} has no config")
    if not isinstance(config, dict):
        return SourceInfo(name, note=f"{name}.config is a {type(config).__name__}, not a dict or a diffusers config")
    try:
        data = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as e:
        return SourceInfo(name, note=f"{name}.config holds a value JSON cannot store ({e})")
    return SourceInfo(name, kind, data)


# Names of an OptimizedModule that are its own, not the original's (besides every nn.Module name).
OWN_NAMES = ("report", "save", "compile", "captured", "graph_module", "variants", "lowered", "blocks",
             "with_skipped", "approximate_passes", "kernel_modules", "source_info", "dtype", "device")


class OptimizedModule(nn.Module):
    """An optimized model: call it like the original; ``.report``, ``.save(dir)``.

    ``graph_module`` is the optimized graph of the main variant (the one captured at
    ``optimize`` time); calls outside its range run re-captured variants.

    Any other attribute is read from the original model, as torch.compile's wrapper does: a
    pipeline reads ``config`` and calls the original's methods through it. This is read-only:
    assigning an attribute sets it on this module, and a method that changes the original (say,
    swapping its attention processors) changes the original only, never the optimized graph;
    optimize again after such a change. Names that are this module's own shadow the original's:
    every name ``nn.Module`` defines (``forward``, ``to``, ``eval``, ``parameters``, ``state_dict``,
    ...) and ``report``, ``save``, ``compile``, ``captured``, ``graph_module``, ``variants``,
    ``lowered``, ``blocks``, ``with_skipped``, ``approximate_passes``, ``kernel_modules``,
    ``source_info``, ``dtype`` and ``device`` (the last two from this module's own weights, so they
    follow ``.to()``). A loaded module (:func:`graphopt.load`) has no Python original: it answers
    ``config`` from the saved copy of the original's config (a plain dict or a diffusers config,
    saved as JSON) and ``dtype`` and ``device`` from its weights; other names raise AttributeError.

    A loaded module whose saved CPU program, or whose forwards stored on this machine
    (:mod:`graphopt.autotune.stored`, ``target="cuda"``), serve its calls may defer its graph
    (:class:`graphopt.saved.DeferredGraph`, given as ``deferred`` instead of ``captured``): the graph is
    read from the save (and for the GPU lowered) the first time anything needs it (its weights,
    ``.to()``, ``graph_module``, ``save``, a call they do not serve), so a process that only calls the
    model never pays for reading it.
    """

    def __init__(self, captured: CapturedGraph | None, report: OptimizationReport, *,
                 source: nn.Module | None = None, passes: Sequence[Pass] = (),
                 flops: Callable[[fx.GraphModule], float] | None = None, source_eval: bool = False,
                 info: SourceInfo | None = None, deferred: Any = None):
        super().__init__()
        if (captured is None) == (deferred is None):
            raise ValueError("an OptimizedModule is built from a captured graph or a deferred one")
        self._deferred = deferred  # graphopt.saved.DeferredGraph until the graph is read, then None
        self._source_info = info if info is not None else source_info(source) if source is not None else None
        if captured is not None:
            self.variants = nn.ModuleList([captured.graph_module])
        self.lowered = nn.ModuleList()  # target="cuda": the variants with regions on Triton kernels
        self._runtimes: list[Any] = []  # target="cuda": one graphopt.autotune.runtime.Runtime per lowered variant
        self._graph_runners: list[Any] | None = None  # cuda_graphs=True: one CudaGraphRunner per lowered variant
        self._captured = [captured] if captured is not None else []  # the deferred graph fills it when read
        self._report = report
        self._source = source
        self._source_eval = source_eval  # run the source as in eval mode (optimize(..., eval_mode=True))
        self._passes = tuple(passes)
        self._flops = flops
        self._recaptures = 0
        self._blocks: dict[int, tuple[Any, ...]] = {}  # variant index -> its skippable blocks
        # (variant, skipped ids, caches freed) -> its graph, or for a lowered variant the Runtime of its lowered graph
        self._skip_graphs: dict[tuple[int, frozenset[int], bool], Any] = {}
        self._compiled: Any = None  # compile(): the main variant as Inductor's CPU program
        self._served: Any = None  # a deferred GPU load: the stored forwards (graphopt.autotune.stored.StoredForwards)
        self._served_runner: Any = None  # and their CUDA graphs (cudagraphs.CudaGraphRunner) with cuda_graphs
        self._store_as: Any = None  # a GPU load: (entry name, model.pt2, whether to replace the entry there)
        self._routing: Any = None  # a subnet's per-call routing (graphopt.variants.Routing)

    @property
    def _modules(self) -> dict[str, nn.Module | None]:  # type: ignore[override]
        # Every nn.Module walk (parameters, state_dict, to, eval, repr) starts here: a deferred graph
        # is read first, so its weights are there to be walked.
        self._read_deferred()
        return self.__dict__["_modules"]

    @_modules.setter
    def _modules(self, value: dict[str, nn.Module | None]) -> None:
        self.__dict__["_modules"] = value

    @property
    def _captured(self) -> list[CapturedGraph]:
        self._read_deferred()
        return self.__dict__["_captured_list"]

    @_captured.setter
    def _captured(self, value: list[CapturedGraph]) -> None:
        self.__dict__["_captured_list"] = value

    def _read_deferred(self) -> None:
        """Read a deferred graph now (something needs it); a failure leaves it deferred and raises."""
        deferred = self.__dict__.get("_deferred")
        if deferred is None:
            return
        captured = deferred.read()
        self.__dict__["_modules"] = {"variants": nn.ModuleList([captured.graph_module]), **self.__dict__["_modules"]}
        self.__dict__["_captured_list"] = [captured]
        self.__dict__["_deferred"] = None
        if self.__dict__.get("_served") is not None:  # stored forwards served the GPU: now lower as usual
            served, self._served, self._served_runner = self._served, None, None
            self._store_as = (served.folder.name, served.program, False)  # the next forward joins the entry
            self._report = dataclasses.replace(self._report, lowering=self._lower_variant(captured))
            if self._graph_runners is not None:
                self._graph_runners = []

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.variants[0]

    @property
    def source_info(self) -> SourceInfo | None:
        """The original's class and config, as saved with this module (None for modules built without one)."""
        return self._source_info

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of this module's first floating-point weight (float32 when it has none), as diffusers'
        ``ModelMixin.dtype`` answers it."""
        if self._deferred is not None:
            return self._deferred.dtype
        for t in itertools.chain(self.graph_module.parameters(), self.graph_module.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        """The device of this module's weights (the CPU when it has none)."""
        if self._deferred is not None:
            return self._deferred.device
        for t in itertools.chain(self.graph_module.parameters(), self.graph_module.buffers()):
            return t.device
        return torch.device("cpu")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules, nn.Module's own lookup
        except AttributeError:
            if name == "variants" and self.__dict__.get("_deferred") is not None:
                self._read_deferred()
                return self.__dict__["_modules"]["variants"]
            if name.startswith("__") or name in OWN_NAMES or "_modules" not in self.__dict__:
                raise
        source = self.__dict__["_modules"].get("_source")
        if source is not None:
            return getattr(source, name)
        info = self.__dict__.get("_source_info")
        if name == "config" and info is not None and info.config is not None:
            return info.config_view()
        what = (f"of {info.class_name} it keeps only the config" + (f" ({info.note})" if info.note else "")
                if info is not None else "")
        raise AttributeError(f"'OptimizedModule' object has no attribute {name!r}: a loaded module has no Python "
                             f"original to read it from{'; ' + what if what else ''}")

    def _reset(self, captured: CapturedGraph) -> None:
        """Make ``captured`` the canonical graph (an approximate pass changed it): variants and caches
        built from the previous one are dropped."""
        self._read_deferred()
        if len(self.lowered):
            raise RuntimeError("approximate passes run before lowering")
        self._captured = [captured]
        self.variants = nn.ModuleList([captured.graph_module])
        self._blocks.clear()
        self._skip_graphs.clear()
        if self._compiled is not None:  # compiled from the previous graph: compile() again for the new one
            self._compiled = None
            self._report = dataclasses.replace(self._report, compiled=None)

    @property
    def captured(self) -> CapturedGraph:
        return self._captured[0]

    def _lower_variant(self, captured: CapturedGraph) -> dict[str, Any]:
        """Lower ``captured`` (the next variant) onto Triton kernels, checked region by region."""
        from graphopt.autotune.runtime import Runtime

        from .lowering import lower_captured

        gm, report = lower_captured(captured)
        self.lowered.append(gm)
        runtime = Runtime(gm, dump_dir=report.get("dump_dir"))
        if self._store_as is not None and not self._runtimes:  # a GPU load: store its first forward
            runtime.on_generated = functools.partial(self._store_forwards, runtime, report)
        self._runtimes.append(runtime)
        return report

    def _store_forwards(self, runtime: Any, lowering: dict[str, Any], forward: Any) -> None:
        """Store the first forward a loaded module wrote, with one for its example inputs, for the next
        load on this machine (:mod:`graphopt.autotune.stored`); where that load's entry exists (its
        stored forwards served until a call in another layout), add the forward to it, unless the load
        found it unusable: then it is replaced. Never fails the call: a forward that cannot be stored is
        not, and a warning says why when something went wrong."""
        from graphopt.autotune import stored
        from graphopt.autotune.runtime import generate_forward, layout_of

        runtime.on_generated = None
        name, program, replace = self._store_as
        self._store_as = None
        examples = list(self.captured.example_inputs)
        try:
            if not replace and (stored.extend(name, forward.portable, program) or (stored.store_dir() / name).is_dir()):
                return
            with torch.no_grad():
                if layout_of(examples) == forward.layout:
                    first, outputs = forward, forward.fn(*examples)
                else:
                    _, first = generate_forward(runtime.graph_module, examples, name="forward_examples",
                                                reuse_buffers=runtime.reuse_buffers, portable=True)
                    outputs = first.fn(*examples)
            portables = [first.portable] + ([forward.portable] if first is not forward else [])
            stored.write(name, portables, program, outputs, lowering, replace=replace)
        except stored.NotStored:
            pass  # e.g. a weight made by a pass: nothing in the save holds it; the next load lowers again
        except Exception as e:  # noqa: BLE001 - a cache write must never fail the user's call
            warnings.warn(f"graphopt: could not store the generated forward for the next load "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # .to() / .half() / .cuda() may replace the parameters a generated forward or a recorded CUDA graph
        # holds: write and record new ones
        result = super()._apply(fn, *args, **kwargs)
        for runtime in self._runtimes:
            runtime.clear()
        if self._graph_runners is not None:
            self._graph_runners = []
        self._skip_graphs.clear()
        return result

    def kernel_calls(self, *args: Any, **kwargs: Any) -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        """Every kernel call site this call meets, with the tensors it is called with (target="cuda";
        the call runs on the general path, site by site)."""
        from graphopt.autotune.check import call_sites

        spec, tensors, objects = self._captured[0].flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        if i >= len(self.lowered):
            return []
        return call_sites(self.lowered[i], tensors)

    def kernel_modules(self) -> list[nn.Module]:
        """The kernel call sites of every lowered variant (empty unless target="cuda")."""
        from graphopt.autotune.sites import _Tuned

        return [m for gm in self.lowered for m in gm.modules() if isinstance(m, _Tuned)]

    @property
    def report(self) -> OptimizationReport:
        return dataclasses.replace(self._report, recaptures=self._recaptures)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        deferred = self._deferred
        # loaded warm: the saved CPU program, or on the GPU the stored forwards, serve what the guards admit
        if deferred is not None and (self._compiled is not None or self._served is not None):
            spec, tensors, objects = deferred.head.flatten_call(args, kwargs)
            if not _mismatch(deferred.head, spec, tensors, objects):
                if self._compiled is not None:
                    return deferred.head.call.rebuild_output(self._compiled(tensors))
                if self._served.accepts(tensors):
                    return deferred.head.call.rebuild_output(self._serve(tensors))
        main = self._captured[0]
        spec, tensors, objects = main.flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        routing = self._routing
        if routing is not None and routing.applies(tensors):
            return self._captured[i].call.rebuild_output(
                self._run_skipping(i, routing.skipped, tensors, routing.free_caches))
        return self._captured[i].call.rebuild_output(self._run(i, tensors))

    @property
    def routing(self) -> Any:
        """The per-call block routing a subnet pass set (:class:`graphopt.variants.Routing`), or None."""
        return self._routing

    def _variant_for(self, args: tuple, kwargs: dict, spec: dict, tensors: list[torch.Tensor],
                     objects: list[Any]) -> int:
        """The index of the captured variant valid for this call, re-capturing one when none is."""
        reasons = []
        for i, variant in enumerate(self._captured):
            reasons.append(_mismatch(variant, spec, tensors, objects))
            if not reasons[-1]:
                return i
        self._recapture(args, kwargs, spec, tensors, objects, reasons[0])  # as against the optimized capture
        return len(self._captured) - 1

    def compile(self) -> Any:
        """Compile the main variant for the CPU with Inductor, ahead of time (:mod:`graphopt.compiled`):
        checked against the original outputs, then used for every call the main variant serves and
        saved with the module. Returns the :class:`~graphopt.compiled.CompiledReport`."""
        from .compiled import compile_captured

        if len(self.lowered):
            raise UsageError("compile() builds the CPU program; this module is lowered for target='cuda'")
        self._compiled, report = compile_captured(self.captured)
        self._report = dataclasses.replace(self._report, compiled=dataclasses.asdict(report))
        return report

    def _serve(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        served = self._served
        if self._graph_runners is None:
            return served(tensors)
        if self._served_runner is None:
            from .cudagraphs import CudaGraphRunner

            self._served_runner = CudaGraphRunner(lambda *t: served(t))
        return self._served_runner(tensors)

    def _run(self, i: int, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if i == 0 and self._compiled is not None:
            return self._compiled(tensors)
        if i < len(self.lowered):
            if self._graph_runners is not None:
                from .cudagraphs import CudaGraphRunner

                while len(self._graph_runners) <= i:
                    runtime = self._runtimes[len(self._graph_runners)]
                    self._graph_runners.append(CudaGraphRunner(lambda *t, runtime=runtime: runtime(t),
                                                               stale=runtime.retuned))
                return self._graph_runners[i](tensors)
            return self._runtimes[i](tensors)
        return self._captured[i].run(tensors)

    @property
    def blocks(self) -> tuple[Any, ...]:
        """The residual blocks a sampling plan may skip (:class:`graphopt.variants.Block`, graph order)."""
        return self._blocks_of(0)

    def _blocks_of(self, i: int) -> tuple[Any, ...]:
        from .variants import find_skippable, same_blocks

        if i not in self._blocks:
            found = find_skippable(self._captured[i].graph_module)
            if i and not same_blocks(found, self._blocks_of(0)):
                raise InputError("the graph traced for these shapes has other residual blocks than the "
                                 "optimized one: blocks cannot be skipped at these shapes")
            self._blocks[i] = found
        return self._blocks[i]

    def with_skipped(self, blocks: Iterable[int]) -> Callable[..., Any]:
        """A callable like this module that skips the residual blocks with these ids (see :attr:`blocks`):
        each runs a graph variant without them, built once per distinct set and sharing the weights."""
        skipped = frozenset(int(b) for b in blocks)
        known = {b.id for b in self.blocks}
        unknown = sorted(skipped - known)
        if unknown:
            raise InputError(f"unknown block id(s) {unknown}: this model has blocks 0..{len(known) - 1}")
        if not skipped:
            return self
        return functools.partial(self._call_skipping, skipped)

    def _call_skipping(self, skipped: frozenset[int], *args: Any, **kwargs: Any) -> Any:
        main = self._captured[0]
        spec, tensors, objects = main.flatten_call(args, kwargs)
        i = self._variant_for(args, kwargs, spec, tensors, objects)
        return self._captured[i].call.rebuild_output(self._run_skipping(i, skipped, tensors))

    def _run_skipping(self, i: int, skipped: frozenset[int], tensors: list[torch.Tensor], free_caches: bool = False
                      ) -> tuple[torch.Tensor, ...]:
        key = (i, skipped, free_caches)
        if key not in self._skip_graphs:
            from .variants import without_blocks

            graph = without_blocks(self._captured[i].graph_module,
                                   [b for b in self._blocks_of(i) if b.id in skipped], free_caches=free_caches)
            if i < len(self.lowered):  # target="cuda": the variant runs on kernels like the rest
                captured = dataclasses.replace(self._captured[i], graph_module=graph)
                with torch.no_grad():
                    outputs = captured.run(captured.example_inputs)
                from graphopt.autotune.runtime import Runtime

                from .lowering import lower_captured

                lowered, report = lower_captured(dataclasses.replace(captured, reference_outputs=tuple(outputs)))
                graph = Runtime(lowered, dump_dir=report.get("dump_dir"))
            self._skip_graphs[key] = graph
        run = self._skip_graphs[key]
        return tuple(run(tensors) if i < len(self.lowered) else run(*tensors))

    @property
    def approximate_passes(self) -> tuple[str, ...]:
        """The approximate passes applied to the canonical graph (they are never re-run). A subnet's
        routing is not among them: it applies to every variant, re-captured ones included."""
        routed = self._routing.pass_name if self._routing is not None else None
        return tuple(p.name for p in self._report.passes if not p.exact and not p.skipped and p.name != routed)

    def _recapture(self, args: tuple, kwargs: dict, spec: dict, tensors: list[torch.Tensor], objects: list[Any],
                   reason: str) -> CapturedGraph:
        """A variant for a call no variant is valid for.

        When only the shapes differ, the optimized graph is traced again for them (no pass runs
        again, so approximate changes are kept exactly); with the original model at hand and no
        approximate pass applied, that variant is checked against the model, and re-captured from
        it if the model behaves differently at these shapes. Another call structure or constant
        argument is re-captured from the original model and the passes run again. A loaded module
        refuses: without the model nothing can show that its graph holds outside the captured range.
        """
        main = self._captured[0]
        device = next(itertools.chain(self.graph_module.parameters(), self.graph_module.buffers()), None)
        captured = None
        if self._source is None:  # the saved graph may hold a branch the model took for the captured range only
            raise InputError(f"this call does not fit what the module was captured for ({reason}); a loaded "
                             "module cannot re-capture: call it with inputs like the captured ones, or optimize "
                             "the original model with such inputs")
        model_args, model_kwargs = _without_extras(main, args, kwargs)
        if spec == main.call.in_spec and not _mismatch_objects(main, objects):
            try:
                captured = retrace(main, tensors)
            except CaptureError as e:  # e.g. another channel count: the graph does not apply
                if self.approximate_passes:
                    raise InputError(f"this call is outside what the module was captured for ({reason}) and "
                                     f"the optimized graph does not run on it: {e}") from e
            if captured is not None and not self.approximate_passes:
                from .verify import compare

                expected = self._run_source(model_args, model_kwargs, reason)
                if not compare(captured.reference_outputs, expected).within:
                    captured = None  # the model itself branches on these shapes: capture it for them
        if captured is None:
            if self.approximate_passes:
                raise InputError(f"this call is outside what the module was captured for ({reason}) and the "
                                 f"module carries approximate changes ({', '.join(self.approximate_passes)}) "
                                 "made for that call structure: optimize the model again with such inputs")
            self._run_source(model_args, model_kwargs, reason)  # the caller's error, named as theirs
            # dynamic, so that other batches at these shapes need no capture of their own; static when
            # the call's own batch falls outside what torch.export proves for them
            for dynamic in (True, False):
                with kept_state(self._source, eval_mode=self._source_eval):
                    captured = capture(self._source, model_args, model_kwargs, dynamic_batch=dynamic)
                    captured, _ = run_pipeline(captured, self._passes, flops=self._flops)
                    captured = _checked_batch_one(self._source, captured)
                if not _mismatch(captured, spec, tensors, objects):
                    break
        if device is not None:  # follow a .to() the caller applied to this module
            captured.graph_module.to(device.device)
        self._captured.append(captured)
        self.variants.append(captured.graph_module)
        if len(self.lowered):
            self._lower_variant(captured)
        self._recaptures += 1
        return captured

    def _run_source(self, args: tuple, kwargs: dict, reason: str) -> list[torch.Tensor]:
        """The original model's flat outputs on a call outside the captured range; when the model itself
        rejects the call, an :class:`InputError` says how the call differs from the captured one."""
        try:
            with torch.no_grad(), kept_state(self._source, eval_mode=self._source_eval):
                _, outputs, _ = structure.flatten(self._source(*args, **kwargs))
        except Exception as e:
            module_path, source = _locate(e, self._source)
            where = (f" in module '{module_path}'" if module_path else "") + (f" at {source}" if source else "")
            raise InputError(f"this call does not fit the model: {reason}; the model raised {type(e).__name__}"
                             f"{where}: {first_line(e)}") from e
        return outputs

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, plan: Any = None) -> Path:
        """Write the main variant to ``directory`` (atomically), with ``plan`` as plan.json; returns the path.
        See :func:`graphopt.saved.save`."""
        from .saved import save

        return save(self, directory, overwrite=overwrite, plan=plan)


def _mismatch(variant: CapturedGraph, spec: dict, tensors: list[torch.Tensor], objects: list[Any]) -> str:
    if spec != variant.call.in_spec:
        return (f"arguments {structure.describe(spec)} differ from the captured "
                f"{structure.describe(variant.call.in_spec)}")
    if _mismatch_objects(variant, objects):
        return "a non-tensor argument differs from the captured one"
    return variant.guards.mismatch(tensors, variant.call.input_names()) or ""


def _mismatch_objects(variant: CapturedGraph, objects: list[Any]) -> bool:
    return len(objects) != len(variant.call.objects) or any(
        a is not b and not _equal(a, b) for a, b in zip(objects, variant.call.objects))


def _without_extras(captured: CapturedGraph, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call as the original model takes it: the extra inputs passes added are dropped."""
    return args, {k: v for k, v in kwargs.items() if k not in captured.call.extras}


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False




def _checked_batch_one(model: nn.Module, captured: CapturedGraph) -> CapturedGraph:
    """``captured`` whose range includes batch 1 only if its optimized graph still matches the model there:
    passes judge shapes at the traced batch, and a squeeze of a batch dim of 1 is no identity."""
    if (captured.guards.batch_range() or (0,))[0] == 1 and not batch_one_matches(
            model, captured.call, captured.graph_module, captured.example_inputs):
        return without_batch_one(captured)  # batch 1 gets a capture of its own when called
    return captured


def export_program(captured: CapturedGraph) -> torch.export.ExportedProgram:
    """Re-export an (optimized) captured graph as an ExportedProgram with the same dynamic dims and ranges."""
    symbols = {}
    for name, (lo, hi) in captured.guards.ranges.items():
        safe = "d_" + "".join(c if c.isalnum() else "_" for c in name)
        symbols[name] = Dim(safe, min=lo, max=hi) if hi is not None else Dim(safe, min=lo)
    dims = tuple({d: symbols.get(s, Dim.AUTO) for d, s in enumerate(g.shape) if isinstance(s, str)} or None
                 for g in captured.guards.tensors)
    with quiet():
        return torch.export.export(captured.graph_module, tuple(captured.example_inputs), dynamic_shapes=dims,
                                   strict=False)
