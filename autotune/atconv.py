"""ATConv's kernel generation and convolution as one call site of a lowered graph.

Where it belongs: in lowering (:func:`.lower.lower`), between partitioning and the call sites. The
ATConv pass (:mod:`graphopt.passes.atconv`) writes, after the pooled C x C routing linear::

    K = reshape(linear(gelu_tanh(R), gen_w, gen_b), [B, C, k, k])      R: (B, C, k^2) routed values
    K = K - S * mean(K, [2, 3], keepdim=True)                            S: (1, C, 1, 1) = sigmoid(lambda)
    Y = graphopt::dynamic_dwconv(V, K)

Partitioned, that is a GELU region, the generator's linear and the mean on ATen, a mul + sub region
and the convolution's call site: about seven launches per site on (B, C, 9)-sized tensors. When the
chain is exactly this (its intermediate values read by nothing else), lowering makes it one
:class:`ATConvRegion` whose kernel (:func:`~.kernels.dynamic_dwconv.generated_dwconv_plan`) computes each
(sample, channel)'s k^2 weights in registers before convolving. Its candidates are the kernel's tile
configs and :data:`~.configs.ATEN` (every op of the chain eager), so tuning keeps the ATen chain where
the fused kernel does not measurably win.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import fx

from .cache import Config
from .configs import ATEN, is_aten
from .regions import Region, node_arg
from .sites import ChoiceEpoch, SitePlan, TuningOptions, _kernel_module, _Tuned, hash_source, region_graph

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class GeneratedDwconv:
    """A matched chain: its nodes in graph order, and the kernel's inputs (V, R, gen_w, gen_b, S)."""

    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    conv: fx.Node


def match(conv: fx.Node) -> GeneratedDwconv | None:
    """The kernel-generation chain feeding ``conv`` (a ``graphopt::dynamic_dwconv`` node), or None."""
    if conv.target is not torch.ops.graphopt.dynamic_dwconv.default:
        return None
    sub = conv.args[1]
    if not _call(sub, aten.sub.Tensor) or len(sub.args) != 2 or sub.kwargs:
        return None
    kernels, inhibit = sub.args
    if not _call(kernels, aten.reshape.default) or not _call(inhibit, aten.mul.Tensor):
        return None
    mean = next((a for a in inhibit.args if _call(a, aten.mean.dim)), None)
    scale = next((a for a in inhibit.args if a is not mean), None)
    if mean is None or not isinstance(scale, fx.Node) or mean.args[0] is not kernels \
            or list(mean.args[1]) not in ([2, 3], [-2, -1]) or not node_arg(mean, 2, "keepdim", False):
        return None
    linear = kernels.args[0]
    if not _call(linear, aten.linear.default) or len(linear.args) < 3 or not isinstance(linear.args[2], fx.Node):
        return None
    gelu = linear.args[0]
    if not _call(gelu, aten.gelu.default) or gelu.kwargs.get("approximate", "none") != "tanh":
        return None
    chain = (gelu, linear, kernels, mean, inhibit, sub)
    members = set(chain) | {conv}
    if any(u not in members for n in chain for u in n.users):
        return None  # an intermediate value is needed elsewhere: it has to be written out
    inputs = (conv.args[0], gelu.args[0], linear.args[1], linear.args[2], scale)
    channels = conv.meta["val"].shape[1]
    shapes_ok = (inputs[1].meta["val"].dim() == 3 and tuple(scale.meta["val"].shape) == (1, channels, 1, 1)
                 and all(isinstance(t, fx.Node) for t in inputs))
    if not shapes_ok or any(n.meta["val"].dtype != conv.meta["val"].dtype for n in inputs):
        return None
    order = {n: i for i, n in enumerate(conv.graph.nodes)}
    return GeneratedDwconv(tuple(sorted(members, key=order.get)), inputs, conv)


def _call(node: object, target: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def fuse(regions: Sequence[Region]) -> tuple[list[Region], dict[int, GeneratedDwconv]]:
    """``regions`` with each matched chain as one region (the chain's own regions removed); the second
    value maps a fused region's position in the list to its chain. A chain overlapping a region that
    also holds other nodes is left as it was."""
    chains = [c for r in regions if r.kind == "attention" and (c := match(r.nodes[0])) is not None]
    owner = {n: r for r in regions for n in r.nodes}
    out: list[Region] = []
    fused: dict[int, GeneratedDwconv] = {}
    taken: set[int] = set()
    by_conv = {}
    for chain in chains:
        members = set(chain.nodes)
        overlapping = {id(owner[n]): owner[n] for n in chain.nodes if n in owner}
        if all(set(r.nodes) <= members for r in overlapping.values()):
            by_conv[chain.conv] = chain
            taken |= set(overlapping)
    for r in regions:
        if r.kind == "attention" and r.nodes[0] in by_conv:
            chain = by_conv[r.nodes[0]]
            fused[len(out)] = chain
            out.append(Region("attention", chain.nodes, r.domain, chain.inputs, (chain.conv,)))
        elif id(r) not in taken:
            out.append(r)
    return out, fused


class ATConvRegion(_Tuned):
    """ATConv's kernel generation and depthwise convolution on one kernel, or the chain's eager ops."""

    def __init__(self, region: Region, options: TuningOptions, epoch: ChoiceEpoch | None = None):
        super().__init__(options, epoch)
        module = _kernel_module("dynamic_dwconv")
        self._module = module
        self.region = region
        self.kernel_name = "generated_dwconv"
        self.source_hash = hash_source(module.generated_dwconv_kernel, module._dwconv_tile)
        self.fallback = region_graph(region)

    def extra_repr(self) -> str:
        return f"{self.kernel_name}: {' '.join(self.region.ops())}"

    def configs(self) -> list[dict[str, int]]:
        return [*self._module.configs(), ATEN]

    def tuning_shape(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        v, routed = inputs[0], inputs[1]
        return (v.shape[0] * v.shape[1], v.shape[2], v.shape[3], routed.shape[-1])

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fallback(*inputs))

    def launch(self, config: Config, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.config_plan(config, inputs).run(self, inputs)

    def config_plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> SitePlan:
        if is_aten(config):
            return SitePlan(config, None)
        return SitePlan(config, self._module.generated_dwconv_plan(*inputs, config=config), tuple(range(5)))

    def plan_for(self, *inputs: torch.Tensor) -> SitePlan:
        return self.config_plan(self._config(self.tuning_shape(*inputs), inputs), inputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.launch(self._config(self.tuning_shape(*inputs), inputs), *inputs)
