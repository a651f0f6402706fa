"""Kernel call sites: the modules a lowered graph calls in place of its regions' ATen nodes.

Where it belongs: built by :func:`.lower.lower`, one per region, and called by the lowered graph (the
general path) or written out by :mod:`.runtime`. A :class:`FusedRegion` launches a generated pointwise
or norm kernel (:mod:`.codegen`), a :class:`FamilyRegion` a hand-written attention-family kernel
(:mod:`.kernels`, whose ``lowering()`` rows say which op each runs); :class:`~.gemm.GemmRegion` (in
its own module) a linear with its pointwise epilogue. Each region keeps its original ATen
nodes as an eager fallback, which is also the reference its kernel is checked against.

Identical regions (the same ops on the same layouts: one per transformer block) share one source and
so one compiled kernel: a :class:`KernelLibrary` loads each distinct source once. With
``GRAPHOPT_DUMP_KERNELS=dir`` the sources are written to ``dir``, readable as they are.

Each site picks its launch config per shape bucket from the tuning cache the first time it sees the
bucket (:func:`graphopt.autotune.choose`): the tuned config if ``graphopt autotune`` stored one for this
GPU, else the family's heuristic default, checked against the eager ops but not timed. ``tune()`` on
a site times the candidates the cost model keeps for the shape, each checked against the eager ops on
its first run. One candidate of every call site is :data:`~.configs.ATEN`, the eager ops it replaces,
timed even when a budget skips others, so tuning never chooses a kernel slower than eager as timed.
It is the untuned default for softmax attention, where PyTorch's SDPA backends (FlashAttention,
cuDNN) are the bar the flash kernel must clear on each GPU, and for a lone pointwise op, whose kernel
would move the same bytes as the op (:attr:`FusedRegion.fuses_nothing`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import fx, nn

from graphopt.errors import UsageError, VerificationError
from graphopt.verify import Comparison, compare_precise, precise_run

from .cache import Config, shape_bucket
from .codegen import GeneratedKernel
from .configs import ATEN, aten_first, is_aten, norm_configs, pointwise_configs, prune_blocks
from .family import FamilyOp
from .launches import Buffer, KernelCall, LaunchBinder, LaunchPlan, Ref
from .regions import Region, node_arg, shape_of, strides_of
from .tuner import DEFAULT_CACHE, CacheArg, Timer, TuneResult, choose, cuda_graph_timer, hash_source, tune

aten = torch.ops.aten

DUMP_ENV = "GRAPHOPT_DUMP_KERNELS"


@dataclasses.dataclass(frozen=True)
class TuningOptions:
    """How lowered kernels pick configs: ``cache`` to read (and write when tuning), ``autotune`` to time
    candidates the first time a shape bucket without a cache entry is met rather than use the default."""

    cache: CacheArg = DEFAULT_CACHE
    autotune: bool = False
    timer: Timer = cuda_graph_timer
    budget_s: float | None = None


class KernelLibrary:
    """Loads each distinct generated source once; writes them to ``dump_dir`` when given.

    Without a dump directory the sources go to a private temporary directory (Triton reads a kernel's
    source from its file), removed when the library is garbage-collected.
    """

    def __init__(self, dump_dir: str | os.PathLike | None = None):
        if dump_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="graphopt-kernels-")
            self._tmp = tmp
            self.directory, self.dumped = Path(tmp.name), False
        else:
            self._tmp = None
            self.directory, self.dumped = Path(dump_dir), True
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"{DUMP_ENV}={dump_dir}: cannot create the folder ({e.strerror})") from e
        self._loaded: dict[str, Any] = {}

    @staticmethod
    def from_env() -> KernelLibrary:
        return KernelLibrary(os.environ.get(DUMP_ENV) or None)

    def __len__(self) -> int:
        return len(self._loaded)

    def load(self, kernel: GeneratedKernel) -> Any:
        """The module holding ``kernel``'s ``@triton.jit`` functions (each compiled by Triton on first
        launch, once per signature)."""
        if (module := self._loaded.get(kernel.source)) is not None:
            return module
        path = self.directory / f"{kernel.name}.py"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(kernel.source)
        os.replace(tmp, path)  # a reader never sees half a file
        spec = importlib.util.spec_from_file_location(f"graphopt_generated.{kernel.name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._loaded[kernel.source] = module
        return module

    def write_index(self, text: str) -> None:
        if self.dumped:
            (self.directory / "regions.txt").write_text(text)


@dataclasses.dataclass(eq=False)
class ChoiceEpoch:
    """Counts the config changes of one lowering's call sites (a ``tune()``): a generated forward
    (:mod:`.runtime`) bakes in the configs of one epoch and is dropped when the count moves on."""

    value: int = 0


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """What a call site does on inputs laid out like the ones it was planned for.

    ``plan`` is ``None`` when the site runs its region's eager ATen ops (``fallback``): the ATen
    candidate was chosen, or a generated kernel's inputs are laid out otherwise than at capture.
    Otherwise the plan's k-th input is the site's input ``inputs[k]``.
    """

    config: Config | None
    plan: LaunchPlan | None
    inputs: tuple[int, ...] = ()

    def run(self, site: _Tuned, args: Sequence[torch.Tensor],
            binder: LaunchBinder | None = None) -> tuple[torch.Tensor, ...]:
        if self.plan is None:
            return tuple(site.fallback(*args))
        return self.plan.run([args[i] for i in self.inputs], binder)


class _Tuned(nn.Module):
    """A kernel call site: picks and remembers a config per shape bucket; ``tune()`` times them all."""

    kernel_name: str
    source_hash: str
    fallback: fx.GraphModule
    """The region's original ATen nodes, as a graph taking the site's inputs."""

    def __init__(self, options: TuningOptions, epoch: ChoiceEpoch | None = None):
        super().__init__()
        self.options = options
        self.epoch = epoch if epoch is not None else ChoiceEpoch()
        self._chosen: dict[tuple[str, tuple[int, ...]], Config] = {}

    def configs(self) -> list[dict[str, int]]:
        raise NotImplementedError

    def prune(self, configs: Sequence[Config], shape: tuple[int, ...]) -> list[Config]:
        return list(configs)

    def tuning_shape(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def launch(self, config: Config, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def cache_name(self, *inputs: torch.Tensor) -> str:
        """The kernel's name in the tuning cache: the source is dtype-generic, its timings are not."""
        dtypes = dict.fromkeys(str(t.dtype).removeprefix("torch.") for t in inputs if t.is_floating_point())
        return f"{self.kernel_name}:{'-'.join(dtypes)}"

    def _config(self, shape: tuple[int, ...], inputs: Sequence[torch.Tensor]) -> Config:
        key = (self.cache_name(*inputs), shape_bucket(shape))
        if (cfg := self._chosen.get(key)) is None:
            o = self.options
            cfg = choose(key[0], self.source_hash, shape, self.configs, self._runner(inputs),
                         autotune=o.autotune, prune=self.prune, timer=o.timer, cache=o.cache,
                         budget_s=o.budget_s, required=is_aten).config
            self._chosen[key] = cfg
        return cfg

    def tune(self, *inputs: torch.Tensor, timer: Timer = cuda_graph_timer, cache: CacheArg = DEFAULT_CACHE,
             budget_s: float | None = None, force: bool = False) -> TuneResult:
        """Time every candidate config on ``inputs``; the winner is stored and used from now on.

        Each candidate runs as a generated forward runs it (:meth:`_runner`): its launch plan made once,
        then its allocations and launches, not the general path's planning. The default ``timer``
        replays them inside a CUDA graph, as the module's own graph does (:func:`.tuner.cuda_graph_timer`).
        """
        shape = self.tuning_shape(*inputs)
        name = self.cache_name(*inputs)
        result = tune(name, self.source_hash, shape, self.configs, self._runner(inputs),
                      prune=self.prune, timer=timer, cache=cache, budget_s=budget_s, force=force, required=is_aten)
        self._chosen[(name, shape_bucket(shape))] = result.config
        self.epoch.value += 1
        return result

    def _runner(self, inputs: Sequence[torch.Tensor]) -> Callable[[Config], tuple[torch.Tensor, ...]]:
        """Runs a config on ``inputs`` as a generated forward does: its plan made on first use, then only
        the plan's allocations and launches (what the tuner times).

        The first run of each config is checked against the site's eager ops on the same inputs, as
        lowering checks its default (:func:`graphopt.verify.compare_precise`); a config that differs
        raises :class:`~graphopt.errors.VerificationError`, which the tuner records as that config's
        failure, so tuning can only choose configs whose outputs were checked.
        """
        plans: dict[tuple, SitePlan] = {}
        reference: list[tuple[torch.Tensor, ...]] = []  # the eager outputs, computed at the first check

        def run(config: Config) -> tuple[torch.Tensor, ...]:
            key = tuple(sorted(config.items()))
            if (planned := plans.get(key)) is not None:
                return planned.run(self, inputs)
            planned = self.config_plan(config, inputs)
            outputs = planned.run(self, inputs)
            if not reference:
                reference.append(tuple(self.reference(*inputs)))
            cmp = self.check(outputs, inputs, reference[0])
            if not cmp.within:
                raise VerificationError(f"{self.kernel_name} with {dict(config)} differs from the ATen ops it "
                                        f"replaces: {cmp.line()}")
            plans[key] = planned
            return outputs

        return run

    def plan_for(self, *inputs: torch.Tensor) -> SitePlan:
        """The config this site uses on ``inputs`` (chosen once per shape bucket, as a call would) and
        its launch plan for their layouts."""
        raise NotImplementedError

    def config_plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> SitePlan:
        """``config``'s launch plan for inputs laid out like ``inputs`` (no plan: the eager ops)."""
        raise NotImplementedError

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the kernel computes, by the eager ops it replaces."""
        raise NotImplementedError

    def check(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              reference: Sequence[torch.Tensor] | None = None) -> Comparison:
        """``outputs`` of this site on ``inputs`` against its eager ops (``reference`` when already run):
        the dtype's bound, or in fp16/bf16 beyond it the eager ops in fp32 as referee."""
        reference = self.reference(*inputs) if reference is None else reference
        return compare_precise(outputs, reference, lambda: precise_run(self.fallback, inputs))

    def default_config(self, *inputs: torch.Tensor) -> Config:
        """The untuned heuristic choice at these inputs' shape."""
        return Config(self.prune([Config(c) for c in self.configs()], self.tuning_shape(*inputs))[0])

    def runs_aten(self) -> bool:
        """Whether every shape this site has met runs its ATen ops (as the untuned default or because
        tuning found them faster)."""
        return bool(self._chosen) and all(is_aten(c) for c in self._chosen.values())


class FusedRegion(_Tuned):
    """A generated pointwise or norm kernel in place of the region's ATen nodes.

    Called with the region's inputs, returns its outputs as a tuple, allocated with the strides the
    eager ops would have given them. Inputs laid out otherwise than at capture (the kernel's index math
    assumes the captured strides, its outputs the captured dtypes) run the eager fallback instead,
    counted in ``fallbacks``.
    """

    def __init__(self, kernel: GeneratedKernel, library: KernelLibrary, fallback: fx.GraphModule,
                 options: TuningOptions, epoch: ChoiceEpoch | None = None):
        super().__init__(options, epoch)
        self.generated = kernel
        self.kernel_name, self.source_hash = kernel.name, hash_source(kernel.source)
        self._library = library  # keeps the kernel's source file alive
        module = library.load(kernel)
        self.fn = getattr(module, kernel.name)
        self._split = (getattr(module, f"{kernel.name}_stats"), getattr(module, f"{kernel.name}_apply")) \
            if kernel.row is not None else None
        self.fallback = fallback
        self.fallbacks = 0
        region = kernel.region
        symbols = sorted({s for n in (*region.inputs, *region.outputs)
                          for e in (*shape_of(n), *strides_of(n)) for s in e.free_symbols} | set(kernel.symbols),
                         key=str)
        self._symbols = tuple(symbols)
        self._binders = _binders(self._symbols, region.inputs)
        geometry = [[list(shape_of(n)), list(strides_of(n))] for n in (*region.inputs, *region.outputs)]
        numel = sympy.Mul(*region.domain)
        self._geometry = sympy.lambdify(self._symbols, [geometry, numel], modules="math")
        self._dtypes = tuple(n.meta["val"].dtype for n in region.outputs)
        self._in_dtypes = tuple(getattr(n.meta.get("val"), "dtype", None) for n in region.inputs)
        self._n_in = len(region.inputs)
        self._names = tuple(f"in{i}" for i in range(len(region.inputs)))
        self._layouts: dict[tuple, tuple[list[int], list, int] | None] = {}

    def extra_repr(self) -> str:
        return f"{self.kernel_name}: {' '.join(self.generated.region.ops())}"

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fallback(*inputs))

    def configs(self) -> list[dict[str, int]]:
        return pointwise_configs() if self.generated.row is None else norm_configs()

    @property
    def fuses_nothing(self) -> bool:
        """One pointwise op: its kernel reads and writes what the ATen op does, so it can at best tie,
        and it costs a Triton launch where ATen's is cheaper. Such a site keeps its ATen op until
        tuning times the kernel faster."""
        return self.generated.row is None and len(self.generated.region.nodes) == 1

    def prune(self, configs: Sequence[Config], shape: tuple[int, ...]) -> list[Config]:
        kept = prune_blocks(self.generated.block_key)(configs, shape)
        return aten_first(kept) if self.fuses_nothing else kept  # the untuned default is the first

    def _layout(self, inputs: Sequence[torch.Tensor]) -> tuple[list[int], list, int] | None:
        # per call this is a dict lookup: the sympy-derived geometry is evaluated once per input layout
        key = tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)
        if key not in self._layouts:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            self._layouts[key] = self._evaluate(inputs)
        return self._layouts[key]

    def _evaluate(self, inputs: Sequence[torch.Tensor]) -> tuple[list[int], list, int] | None:
        if any(d is not None and t.dtype != d for t, d in zip(inputs, self._in_dtypes)):
            return None  # the kernel writes its outputs in the captured dtypes: eager decides others
        values = [b(inputs) for b in self._binders]
        geometry, numel = self._geometry(*values)
        for t, (shape, strides) in zip(inputs, geometry):
            if tuple(t.shape) != tuple(shape) or any(
                    s != 1 and a != b for s, a, b in zip(shape, t.stride(), strides)):
                return None
        return values, geometry[self._n_in:], int(numel)

    def _required_layout(self, inputs: Sequence[torch.Tensor]) -> tuple[list[int], list, int]:
        if (layout := self._layout(inputs)) is None:
            raise ValueError(f"{self.kernel_name}: inputs are not laid out as at capture")
        return layout

    def tuning_shape(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        return self._shape(self._required_layout(inputs)[2])

    def _shape(self, numel: int) -> tuple[int, ...]:
        row = self.generated.row
        return (numel,) if row is None else (numel // row, row)

    def launch(self, config: Config, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if is_aten(config):
            return self.reference(*inputs)
        return self.plan(config, inputs).run(inputs)

    def output_buffers(self, inputs: Sequence[torch.Tensor]) -> tuple[Buffer, ...]:
        """The region's outputs for inputs laid out like ``inputs``, with the strides eager gives them."""
        out_geometry = self._required_layout(inputs)[1]
        return tuple(Buffer(f"out{j}", tuple(int(d) for d in shape), tuple(int(d) for d in strides), dtype)
                     for j, ((shape, strides), dtype) in enumerate(zip(out_geometry, self._dtypes)))

    def plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> LaunchPlan:
        """The kernel's allocations and launches with ``config`` for inputs laid out like ``inputs``."""
        values, _, numel = self._required_layout(inputs)
        outs = self.output_buffers(inputs)
        out_names = tuple(b.name for b in outs)
        if numel == 0:
            return LaunchPlan(self._names, outs, (), out_names)
        cfg = dict(config)
        row = self.generated.row
        sizes = tuple(self._kernel_symbols(values))
        pointers = tuple(Ref(n) for n in (*self._names, *out_names))
        if row is None:
            calls = (KernelCall(self.fn, (triton_cdiv(numel, cfg["XBLOCK"]),), (*pointers, numel, *sizes),
                                tuple(cfg.items())),)
        elif (splits := cfg.pop("RSPLIT", 1)) > 1:
            assert self._split is not None
            rows = numel // row
            ws = Buffer("ws", (rows * splits * 3,), (1,), torch.float32)
            stats, apply = self._split
            tail = (rows, *sizes)
            constexprs = (("RSPLIT", splits), *cfg.items())
            calls = (KernelCall(stats, (rows, splits), (*pointers[:self._n_in], Ref("ws"), *tail), constexprs),
                     KernelCall(apply, (rows, splits), (*pointers, Ref("ws"), *tail), constexprs))
            return LaunchPlan(self._names, (*outs, ws), calls, out_names)
        else:
            calls = (KernelCall(self.fn, (numel // row,), (*pointers, numel // row, *sizes), tuple(cfg.items())),)
        return LaunchPlan(self._names, outs, calls, out_names)

    def plan_for(self, *inputs: torch.Tensor) -> SitePlan:
        layout = self._layout(inputs)
        if layout is None:
            return SitePlan(None, None)
        return self.config_plan(self._config(self._shape(layout[2]), inputs), inputs)

    def config_plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> SitePlan:
        if is_aten(config):
            return SitePlan(config, None)
        return SitePlan(config, self.plan(config, inputs), tuple(range(self._n_in)))

    def _kernel_symbols(self, values: Sequence[int]) -> list[int]:
        return [values[self._symbols.index(s)] for s in self.generated.symbols]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self._layout(inputs)
        if layout is None:
            self.fallbacks += 1
            return self.reference(*inputs)
        return self.launch(self._config(self._shape(layout[2]), inputs), *inputs)


FAMILY_KERNELS = ("attention", "linear_attention", "dynamic_dwconv")
"""The kernel modules whose ``lowering()`` rows (:class:`.family.FamilyOp`) say which ops they run."""


def family_ops() -> dict[object, FamilyOp]:
    """The attention-family ops lowering knows, by graph target, from their kernel modules."""
    import graphopt.ops  # noqa: F401 - registers torch.ops.graphopt.*

    rows: dict[object, FamilyOp] = {}
    for name in FAMILY_KERNELS:
        rows.update(_kernel_module(name).lowering())
    return rows


class FamilyRegion(_Tuned):
    """An attention-family op (softmax attention, ReLU linear attention, ATConv's dynamic depthwise
    conv) on its hand-written kernel, with the config tuned per shape bucket."""

    def __init__(self, region: Region, options: TuningOptions, epoch: ChoiceEpoch | None = None):
        super().__init__(options, epoch)
        from .kernels._launch import is_compiled

        node = region.nodes[0]
        if (op := family_ops().get(node.target)) is None:
            raise _Decline(f"no kernel for {node.target}")
        self.op = op
        module = _kernel_module(self.op.module)
        kernels = [getattr(module, k) for k in self.op.kernels]
        dtype = node.args[0].meta["val"].dtype
        if self.op.uses_dot and not is_compiled(kernels[0]) and dtype == torch.bfloat16:
            raise _Decline("Triton's interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584); "
                           f"bf16 {self.op.module} runs on ATen under TRITON_INTERPRET=1")
        self._launcher = getattr(module, self.op.launcher)
        self._planner = getattr(module, f"{self.op.launcher}_plan")
        self.fallback = region_graph(region)
        self._configs = module.configs
        self.kernel_name = self.op.module if node.target is aten.scaled_dot_product_attention.default \
            else str(node.target).removeprefix("graphopt.").removesuffix(".default")
        self.source_hash = hash_source(*kernels)
        self.options_kw = self.op.options(node)
        # the op's tensor arguments as positions in the region's (deduplicated) inputs: sdpa(x, x, x) is one input
        self._arg_index = tuple(region.inputs.index(a) for a in node.args[:self.op.tensors])
        self._optional_index = {name: region.inputs.index(a) for i, name in self.op.optional_tensors
                                if isinstance(a := node_arg(node, i, name), fx.Node)}
        self._name_index = {**dict(zip(self.op.tensor_names, self._arg_index)), **self._optional_index}

    def extra_repr(self) -> str:
        given = "".join(f" + {name}" for name in self._optional_index)  # e.g. LiT's fused depthwise-conv branch
        return f"{self.kernel_name}{given} {self.options_kw}"

    def configs(self) -> list[dict[str, int]]:
        # PyTorch's own SDPA (FlashAttention / cuDNN / memory-efficient) is a strong default: ours must beat it
        return [ATEN, *self._configs()] if self.op.aten_first else [*self._configs(), ATEN]

    def _tensors(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [inputs[i] for i in self._arg_index]

    def _optional(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: inputs[i] for name, i in self._optional_index.items()}

    def tuning_shape(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        return self.op.shape(*self._tensors(inputs), **self._optional(inputs))

    def launch(self, config: Config, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if is_aten(config):
            return self.reference(*inputs)
        options = {**self.options_kw, **self._optional(inputs)}
        return (self.op.launch(self._launcher, self._tensors(inputs), options, config),)

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.op.reference(*self._tensors(inputs), **self.options_kw, **self._optional(inputs)),)

    def plan_for(self, *inputs: torch.Tensor) -> SitePlan:
        return self.config_plan(self._config(self.tuning_shape(*inputs), inputs), inputs)

    def config_plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> SitePlan:
        if is_aten(config):
            return SitePlan(config, None)
        options = {**self.options_kw, **self._optional(inputs)}
        plan = self.op.launch(self._planner, self._tensors(inputs), options, config)
        return SitePlan(config, plan, tuple(self._name_index[name] for name in plan.inputs))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.launch(self._config(self.tuning_shape(*inputs), inputs), *inputs)


def _kernel_module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.kernels.{name}")


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _binders(symbols: Sequence[sympy.Symbol], inputs: Sequence[fx.Node]) -> list[Callable[[Sequence[torch.Tensor]], int]]:
    """For each size symbol, how to read its value off the inputs (a dim equal to it, or solved from one)."""
    binders = []
    for s in symbols:
        direct, solved = None, None
        for i, n in enumerate(inputs):
            for d, e in enumerate(shape_of(n)):
                if e == s and direct is None:
                    direct = functools.partial(_dim, i, d, None)
                elif solved is None and e.free_symbols == {s}:
                    y = sympy.Symbol("y")
                    roots = sympy.solve(sympy.Eq(e, y), s)
                    if len(roots) == 1:  # e.g. the batch of a CFG-doubled tensor, 2*s0
                        solved = functools.partial(_dim, i, d, sympy.lambdify(y, roots[0], modules="math"))
        if (found := direct or solved) is None:
            raise _Decline(f"size symbol {s} cannot be read off the region's inputs")
        binders.append(found)
    return binders


def _dim(i: int, d: int, inverse: Callable[[int], float] | None, tensors: Sequence[torch.Tensor]) -> int:
    size = int(tensors[i].shape[d])
    return size if inverse is None else int(inverse(size))


class _Decline(Exception):
    """A region that cannot be lowered; the reason goes into the report and its nodes stay on ATen."""


def region_graph(region: Region) -> fx.GraphModule:
    """The region's original ATen nodes as a graph taking its inputs and returning its outputs: a call
    site's eager fallback and the reference its kernel is checked against."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(region.inputs):
        env[n] = graph.placeholder(f"in{i}")
        env[n].meta = dict(n.meta)
    for n in region.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in region.outputs))
    return fx.GraphModule(nn.Module(), graph, class_name="RegionFallback")
