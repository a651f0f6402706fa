"""The lean runtime: one generated Python forward per lowered graph and input layout.

Where it belongs: after lowering (:mod:`.lower` builds the kernel call sites), between the caller
(:class:`graphopt.OptimizedModule`) and the kernels. The general path runs a lowered graph through
its call sites, and each site works out per call what a generated forward settles once: the layout of
its inputs, the shape bucket and its config, the output strides, the kernels' grids and arguments.
As Inductor does, :class:`Runtime` instead writes the graph out as Python source the first time it
meets an input layout (shapes, strides, dtypes and devices of the graph's inputs) and calls that
source from then on:

- one guard at entry compares each input's shape, strides, dtype and device with the layout the
  source was written for; a miss returns ``None`` and the runtime takes another forward or the
  general path;
- ATen nodes are direct calls of their ``torch.ops`` overloads, sizes read off the inputs are
  literals (the guard pins them), and each value is released (``del``) after its last use;
- each kernel call site is its launch plan (:class:`~.launches.LaunchPlan`) written out:
  ``torch.empty_strided`` for its outputs, then ``kernel[grid](..., BLOCK=..., num_warps=...)`` with
  the grid, sizes, strides and config as literals; a site whose config is the ATen candidate (or
  whose inputs are laid out otherwise than at capture) has its region's ATen ops inline instead;
- on a GPU, each launch calls the launcher Triton compiled for its kernel directly (as Inductor's
  generated code does), with the arguments ``JITFunction.run`` passed it on the generating run
  (:class:`~.launches.LaunchBinder`): no argument binding, specialisation key or cache lookup per
  launch. The forward reads the current stream once, and its guard also pins the current device. Before
  the forward is used, it runs once on the generating call's inputs and must give that call's outputs;
  if it does not (or fails), it is written again with ``kernel[grid]`` launches and a warning says why.
  ``GRAPHOPT_DIRECT_LAUNCH=0`` (or ``Runtime(direct_launch=False)``) keeps ``kernel[grid]`` launches.

The tuner, the tuning cache and the verifier run while a forward is generated (the generating call
goes through the general path, which picks each site's config), never on the call path of a
generated forward. A ``tune()`` of any call site retires the forwards that baked in the old configs.
With ``GRAPHOPT_DUMP_KERNELS=dir`` each forward's source is written to ``dir`` beside the kernels,
and its tracebacks point into that file.

Buffers are reused (:mod:`.buffers`): a kernel output or workspace whose last view has died serves
the next allocation of its size instead of a new tensor from PyTorch's caching allocator
(``Runtime(reuse_buffers=False)`` allocates every one). On a GPU such a forward, too, runs once on the
generating call's inputs and is written again without reuse if its outputs differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import keyword
import math
import operator
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from graphopt.verify import compare

from .buffers import BufferPlanner, BufferStats, StorageKey, storage_keys
from .launches import AtenCall, DirectLaunch, LaunchBinder, Ref, Streams, triton_streams

if TYPE_CHECKING:
    from .sites import SitePlan, _Tuned

Layout = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], ...]

MAX_FORWARDS = 8
"""Input layouts a :class:`Runtime` writes a forward for; calls in further layouts take the general path."""

# ops whose int result is a size of a guarded input: written as a literal
_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
             torch.ops.aten.sym_storage_offset.default}
_INT_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg}


def layout_of(tensors: Sequence[torch.Tensor]) -> Layout:
    """What a generated forward is specialised on: each input's shape, strides, dtype and device."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


@dataclasses.dataclass(frozen=True)
class GeneratedForward:
    """One generated forward: its source, the compiled function and the layout it guards for.

    ``fn(*tensors)`` returns the graph's outputs as a tuple, or ``None`` when ``tensors`` are not
    laid out as ``layout`` says (nothing has run then). ``path`` is the dumped source file, if any.
    """

    name: str
    source: str
    fn: Callable[..., tuple[torch.Tensor, ...] | None]
    layout: Layout
    path: Path | None = None
    launches: int = 0
    """Kernel launches in the source."""
    direct_launches: int = 0
    """Those that call Triton's compiled launcher directly (the others go through ``kernel[grid]``)."""
    buffers: BufferStats = dataclasses.field(default_factory=BufferStats)
    """Its allocations, and how many of them take over a dead buffer (:mod:`.buffers`)."""
    portable: Portable | None = None
    """The same forward launching through ``kernel[grid]``, to be stored (:mod:`.stored`); when asked for."""


@dataclasses.dataclass(frozen=True)
class Portable:
    """A forward's source with every kernel launched through ``kernel[grid]`` (nothing bound to this
    process's compiled launchers), its namespace, and the graph attribute each weight in it came from."""

    name: str
    source: str
    namespace: dict[str, Any]
    attrs: dict[str, str]
    layout: Layout


@dataclasses.dataclass
class RuntimeStats:
    """Counts of one :class:`Runtime`'s calls by the path they took."""

    generated: int = 0
    """Forwards written (each costs one call on the general path)."""
    hits: int = 0
    """Calls served by a generated forward."""
    general: int = 0
    """Calls run on the general path without writing a forward (the layout limit was reached)."""


class Runtime:
    """Calls a lowered graph through a forward generated per input layout, the general path otherwise.

    ``runtime(tensors)`` takes the graph's flat input tensors and returns its outputs as a tuple.
    ``dump_dir``: where to write each forward's source (``None``: nowhere). ``max_forwards``: how many
    layouts get a forward of their own. ``direct_launch``: launch compiled kernels through their launchers
    (``True``: where the inputs are on a GPU and ``GRAPHOPT_DIRECT_LAUNCH`` is not ``0``; ``False``:
    always through ``kernel[grid]``; a :class:`~.launches.Streams`: with that device and stream source).
    ``reuse_buffers``: a dead buffer serves the next allocation of its size (:mod:`.buffers`).
    """

    def __init__(self, graph_module: fx.GraphModule, *, dump_dir: str | os.PathLike | None = None,
                 max_forwards: int = MAX_FORWARDS, direct_launch: bool | Streams = True,
                 reuse_buffers: bool = True):
        self.graph_module = graph_module
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.max_forwards = max_forwards
        self.direct_launch = direct_launch
        self.reuse_buffers = reuse_buffers
        self.on_generated: Callable[[GeneratedForward], None] | None = None
        """Called with each forward written, which then carries its :attr:`~GeneratedForward.portable` form."""
        self.stats = RuntimeStats()
        self._forwards: dict[Layout, GeneratedForward] = {}
        self._last: Callable[..., tuple[torch.Tensor, ...] | None] | None = None
        from .sites import _Tuned  # here: the sites pull in the kernel library, a stored forward needs none of it

        self._epochs = tuple({id(m.epoch): m.epoch for m in graph_module.modules() if isinstance(m, _Tuned)}.values())
        self._epoch_values = self._read_epochs()

    @property
    def forwards(self) -> tuple[GeneratedForward, ...]:
        """The forwards written so far, oldest first."""
        return tuple(self._forwards.values())

    def retuned(self) -> bool:
        """Whether a site was tuned since the forwards were written: the configs they (and any CUDA
        graph recorded through them) launch with are stale. The next call writes new ones."""
        return any(epoch.value != seen for epoch, seen in zip(self._epochs, self._epoch_values))

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.retuned():
            self.clear()
        if self._last is not None and (out := self._last(*tensors)) is not None:
            self.stats.hits += 1
            return out
        layout = layout_of(tensors)
        if (forward := self._forwards.get(layout)) is not None:
            out = forward.fn(*tensors)
            if out is not None:
                self._last = forward.fn
                self.stats.hits += 1
                return out
            # refused its own layout: its launches were bound on another current device
        if forward is not None or len(self._forwards) >= self.max_forwards:
            self.stats.general += 1
            return tuple(self.graph_module(*tensors))
        out, forward = generate_forward(self.graph_module, tensors, name=f"forward_{len(self._forwards)}",
                                        dump_dir=self.dump_dir, streams=self._streams(tensors),
                                        reuse_buffers=self.reuse_buffers, portable=self.on_generated is not None)
        self._forwards[layout] = forward
        self._last = forward.fn
        self.stats.generated += 1
        if self.on_generated is not None:
            self.on_generated(forward)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # a copy holds copied parameters: it writes forwards of its own rather than share these
        state = dict(self.__dict__)
        state["_forwards"], state["_last"], state["on_generated"] = {}, None, None
        return state

    def _streams(self, tensors: Sequence[torch.Tensor]) -> Streams | None:
        return launch_streams(tensors, self.direct_launch)

    def clear(self) -> None:
        """Drop every generated forward (the next call in each layout writes a new one)."""
        self._forwards.clear()
        self._last = None
        self._epoch_values = self._read_epochs()

    def _read_epochs(self) -> tuple[int, ...]:
        return tuple(e.value for e in self._epochs)


def launch_streams(tensors: Sequence[torch.Tensor], direct_launch: bool | Streams = True) -> Streams | None:
    """Where a forward for ``tensors`` binds its launches to compiled launchers: ``direct_launch`` itself when
    it is a :class:`~.launches.Streams`, Triton's driver where it is ``True``, the inputs are on a GPU,
    the kernels are compiled (not interpreted) and ``GRAPHOPT_DIRECT_LAUNCH`` is not ``0``; else ``None``
    (every launch through ``kernel[grid]``)."""
    if isinstance(direct_launch, Streams):
        return direct_launch
    if (not direct_launch or os.environ.get("GRAPHOPT_DIRECT_LAUNCH", "1") == "0"
            or os.environ.get("TRITON_INTERPRET") == "1" or not any(t.is_cuda for t in tensors)):
        return None
    return triton_streams()


def generate_forward(gm: fx.GraphModule, tensors: Sequence[torch.Tensor], *, name: str = "forward",
                     dump_dir: str | os.PathLike | None = None, streams: Streams | None = None,
                     reuse_buffers: bool = True, portable: bool = False
                     ) -> tuple[tuple[torch.Tensor, ...], GeneratedForward]:
    """Run ``gm`` once on ``tensors`` through its call sites and write its forward for their layout.

    Returns the outputs of that run and the forward. Every call site chooses its config here, as on
    the general path (from the tuning cache, by tuning, or the default). With ``streams``, compiled
    kernels are launched through their launchers (:class:`~.launches.LaunchBinder`); with
    ``reuse_buffers``, dead buffers serve later allocations (:mod:`.buffers`). A forward with direct
    launches, or on a GPU with reused buffers, is run once on ``tensors`` and kept only if it gives the
    same outputs, else written again without either, with a warning. With ``portable``, the forward
    also carries its :class:`Portable` form.
    """
    recorder = _Recorder(gm, streams)
    with torch.no_grad():
        outputs = tuple(recorder.run(*tensors))
    layout = layout_of(tensors)
    aligned = tuple(aligned_inputs(tensors))
    forward = _compile(_Writer(gm, recorder, layout, name, streams, reuse_buffers, aligned), name, layout, dump_dir)
    if _needs_check(forward, tensors):
        why = _mismatch(forward, tensors, outputs)
        if why is not None:
            done = [w for w, n in (("direct launches of the compiled kernels", forward.direct_launches),
                                   ("buffer reuse", forward.buffers.reused)) if n]
            warnings.warn(f"graphopt: {name} with {' and '.join(done)} {why}; it is written again without "
                          "(kernel[grid] launches, a buffer per allocation)", RuntimeWarning, stacklevel=2)
            forward = _compile(_Writer(gm, recorder, layout, name, None, False), name, layout, dump_dir)
            reuse_buffers = False
    if portable:
        writer = _Writer(gm, recorder, layout, name, None, reuse_buffers)
        source, namespace = writer.source()
        forward = dataclasses.replace(forward, portable=Portable(name, source, namespace, writer.attrs, layout))
    return outputs, forward


def _compile(writer: _Writer, name: str, layout: Layout, dump_dir: str | os.PathLike | None) -> GeneratedForward:
    source, namespace = writer.source()
    return compile_forward(source, namespace, name, layout, dump_dir, writer.launches, writer.direct_launches,
                           writer.buffers.stats)


def compile_forward(source: str, namespace: dict[str, Any], name: str, layout: Layout,
                    dump_dir: str | os.PathLike | None = None, launches: int = 0, direct_launches: int = 0,
                    buffers: BufferStats | None = None) -> GeneratedForward:
    """Execute a forward's ``source`` in ``namespace`` (dumped to ``dump_dir`` first, so that tracebacks
    point into the file) and return it as a :class:`GeneratedForward` for ``layout``."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    path = None
    filename = f"<graphopt generated {name}_{digest}>"
    if dump_dir is not None:
        path = Path(dump_dir) / f"{name}_{digest}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        filename = str(path)
    code = compile(source, filename, "exec")
    exec(code, namespace)  # noqa: S102 - our own generated source, written just above
    return GeneratedForward(name, source, namespace[name], layout, path, launches, direct_launches,
                            buffers or BufferStats())


def _needs_check(forward: GeneratedForward, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``forward`` is run once against the generating run before it is used: with direct launches,
    and on a GPU with reused buffers (elsewhere, i.e. under Triton's interpreter, that run would cost
    as much as the call itself)."""
    return bool(forward.direct_launches or (forward.buffers.reused and any(t.is_cuda for t in tensors)))


def _mismatch(forward: GeneratedForward, tensors: Sequence[torch.Tensor],
                     outputs: Sequence[torch.Tensor]) -> str | None:
    """Why ``forward`` (with direct launches or reused buffers) cannot stand in for the generating run,
    or ``None``."""
    try:
        with torch.no_grad():
            got = forward.fn(*tensors)
    except Exception as e:  # noqa: BLE001 - any failure of the fast path sends us back to the checked one
        return f"failed ({type(e).__name__}: {e})"
    if got is None:
        return "were refused by its own guard"
    cmp = compare(got, outputs)
    return None if cmp.within else f"gave other outputs than the generating run ({cmp.line()})"


class _Recorder(fx.Interpreter):
    """Runs a lowered graph as the general path does, keeping each site's plan and each size it read
    (and, with ``streams``, each kernel call's :class:`~.launches.DirectLaunch`)."""

    def __init__(self, gm: fx.GraphModule, streams: Streams | None = None):
        super().__init__(gm)
        self.streams = streams
        self.sites: dict[fx.Node, tuple[_Tuned, SitePlan, tuple[torch.Tensor, ...]]] = {}
        self.launches: dict[fx.Node, list[DirectLaunch | None]] = {}
        self.sizes: dict[fx.Node, int] = {}
        self.storages: dict[fx.Node, tuple[StorageKey | None, ...]] = {}
        """Each node's tensors' storages (:func:`~.buffers.storage_keys`): which values view which."""
        self.tensors: set[fx.Node] = set()
        """The nodes whose value is one tensor."""

    def run_node(self, n: fx.Node) -> Any:
        from .sites import _Tuned

        if n.op == "call_module" and isinstance(site := self.fetch_attr(n.target), _Tuned):
            args = tuple(self.env[a] if isinstance(a, fx.Node) else a for a in n.args)
            planned = site.plan_for(*args)
            self.sites[n] = (site, planned, args)
            if self.streams is None:
                out = planned.run(site, args)
            else:
                binder = LaunchBinder(self.streams)
                out = planned.run(site, args, binder)
                self.launches[n] = binder.launches
        else:
            out = super().run_node(n)
            if n.op == "call_function" and type(out) is int and (n.target in _SIZE_OPS or (
                    n.target in _INT_OPS and all(a in self.sizes for a in n.all_input_nodes))):
                self.sizes[n] = out
        self.storages[n] = storage_keys(out)
        if isinstance(out, torch.Tensor):
            self.tensors.add(n)
        return out


@dataclasses.dataclass(frozen=True)
class _Kept:
    """Where the last view of a dead buffer was kept for reuse, not deleted."""

    name: str


class _Writer:
    """Writes a lowered graph as the source of one Python function for one input layout."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder, layout: Layout, name: str,
                 streams: Streams | None = None, reuse_buffers: bool = True, aligned: Sequence[int] = ()):
        self.gm, self.recorder, self.layout, self.name = gm, recorder, layout, name
        self.streams = streams
        self.aligned = aligned  # the inputs whose data was 16-byte aligned at generation, by position
        self.buffers = BufferPlanner(reuse_buffers)
        self.namespace: dict[str, Any] = {"torch": torch}
        self.attrs: dict[str, str] = {}  # namespace name -> the graph attribute (a weight) it is bound to
        self._const_names: dict[object, str] = {}
        self._taken: set[str] = {"torch", name, "_compiled_kernels"} | {n.name for n in gm.graph.nodes}
        self.lines: list[str | _Kept] = []
        self.launches = 0
        self.direct_launches = 0
        self._device: int | None = None  # the device the direct launches were bound on
        self._stream = self.local("stream")

    # ---- names

    def const(self, value: Any, hint: str) -> str:
        """A module-level name bound to ``value`` (one name per object, or per value for dtypes and devices)."""
        key = value if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)) else id(value)
        if (known := self._const_names.get(key)) is not None:
            return known
        base = re.sub(r"\W+", "_", hint).strip("_") or "c"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = f"c_{base}"
        name = fresh_name(base, self._taken)
        self._const_names[key] = name
        self.namespace[name] = value
        return name

    def local(self, hint: str) -> str:
        return fresh_name(re.sub(r"\W+", "_", hint), self._taken)

    def expr(self, value: Any, env: dict[fx.Node, str]) -> str:
        """``value`` (a node argument) as a Python expression."""
        if isinstance(value, fx.Node):
            return env[value]
        if (text := literal(value)) is not None:
            return text
        if isinstance(value, tuple):
            inner = ", ".join(self.expr(v, env) for v in value)
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        if isinstance(value, list):
            return "[" + ", ".join(self.expr(v, env) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self.expr(v, env)}" for k, v in value.items()) + "}"
        if isinstance(value, torch.dtype):
            return self.const(value, str(value).replace(".", "_"))
        if isinstance(value, torch.device):
            return self.const(value, f"device_{value}")
        return self.const(value, type(value).__name__.lower())

    def function(self, target: Any) -> str:
        if isinstance(target, torch._ops.OpOverload):
            return self.const(target, str(target))  # aten.linear.default -> aten_linear_default
        return self.const(target, getattr(target, "__name__", "fn"))

    # ---- statements

    def source(self) -> tuple[str, dict[str, Any]]:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, str] = {n: n.name for n in placeholders}
        self._guard(placeholders)
        guard_end = len(self.lines)
        last_use = _last_uses(graph)
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                self.lines.append(f"return {self.expr(tuple(_flat_outputs(node)), env)}")
                break
            self._node(node, env)
            if env.get(node) == node.name and node in self.recorder.storages:
                self.buffers.alias(node.name, self.recorder.storages[node], node in self.recorder.tensors)
            dead = [env[a] for a in last_use.get(node, ()) if a.op not in ("placeholder", "get_attr")
                    and a in env and env[a].isidentifier() and not self._is_const(env[a])]
            self._delete(list(dict.fromkeys(dead)))
        if self._device is not None:
            assert self.streams is not None
            device = self.const(self.streams.device, "current_device")
            stream = self.const(self.streams.stream, "current_stream")
            self.lines[guard_end:guard_end] = launcher_guard(device, stream, self._device, self._stream,
                                                             [env[placeholders[i]] for i in self.aligned])
        shapes = ", ".join("x".join(map(str, shape)) or "scalar" for shape, _, _, _ in self.layout)
        head = [f"# graphopt: generated forward of {type(self.gm).__name__} for inputs {shapes}",
                "# each kernel call site's config, grid, sizes and strides are literals for this layout;",
                "# a call in another layout returns None at the guard and the runtime takes another path;",
                "# torch.export's input guards and metadata assertions are left out: the entry guard implies them",
                "", "", f"def {self.name}({', '.join(env[p] for p in placeholders)}):"]
        lines = [(None if line.name in self.buffers.taken else f"del {line.name}") if isinstance(line, _Kept)
                 else line for line in self.lines]
        body = ["    " + line if line else "" for line in lines if line is not None]
        return "\n".join(head + body) + "\n", self.namespace

    def _is_const(self, name: str) -> bool:
        return name in self.namespace

    def _delete(self, names: Sequence[str]) -> None:
        """``del`` of ``names`` at their last use, but for buffers kept for reuse (a :class:`_Kept`
        line, a ``del`` after all if no allocation takes the buffer over)."""
        deleted, kept = self.buffers.release(names)
        if deleted:
            self.lines.append(f"del {', '.join(deleted)}")
        self.lines += [_Kept(name) for name in kept]

    def _guard(self, placeholders: Sequence[fx.Node]) -> None:
        if len(placeholders) != len(self.layout):
            raise ValueError(f"the graph takes {len(placeholders)} inputs, the layout describes {len(self.layout)}")
        tests = []
        for p, (shape, strides, dtype, device) in zip(placeholders, self.layout):
            tests.append(f"{p.name}.dtype is not {self.expr(dtype, {})} or {p.name}.shape != {shape!r} "
                         f"or {p.name}.stride() != {strides!r} or {p.name}.device != {self.expr(device, {})}")
        if tests:
            self.lines += ["if (" + "\n        or ".join(tests) + "):", "    return None"]

    def _node(self, node: fx.Node, env: dict[fx.Node, str]) -> None:
        if _implied_by_guard(node):
            return
        if node.op == "get_attr":
            env[node] = self.const(_fetch(self.gm, node.target), f"p_{node.target}")
            self.attrs[env[node]] = str(node.target)
        elif node.op == "call_module":
            if node in self.recorder.sites:
                self._site(node, env)
            else:
                module = self.const(_fetch(self.gm, node.target), f"m_{node.target}")
                self._call(node, env, f"{module}.forward")
        elif node.op == "call_function":
            if node in self.recorder.sizes:
                env[node] = repr(self.recorder.sizes[node])
            elif node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                    and node.args[0] in self.recorder.sites:
                pass  # named by the site that produced it
            elif node.target is operator.getitem:
                env[node] = node.name
                self.lines.append(f"{node.name} = {self.expr(node.args[0], env)}[{self.expr(node.args[1], env)}]")
            else:
                self._call(node, env, self.function(node.target))
        elif node.op == "call_method":
            env[node] = node.name
            args = [self.expr(a, env) for a in node.args[1:]] + [f"{k}={self.expr(v, env)}" for k, v in node.kwargs.items()]
            self.lines.append(f"{node.name} = {self.expr(node.args[0], env)}.{node.target}({', '.join(args)})")
        else:
            raise ValueError(f"cannot generate code for a {node.op} node ({node.name})")

    def _call(self, node: fx.Node, env: dict[fx.Node, str], fn: str, name: str | None = None) -> None:
        env[node] = name or node.name
        args = [self.expr(a, env) for a in node.args] + [f"{k}={self.expr(v, env)}" for k, v in node.kwargs.items()]
        target = f"{env[node]} = " if node.users or name else ""
        self.lines.append(f"{target}{fn}({', '.join(args)})")

    def _site(self, node: fx.Node, env: dict[fx.Node, str]) -> None:
        site, planned, args = self.recorder.sites[node]
        site_name = str(node.target).rsplit(".", 1)[-1]
        n_out = len(site.fallback.graph.find_nodes(op="output")[0].args[0])
        outs: list[str | None] = [None] * n_out
        for user in node.users:
            if user.target is operator.getitem:
                outs[user.args[1]] = user.name
                env[user] = user.name
        unused = [self.local(f"{site_name}_out{j}") for j, o in enumerate(outs) if o is None]
        named = iter(unused)
        outs = [o if o is not None else next(named) for o in outs]
        inputs = [self.expr(a, env) for a in node.args]
        if planned.plan is None:
            why = "ATen chosen" if planned.config is not None else "inputs laid out otherwise than at capture"
            self.lines.append(f"# {site_name}: {site.kernel_name} -> the region's ATen ops ({why})")
            self._inline(site.fallback, inputs, outs, site_name)
        else:
            config = " ".join(f"{k}={v}" for k, v in planned.config.items())
            self.lines.append(f"# {site_name}: {site.kernel_name} [{config}]")
            launches = self.recorder.launches.get(node, []) if self.streams is not None else []
            self._plan(planned, inputs, outs, site_name, args, launches, self.recorder.storages.get(node, ()))
        storages = self.recorder.storages.get(node, ())
        for j, out in enumerate(outs):  # an output of the region's ATen ops may view a planned buffer
            if j < len(storages):
                self.buffers.alias(out, storages[j:j + 1], True)
        self._delete(unused)

    def _inline(self, fallback: fx.GraphModule, inputs: list[str], outs: list[str], prefix: str) -> None:
        """The region's own ATen nodes, their results named for the site's outputs."""
        graph = fallback.graph
        output = graph.find_nodes(op="output")[0]
        results = list(output.args[0])
        env: dict[fx.Node, str] = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, inputs))
        named: dict[fx.Node, str] = {}
        aliases = []
        for j, r in enumerate(results):
            if r.op == "placeholder" or r in named:
                aliases.append(f"{outs[j]} = {env[r] if r.op == 'placeholder' else named[r]}")
            else:
                named[r] = outs[j]
        last_use = _last_uses(graph)
        for n in graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op != "call_function":
                raise ValueError(f"cannot inline a {n.op} node of a region's ATen ops ({n.name})")
            if n.target is operator.getitem:
                env[n] = named.get(n) or self.local(f"{prefix}_{n.name}")
                self.lines.append(f"{env[n]} = {self.expr(n.args[0], env)}[{self.expr(n.args[1], env)}]")
            else:
                self._call(n, env, self.function(n.target), named.get(n) or self.local(f"{prefix}_{n.name}"))
            dead = [env[a] for a in last_use.get(n, ()) if a.op != "placeholder" and a not in named]
            if dead:
                self.lines.append(f"del {', '.join(dead)}")
        self.lines += aliases

    def _plan(self, planned: SitePlan, inputs: list[str], outs: list[str], prefix: str,
              args: Sequence[torch.Tensor], launches: Sequence[DirectLaunch | None],
              storages: Sequence[StorageKey | None]) -> None:
        plan = planned.plan
        assert plan is not None
        names = {name: inputs[i] for name, i in zip(plan.inputs, planned.inputs)}
        scratch = []
        for j, out in enumerate(plan.outputs):
            names[out] = outs[j]
        for name, source, dtype in plan.casts:
            names[name] = self.local(f"{prefix}_{name}")
            scratch.append(names[name])
            self.lines.append(f"{names[name]} = {names[source]}.to({self.expr(dtype, {})}).contiguous()")
        device = args[planned.inputs[0]].device if planned.inputs else args[0].device
        output = {name: j for j, name in enumerate(plan.outputs)}
        for b in plan.buffers:
            if b.name not in names:
                names[b.name] = self.local(f"{prefix}_{b.name}")
                scratch.append(names[b.name])
            j = output.get(b.name)
            recorded = storages[j] if j is not None and j < len(storages) else None
            self.lines += self.buffers.allocate(names[b.name], b.shape, b.strides, b.dtype, device,
                                                lambda v: self.expr(v, {}), zero=b.zero, recorded=recorded)
        kernel_calls = 0
        for call in plan.calls:
            if isinstance(call, AtenCall):
                if call.result not in names:
                    names[call.result] = self.local(f"{prefix}_{call.result}")
                    scratch.append(names[call.result])
                call_args = [names[a.name] if isinstance(a, Ref) else self.expr(a, {}) for a in call.args]
                self.lines.append(f"{names[call.result]} = {self.function(call.op)}({', '.join(call_args)})")
                continue
            kernel = self.const(call.kernel, getattr(call.kernel, "__name__", "kernel"))
            direct = launches[kernel_calls] if kernel_calls < len(launches) else None
            kernel_calls += 1
            self.launches += 1
            if direct is not None and self._device in (None, direct.device):
                self._device = direct.device
                self.direct_launches += 1
                launcher = self.const(direct.launcher, f"{kernel}_launcher")
                self.namespace.setdefault("_compiled_kernels", []).append(direct.compiled)  # kept loaded
                metadata = self.const(direct.metadata, f"{kernel}_metadata")
                bound = [names[a.name] if isinstance(a, Ref) else self.expr(a, {}) for a in direct.args]
                function = self.expr(direct.function, {})
                self.lines.append(direct_launch_line(launcher, direct.grid, self._stream, function, metadata, bound,
                                                     kernel))
                continue
            call_args = [names[a.name] if isinstance(a, Ref) else self.expr(a, {}) for a in call.args]
            constexprs = [f"{k}={self.expr(v, {})}" for k, v in call.constexprs]
            self.lines.append(f"{kernel}[{call.grid!r}]({', '.join(call_args + constexprs)})")
        self._delete(scratch)


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first not in ``taken``, which it joins."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def literal(value: Any) -> str | None:
    """``value`` as a Python literal (``None``, a bool, int, str or float), or ``None`` where it is none."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    return None


def aligned_inputs(tensors: Sequence[Any]) -> list[int]:
    """The positions of the tensors whose data is 16-byte aligned: Triton compiles a kernel for pointers
    so aligned (and another for others), so a launcher bound for aligned inputs must not take others."""
    return [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and t.data_ptr() % 16 == 0]


def launcher_guard(device_fn: str, stream_fn: str, device: int, stream: str, aligned: Sequence[str] = ()) -> list[str]:
    """The lines after a forward's entry guard when it calls compiled launchers: they were bound on
    ``device``, for the inputs ``aligned`` (by name) at 16 bytes, so another current device or an
    unaligned view of one of those inputs returns ``None``; ``stream`` is read once for every launch."""
    misaligned = "".join(f" or {name}.data_ptr() % 16" for name in aligned)
    return [f"if {device_fn}() != {device}{misaligned}:  # the compiled launchers below were bound for this",
            "    return None", f"{stream} = {stream_fn}({device})"]


def direct_launch_line(launcher: str, grid: Sequence[int], stream: str, function: str, metadata: str,
                       args: Sequence[str], kernel: str) -> str:
    """One :class:`~.launches.DirectLaunch` as a source line: Triton's launcher convention (grid, stream,
    function, metadata, no launch hooks, the bound arguments), every part already written as source."""
    head = ", ".join([*map(str, grid), stream, function, metadata])
    return f"{launcher}({head}, None, None, None, {', '.join(args)})  # {kernel}"


def _implied_by_guard(node: fx.Node) -> bool:
    """torch.export's input guards and tensor-metadata assertions: the entry guard, which pins every
    input's shape, strides, dtype and device, implies them (they passed on the generating run)."""
    if node.users:
        return False
    return (node.op == "call_module" and node.target == "_guards_fn") or (
        node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in str(target).split("."):
        value = getattr(value, part)
    return value


def _flat_outputs(output: fx.Node) -> list[Any]:
    value = output.args[0]
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last use it is (never the graph's outputs)."""
    nodes = list(graph.nodes)
    output = nodes[-1]
    last: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last[a] = n
    uses: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last.items():
        if user is not output:
            uses.setdefault(user, []).append(value)
    return uses
