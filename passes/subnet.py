"""subnet: keep d of a stack's D layers, chosen equidistantly (VARiant), weights shared.

Approximate. The analysis finds the longest stack of repeated layers (a transformer layer is a unit
of an attention and an MLP residual block). The subnet keeps the layers

    I_d = { floor(i (D - 1) / (d - 1)) : i = 0..d-1 }

(the first and the last always; ``keep=1`` keeps the first) and skips the others: a skipped layer's
blocks return their shortcuts, so the graph variant without them costs nothing for them and shares
every weight with the full graph (no copies).

Where the layers grow a cache (VAR's per-scale call, whose keys and values are inputs and grown
outputs), the subnet routes per scale, as VARiant does: while the cache holds fewer tokens than the
bridge zone (the first ``bridge`` scales; default 60% of them, VARiant's 6 of VAR's 10, here round(0.6 K))
every layer runs; later scales run only the kept layers, which attend to the bridge-zone keys and
values the full path produced. The caches of dropped layers stop growing after the bridge zone and,
with ``free_caches`` (default), are returned empty so the caller holds nothing for them. Without
a cache, the subnet applies to every call (every sampling step of a DiT or UNet).

The approximate layer measures the quality before and after on the evaluator's confirmation seeds
and writes it into this pass's row; the note names the kept layers and the routing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from graphopt.analysis.blocks import find_blocks, find_stacks
from graphopt.analysis.graph import to_networkx
from graphopt.approx import ApproxContext, ApproxOutcome, ApproxPass
from graphopt.errors import PassError, UsageError
from graphopt.pipeline import PassContext
from graphopt.variants import Routing, without_blocks

BRIDGE_FRACTION = 0.6  # VARiant: the first 6 of VAR's 10 scales run every layer


def equidistant(depth: int, keep: int) -> tuple[int, ...]:
    """I_d = { floor(i (D - 1) / (d - 1)) : i = 0..d-1 }: ``keep`` of ``depth`` layers, first and last kept."""
    if not 1 <= keep <= depth:
        raise UsageError(f"a subnet keeps between 1 and {depth} of {depth} layers, not {keep}")
    if keep == 1:
        return (0,)
    return tuple(i * (depth - 1) // (keep - 1) for i in range(keep))


@dataclasses.dataclass(frozen=True)
class SubnetOptions:
    """``keep``: layers kept (d; default half the stack, rounded up); ``fraction``: d as a fraction
    of D instead; ``bridge``: scales that run every layer (cached models; default round(0.6 K));
    ``bridge_tokens``: the bridge zone as a cache length, for a model without ``config.patch_nums``;
    ``free_caches``: return dropped layers' caches empty after the bridge zone."""

    keep: int | None = None
    fraction: float | None = None
    bridge: int | None = None
    bridge_tokens: int | None = None
    free_caches: bool = True

    def __post_init__(self) -> None:
        if self.keep is not None and self.fraction is not None:
            raise UsageError("subnet takes keep or fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UsageError(f"subnet.fraction must be in (0, 1], got {self.fraction}")
        if self.keep is not None and self.keep < 1:
            raise UsageError(f"subnet.keep must be at least 1, got {self.keep}")
        if self.bridge is not None and self.bridge < 1:
            raise UsageError(f"subnet.bridge must be at least 1 scale, got {self.bridge}")

    def kept(self, depth: int) -> int:
        if self.keep is not None:
            if self.keep > depth:
                raise PassError(f"keep={self.keep} but the stack has only {depth} layers")
            return self.keep
        return max(1, math.ceil(depth * (self.fraction if self.fraction is not None else 0.5)))


def subnet_pass(options: SubnetOptions = SubnetOptions()) -> ApproxPass:
    def transform(module: Any, ctx: ApproxContext, pctx: PassContext) -> ApproxOutcome:
        return _subnet(module, ctx, pctx, options)

    return ApproxPass("subnet", transform, doc=__doc__ or "")


def _subnet(module: Any, ctx: ApproxContext, pctx: PassContext, options: SubnetOptions) -> ApproxOutcome:
    gm = module.captured.graph_module
    g = to_networkx(gm)
    blocks, skips = find_blocks(g)
    stacks = find_stacks(g, blocks, skips)
    if not stacks:
        raise PassError("no stack of repeated layers found: nothing to take a subnet of")
    stack = max(stacks, key=lambda s: (s.count, s.period))
    depth = stack.count
    keep = options.kept(depth)
    kept = equidistant(depth, keep)
    ids = {b.exit: b.id for b in module.blocks}
    dropped_units = [u for i, u in enumerate(stack.units) if i not in kept]
    skipped = frozenset(ids[b.exit] for unit in dropped_units for b in unit)
    label = stack.label or "root"
    pctx.hit("layer", len(dropped_units))
    pctx.note(f"{label}: keeps {keep} of {depth} layers {list(kept)} (units of {stack.period} blocks)")
    by_id = {b.id: b for b in module.blocks}
    cached = [c for b in module.blocks for c in b.caches]
    if not cached:
        pctx.note("no cache inputs: the subnet runs on every call")
        return ApproxOutcome(graph=without_blocks(gm, [by_id[i] for i in skipped]))
    threshold = _bridge_tokens(ctx, options)
    first_kept = next(b for b in module.blocks if b.caches and b.id not in skipped)
    _, cache_input, dim = first_kept.caches[0]
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    routing = Routing(skipped, options.free_caches, placeholders.index(cache_input), dim, threshold)
    pctx.note(f"routes by the cache length: calls whose cache holds >= {threshold} tokens (after the bridge "
              f"zone) run the subnet; dropped layers' caches {'are freed' if options.free_caches else 'stop growing'}")
    return ApproxOutcome(routing=routing)


def _bridge_tokens(ctx: ApproxContext, options: SubnetOptions) -> int:
    if options.bridge_tokens is not None:
        return options.bridge_tokens
    patch_nums = getattr(getattr(ctx.source, "config", None), "patch_nums", None)
    if patch_nums is None:
        raise PassError("the model grows a cache but has no config.patch_nums to place the bridge zone: pass "
                        "subnet.bridge_tokens")
    bridge = options.bridge if options.bridge is not None else round(BRIDGE_FRACTION * len(patch_nums))
    if bridge > len(patch_nums):
        raise PassError(f"bridge={bridge} scales but the model has {len(patch_nums)}")
    return sum(p * p for p in patch_nums[:bridge])


SUBNET = subnet_pass()
