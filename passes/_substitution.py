"""What the substituting passes share: new parameters, fake-valued graph building, the pass wrapper.

A substituting pass (``linear-attention``, ``atconv``) copies the graph (sharing the trained weights),
rewrites attention sites with :class:`Builder` (each new node's ``val`` comes from running its op on
the operands' fake values, symbolic batch included) and puts every tensor it initialises under the
graph's ``graphopt_fresh`` submodule (:func:`fresh_parameter`), where :func:`graphopt.distill` finds
the new parameters to train first. A site it leaves alone raises :class:`Refused` with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from graphopt.analysis import find_attention
from graphopt.analysis.attention import AttentionSite
from graphopt.analysis.graph import op_name, to_networkx
from graphopt.approx import ApproxContext, ApproxOutcome, ApproxPass
from graphopt.errors import PassError
from graphopt.fxgraph import copy_sharing_weights
from graphopt.pipeline import PassContext

FRESH = "graphopt_fresh"  # the submodule holding every tensor an approximate pass initialised
MODULE_META = ("graphopt_module", "nn_module_stack", "stack_trace")
"""The node labels a new node takes over from the node it stands for (module path, source line)."""


class Refused(Exception):
    """A site the pass leaves alone, with the reason."""


def batch_symbol(gm: fx.GraphModule) -> str | None:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim():
            size = n.meta["val"].shape[0]
            return None if isinstance(size, int) else str(size)
    return None


def fresh_module(gm: fx.GraphModule, prefix: str) -> tuple[nn.Module, int]:
    """``gm``'s ``graphopt_fresh`` submodule (added if missing) and the first free index for names
    ``<prefix><i>_...`` in it (a second substitution numbers on)."""
    if not hasattr(gm, FRESH):
        gm.add_submodule(FRESH, nn.Module())
    fresh = getattr(gm, FRESH)
    used = [int(n[len(prefix):].split("_")[0]) for n, _ in fresh.named_parameters()
            if n.startswith(prefix) and n[len(prefix):].split("_")[0].isdigit()]
    return fresh, 1 + max(used, default=-1)


Replace = Callable[[fx.GraphModule, AttentionSite, torch.Generator, nn.Module, int], None]


def substitute_sites(gm: fx.GraphModule, prefix: str, seed: int, replace: Replace, ctx: PassContext | None = None,
                     select: Callable[[AttentionSite, Sequence[AttentionSite]], bool] | None = None,
                     finish: Callable[[fx.GraphModule], str | None] | None = None) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (sharing its weights; ``gm`` is not changed) with ``replace(graph, site,
    generator, fresh, index)`` run at every attention site ``select(site, sites_before)`` keeps; a
    site it refuses is noted with the reason. ``finish`` runs once after any replacement (its text,
    if any, is noted), then dead code (attention calls included) goes. Returns (copy, replaced)."""
    out = copy_sharing_weights(gm)
    sites = find_attention(to_networkx(out), batch_symbol(out))
    generator = torch.Generator().manual_seed(seed)
    fresh, first = fresh_module(out, prefix)
    replaced = 0
    for i, site in enumerate(sites):
        if select is not None and not select(site, sites[:i]):
            continue
        try:
            replace(out, site, generator, fresh, first + replaced)
        except Refused as why:
            if ctx is not None:
                ctx.note(f"{site.label or site.node}: left as it is: {why}")
            continue
        replaced += 1
    if replaced:
        note = finish(out) if finish is not None else None
        if note and ctx is not None:
            ctx.note(note)
        _eliminate(out)
        out.graph.lint()
        out.recompile()
    return out, replaced


def _eliminate(gm: fx.GraphModule) -> None:
    """Dead-code elimination, including attention calls (SDPA counts as impure: dropout)."""
    while True:
        gm.graph.eliminate_dead_code()
        dead = [n for n in gm.graph.nodes if n.op == "call_function" and not n.users
                and "scaled_dot_product" in op_name(n)]
        if not dead:
            return
        for n in dead:
            gm.graph.erase_node(n)


def substituting_pass(name: str, substitute: Callable[[fx.GraphModule, PassContext], tuple[fx.GraphModule, int]],
                      describe: Callable[[int], str], doc: str) -> ApproxPass:
    """An approximate pass that runs ``substitute`` on the module's canonical graph: an error when no
    site could be replaced (with the reasons), else the sites replaced as its hits and a note."""

    def transform(module: Any, ctx: ApproxContext, pctx: PassContext) -> ApproxOutcome:
        gm, replaced = substitute(module.captured.graph_module, pctx)
        if not replaced:
            raise PassError("no attention site could be replaced" + (f" ({'; '.join(pctx.notes)})"
                                                                     if pctx.notes else ""))
        pctx.hit("site", replaced)
        pctx.note(describe(replaced))
        return ApproxOutcome(graph=gm)

    return ApproxPass(name, transform, doc=doc)


class Builder:
    """Adds call_function nodes whose ``val`` comes from running the op on the operands' fake values
    (symbolic batch included), with the attention output's module labels."""

    def __init__(self, graph: fx.Graph | None, anchor: fx.Node):
        self.graph, self.anchor = graph, anchor

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        args = tuple(self._materialise(a) for a in args)
        node = self.graph.call_function(target, args, kwargs)
        values, kw_values = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
        mode = detect_fake_mode(pytree.tree_leaves((values, kw_values)))
        with mode if mode is not None else contextlib.nullcontext():
            node.meta["val"] = target(*values, **kw_values)
        for key in MODULE_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        return node

    def _materialise(self, a: Any) -> Any:
        if isinstance(a, Deferred):
            return self(a.target, *a.args)
        return a


@dataclasses.dataclass(frozen=True)
class Deferred:
    """An op to add once the builder inserts (operands found before the insertion point is known)."""

    target: Callable[..., Any]
    args: tuple[Any, ...]

    @property
    def meta(self) -> dict[str, Any]:
        values = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], self.args)
        mode = detect_fake_mode(pytree.tree_leaves(values))
        with mode if mode is not None else contextlib.nullcontext():
            return {"val": self.target(*values)}


def fresh_parameter(gm: fx.GraphModule, fresh: nn.Module, name: str, shape: Sequence[int], generator: torch.Generator,
           build: Builder, fan_in: int | None = None, like: torch.Tensor | None = None) -> fx.Node:
    """A new parameter under ``graphopt_fresh`` initialised like torch's default for linear and conv
    layers (Kaiming uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both weights and
    biases), and its get_attr node."""
    fan_in = fan_in if fan_in is not None else math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    dtype = like.dtype if like is not None else build.anchor.meta["val"].dtype
    device = like.device if like is not None else build.anchor.meta["val"].device
    value = (torch.rand(tuple(shape), generator=generator, dtype=torch.float64) * 2 - 1) * bound
    param = nn.Parameter(value.to(dtype=dtype, device=device), requires_grad=False)
    if hasattr(fresh, name):
        raise PassError(f"{FRESH}.{name} exists already")
    fresh.register_parameter(name, param)
    node = gm.graph.get_attr(f"{FRESH}.{name}")
    mode = detect_fake_mode([build.anchor.meta["val"]])
    node.meta["val"] = mode.from_tensor(param, static_shapes=True) if mode is not None else param
    return node


def attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
