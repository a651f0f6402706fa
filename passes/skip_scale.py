"""skip-scale: scale every encoder-to-decoder skip by a runtime input (Skip-Tuning, Ma et al. 2024).

The long skips are the ones the structural analysis finds (:func:`graphopt.analysis.find_blocks`:
concatenated or added, whatever the model calls them). At each join the skip operand ``s`` becomes
``s * skip_scales[i]``: an explicit multiply before the concatenation or addition, since rho cannot
be folded into the receiving block's weights exactly (its GroupNorm normalises the concat, and a
1x1 shortcut conv sees it un-normalised). ``skip_scales`` is a new input of the denoiser, shape
``(n_skips,)``, so one graph serves every sampling step and schedule; the optimized module takes it
as a keyword argument and uses its default (all ones) when it is omitted. Scale ``i`` belongs to
the ``i``-th join in graph order: decoders join their deepest skip first, so ``i = 0`` is the
deepest skip and ``i = n - 1`` the highest-resolution one (see :func:`linear_scales`).

Exact: multiplying by 1.0 changes no bit, and the default scales are ones (verified bit for bit by
the tests). The values that make it pay off come from a sampling plan (``graphopt search --space
skip-scale``), per step.
"""

from __future__ import annotations

import torch
from torch import fx

from graphopt.analysis.blocks import SkipEdge, find_blocks
from graphopt.analysis.graph import to_networkx
from graphopt.pipeline import Pass, PassContext

INPUT = "skip_scales"
META = "graphopt_skip_scale"
aten = torch.ops.aten


def linear_scales(n: int, rho_top: float, rho_bottom: float) -> tuple[float, ...]:
    """Skip-Tuning's parameterisation: ``rho_bottom`` for the deepest skip (index 0), ``rho_top`` for
    the highest-resolution one (index ``n - 1``), linear in between."""
    if n <= 0:
        return ()
    if n == 1:
        return (float(rho_top),)
    return tuple(float(rho_bottom + (rho_top - rho_bottom) * i / (n - 1)) for i in range(n))


def encoder_decoder_skips(gm: fx.GraphModule) -> tuple[SkipEdge, ...]:
    """The long skips of ``gm`` in join (graph) order, deepest first."""
    return find_blocks(to_networkx(gm))[1]


def _scaled_operand(join: fx.Node, edge: SkipEdge) -> fx.Node | None:
    """The operand of ``join`` that carries the skip: the source itself, or (for an add whose skip
    passes a shortcut projection) the operand that is not the decoder path."""
    operands = list(join.args[0]) if edge.kind == "concat" else list(join.args[:2])
    named = {getattr(a, "name", None): a for a in operands if isinstance(a, fx.Node)}
    if edge.source in named:
        return named[edge.source]
    others = [a for a in operands if isinstance(a, fx.Node) and a.name != edge.main]
    return others[0] if len(others) == 1 else None


def _skip_scale(gm: fx.GraphModule, ctx: PassContext) -> None:
    edges = encoder_decoder_skips(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = []
    for edge in edges:
        join = nodes[edge.join]
        operand = _scaled_operand(join, edge)
        value = operand.meta.get("val") if operand is not None else None
        if operand is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            ctx.note(f"skip {edge.source} -> {edge.join} left unscaled: its operand is not a float tensor")
            continue
        sites.append((join, operand, value))
    if not sites:
        ctx.note("no encoder-decoder skip found: nothing to scale")
        return
    dtype, device = sites[0][2].dtype, sites[0][2].device
    scales = ctx.add_input(INPUT, torch.ones(len(sites), dtype=dtype, device=device))
    for i, (join, operand, value) in enumerate(sites):
        with gm.graph.inserting_before(join):
            rho = gm.graph.call_function(aten.select.int, (scales, 0, i))
            rho.meta["val"] = torch.ones((), dtype=dtype, device=device)
            if rho.meta["val"].dtype != value.dtype:
                rho = gm.graph.call_function(aten._to_copy.default, (rho,), {"dtype": value.dtype})
                rho.meta["val"] = torch.ones((), dtype=value.dtype, device=device)
            scaled = gm.graph.call_function(aten.mul.Tensor, (operand, rho))
        scaled.meta["val"] = value
        scaled.meta["graphopt_module"] = join.meta.get("graphopt_module", "")
        scaled.meta[META] = i
        join.replace_input_with(operand, scaled)
        ctx.hit("skip")
        ctx.note(f"skip {i}: {operand.meta.get('graphopt_module', '') or '(root)'} -> "
                 f"{join.meta.get('graphopt_module', '') or '(root)'} ({'concat' if 'cat' in str(join.target) else 'add'})")


SKIP_SCALE = Pass("skip-scale", exact=True, transform=_skip_scale, doc=__doc__ or "")
