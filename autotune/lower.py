"""Lower a captured graph onto Triton: each region becomes one kernel call, the rest stays ATen.

Where it belongs: the last step of ``optimize(..., target="cuda")``, after the rewrite passes. It
partitions the graph (:mod:`.regions`), generates a kernel per pointwise or norm region
(:mod:`.codegen`; a pointwise region fed by a linear that nothing else reads takes the linear in, as
a GEMM-epilogue site of :mod:`.gemm`; ATConv's kernel generation joins its convolution, :mod:`.atconv`),
and rebuilds the graph with one ``call_module`` per region, each a call site of :mod:`.sites`.
Regions whose kernel cannot be built stay on ATen, named in the :class:`LoweringReport` with the
reason. :mod:`.check` runs the result site by site against the ATen ops; :mod:`.runtime`
calls it through generated forwards. With ``GRAPHOPT_DUMP_KERNELS=dir``, ``regions.txt`` in ``dir``
says which graph nodes and modules each region came from.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
import operator
from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from graphopt.errors import first_line

from .check import call_sites, check_regions  # noqa: F401 - lowering's check, importable from here as before
from .atconv import ATConvRegion
from .atconv import fuse as fuse_atconv
from .codegen import generate
from .gemm import GemmRegion, absorbed_linear
from .regions import Partition, Region, classify, op_name, partition
# the call sites lowering builds, importable from here as before
from .sites import (DUMP_ENV, ChoiceEpoch, FamilyRegion, FusedRegion, KernelLibrary, SitePlan,  # noqa: F401
                    TuningOptions, _Decline, _Tuned, family_ops, region_graph)


GENERATION_ERRORS = (SyntaxError, ValueError, TypeError, AttributeError, NotImplementedError)
"""What a kernel generator raises on a region it gets wrong: the region stays as it was, with the reason
reported, instead of failing the whole model."""


@dataclasses.dataclass(frozen=True)
class LoweredRegion:
    name: str
    kind: str
    kernel: str
    ops: tuple[str, ...]
    modules: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoweringReport:
    """What lowering did: regions by kind, distinct kernels, what stayed on ATen, the measured error."""

    regions: tuple[LoweredRegion, ...]
    kernels: int
    nodes_lowered: int
    left_on_aten: tuple[tuple[str, int], ...]
    declined: tuple[tuple[str, str], ...]
    max_abs_error: float
    max_rel_error: float
    time_s: float
    dump_dir: str | None
    unfused: tuple[tuple[str, str], ...] = ()
    """Linears that could have joined their epilogue region but did not, with the reason."""
    tolerance: str = ""
    """The bound the whole lowered graph was held to (:attr:`graphopt.verify.Comparison.tolerance`)."""
    on_aten: tuple[str, ...] = ()
    """Call sites that run their ATen ops at the example inputs' shape: untuned softmax attention (SDPA),
    lone pointwise ops and one-op GEMM epilogues (nothing to fuse), or sites where tuning timed ATen
    faster."""

    def text(self) -> str:
        """The report's ``lower:`` lines: calls by kind, kernels, error, what stayed on ATen and why."""
        kinds: dict[str, int] = {}
        for r in self.regions:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        kind_text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        aten = ", ".join(f"{op} x{n}" for op, n in self.left_on_aten) or "nothing"
        lines = [f"lower: {self.nodes_lowered} nodes -> {len(self.regions)} kernel calls ({kind_text}), "
                 f"{self.kernels} distinct generated kernels, max abs err {self.max_abs_error:.2e}, "
                 f"max rel err {self.max_rel_error:.2e}, {self.time_s:.2f}s; left on ATen: {aten}"]
        if self.tolerance:
            lines.append(f"lower: verified against the original model, {self.tolerance}")
        if self.on_aten:
            lines.append(f"lower: {len(self.on_aten)} of these call sites run their ATen ops (softmax attention, "
                         f"lone pointwise ops and one-op GEMM epilogues until tuning times their kernels "
                         f"faster, or ATen timed faster): {', '.join(self.on_aten)}")
        by_reason: dict[str, list[str]] = {}
        for node, reason in self.declined:
            by_reason.setdefault(reason, []).append(node)
        lines += [f"lower: {len(nodes)} region(s) left on ATen ({', '.join(nodes)}): {reason}"
                  for reason, nodes in by_reason.items()]
        unfused: dict[str, list[str]] = {}
        for node, reason in self.unfused:
            unfused.setdefault(reason, []).append(node)
        lines += [f"lower: {len(nodes)} linear(s) on cuBLAS apart from their epilogue kernel ({', '.join(nodes)}): "
                  f"{reason}" for reason, nodes in unfused.items()]
        if self.dump_dir:
            lines.append(f"lower: kernel sources in {self.dump_dir}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> LoweringReport:
        data = dict(data)
        data["regions"] = tuple(LoweredRegion(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                                for r in data["regions"])
        data["left_on_aten"] = tuple(tuple(x) for x in data["left_on_aten"])
        data["declined"] = tuple(tuple(x) for x in data["declined"])
        data["unfused"] = tuple(tuple(x) for x in data.get("unfused", ()))
        data["on_aten"] = tuple(data.get("on_aten", ()))
        return LoweringReport(**data)


@dataclasses.dataclass(frozen=True)
class Lowered:
    graph_module: fx.GraphModule
    partition: Partition
    regions: tuple[LoweredRegion, ...]
    declined: tuple[tuple[str, str], ...]
    library: KernelLibrary
    left_on_aten: tuple[tuple[str, int], ...]
    """The partition's ops left on ATen, less those a call site took in (a gemm's linear, ATConv's generator)."""
    unfused: tuple[tuple[str, str], ...]
    """Linears a pointwise region could have absorbed but did not, with the reason."""


def lower(gm: fx.GraphModule, *, library: KernelLibrary | None = None,
          options: TuningOptions = TuningOptions()) -> Lowered:
    """A new GraphModule running ``gm``'s regions as kernels (``gm`` is left as it was).

    The new module shares ``gm``'s parameters. Regions whose kernel cannot be built are left on ATen
    and listed in ``declined`` with the reason.
    """
    library = library or KernelLibrary.from_env()
    part = partition(gm)
    kernels: dict[str, nn.Module] = {}
    placed: dict[fx.Node, tuple[str, Region]] = {}
    lowered: list[LoweredRegion] = []
    declined: list[tuple[str, str]] = []
    unfused: list[tuple[str, str]] = []
    epoch = ChoiceEpoch()  # shared by the sites: a tune() of any of them retires generated forwards
    regions, chains = fuse_atconv(part.regions)
    for i, region in enumerate(regions):
        name = f"r{len(kernels)}"
        try:
            if i in chains:
                module: _Tuned = ATConvRegion(region, options, epoch)
            elif region.kind == "attention":
                module = FamilyRegion(region, options, epoch)
            elif (gemm := _gemm(region, library, options, epoch, unfused)) is not None:
                module, region = gemm, gemm.region
            else:
                module = FusedRegion(generate(region), library, region_graph(region), options, epoch)
        except _Decline as e:
            declined.append((region.nodes[0].name, str(e)))
            continue
        except GENERATION_ERRORS as e:
            # a region this generator gets wrong stays on ATen, named in the report, instead of failing
            # the whole model (a Triton compile error only surfaces at the first launch, in the check)
            declined.append((region.nodes[0].name, f"kernel generation failed: {type(e).__name__}: {first_line(e)}"))
            continue
        kernels[name] = module
        for n in region.nodes:
            placed[n] = (name, region)
        lowered.append(LoweredRegion(name, region.kind, module.kernel_name, tuple(region.ops()),
                                     tuple(region.modules())))
    graph = _rebuild(gm.graph, placed)
    root = nn.Module()
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            head = str(n.target).split(".")[0]
            if not hasattr(root, head):
                setattr(root, head, getattr(gm, head))
    root.add_module("graphopt_kernels", nn.ModuleDict(kernels))
    out = fx.GraphModule(root, graph, class_name="LoweredGraph")
    library.write_index(_index(lowered))
    # ops the partition left on ATen that a call site took in (a gemm's linear, ATConv's generator)
    taken = Counter(op_name(n) for n in placed if classify(n) is None)
    left_on_aten = tuple((op, n - taken[op]) for op, n in part.left_on_aten if n > taken[op])
    return Lowered(out, part, tuple(lowered), tuple(declined), library, left_on_aten, tuple(unfused))


def _gemm(region: Region, library: KernelLibrary, options: TuningOptions, epoch: ChoiceEpoch,
          unfused: list[tuple[str, str]]) -> GemmRegion | None:
    """The GEMM-epilogue call site of a pointwise region that can absorb its producing linear, else None
    (a fusion declined here leaves the region a plain pointwise kernel; the reason is reported)."""
    if (linear := absorbed_linear(region)) is None:
        return None
    try:
        return GemmRegion(linear, region, library, options, epoch)
    except _Decline as e:
        unfused.append((linear.name, str(e)))
    except GENERATION_ERRORS as e:
        unfused.append((linear.name, f"kernel generation failed: {type(e).__name__}: {first_line(e)}"))
    return None


def _rebuild(old: fx.Graph, placed: dict[fx.Node, tuple[str, Region]]) -> fx.Graph:
    """The graph with each placed region as one call; units are emitted in dependency order."""
    order = {n: i for i, n in enumerate(old.nodes)}
    units: dict[object, list[fx.Node]] = {}
    for n in old.nodes:
        key = placed[n][0] if n in placed else n
        units.setdefault(key, []).append(n)
    deps = {key: {placed[a][0] if a in placed else a for m in nodes for a in m.all_input_nodes} - {key}
            for key, nodes in units.items()}
    users: dict[object, list[object]] = {key: [] for key in units}
    for key, ds in deps.items():
        for d in ds:
            users[d].append(key)
    waiting = {key: len(ds) for key, ds in deps.items()}
    ready = [(order[nodes[0]], i, key) for i, (key, nodes) in enumerate(units.items()) if not waiting[key]]
    heapq.heapify(ready)
    tiebreak = {key: i for i, key in enumerate(units)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    while ready:
        _, _, key = heapq.heappop(ready)
        if isinstance(key, str):
            region = placed[units[key][0]][1]
            call = graph.call_module(f"graphopt_kernels.{key}", tuple(env[a] for a in region.inputs))
            call.meta["graphopt_module"] = ", ".join(region.modules())
            for j, out in enumerate(region.outputs):
                got = graph.call_function(operator.getitem, (call, j))
                got.meta = dict(out.meta)
                env[out] = got
        else:
            env[key] = graph.node_copy(key, lambda a: env[a])
        for u in users[key]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, (order[units[u][0]], tiebreak[u], u))
    graph.lint()
    return graph


def _index(regions: Sequence[LoweredRegion]) -> str:
    lines = ["# region  kind  kernel  ops  modules"]
    for r in regions:
        lines.append(f"{r.name}\t{r.kind}\t{r.kernel}\t{' '.join(r.ops)}\t{', '.join(r.modules)}")
    return "\n".join(lines) + "\n"
