"""atconv: ATConv, an attentive 3x3 convolution, in place of self-attention in transformer blocks.

Approximate (arXiv 2510.20092). At a self-attention site over ``[B, N, C]`` tokens
on a square grid (N = s^2), whose q/k/v come from linear projections of one input ``x`` and whose
output projection is a linear, the attention from the q/k/v projections to the output projection
becomes::

    K = GELU_tanh(Linear_CxC(pool_{k^2}(x^T)^T)^T) @ W_gen + b_gen  per (sample, channel): k x k
    K = K - sigmoid(lambda) * mean_{k x k}(K)                         lateral inhibition, lambda = 0
    Y = dynamic_dwconv(Linear_v(x) as [B, C, s, s], K)                 graphopt::dynamic_dwconv
    out = Linear_out(Y as [B, N, C])

``pool`` is the adaptive average pool over the raster token axis to k^2 bins. It runs before the
kernel generator's C x C linear rather than after it (the paper's order): each bin is an average, and an
average of affine maps is the affine map of the average, so the result is the same up to rounding and
the linear costs k^2 C^2 per sample instead of N C^2 (a third of the three linears' work when N is
well above k^2). The value and output projections are inherited (the value rows of a fused qkv weight are
sliced, not copied: the columns the attention's value operand slices where q, k and v were merged into
one matmul, in whatever order; the last third of a fused qkv otherwise); the kernel generator's C x C
linear, the shared k^2 x k^2 linear and lambda (zeros) are new, under the graph's ``graphopt_fresh``
submodule, for :func:`graphopt.distill`.
``hybrid=True`` replaces every second site only (the second, fourth, ...); ``drop_pos_embed=True``
removes a learned position embedding added to the patch tokens (all-ATConv models drop it upstream).
Sites it cannot replace are listed with the reason; the row's hits count the sites replaced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import fx, nn

import graphopt.ops  # noqa: F401 - registers torch.ops.graphopt.dynamic_dwconv
from graphopt.analysis.attention import AttentionSite, passes_through
from graphopt.analysis.graph import op_name
from graphopt.approx import ApproxPass
from graphopt.errors import UsageError
from graphopt.pipeline import PassContext

from ._substitution import Builder, Refused, attribute, fresh_parameter, substitute_sites, substituting_pass

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ATConvOptions:
    """``kernel``: the dynamic kernel's size (odd, the paper's 3); ``hybrid``: every second site only;
    ``drop_pos_embed``: remove a learned position embedding; ``seed``: the initialisation's seed."""

    kernel: int = 3
    hybrid: bool = False
    drop_pos_embed: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UsageError(f"the ATConv kernel must be odd and positive, got {self.kernel}")


def substitute_atconv(gm: fx.GraphModule, options: ATConvOptions,
                      ctx: PassContext | None = None) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (sharing its inherited weights) with ATConv at every (or every second)
    substitutable self-attention site; returns it and the number of sites replaced."""
    return substitute_sites(gm, "atc", options.seed,
                            lambda out, site, generator, fresh, index: _substitute(out, site, options, generator,
                                                                                   fresh, index), ctx,
                            select=_every_second if options.hybrid else None,
                            finish=_drop_pos_embed if options.drop_pos_embed else None)


def _every_second(site: AttentionSite, before: Sequence[AttentionSite]) -> bool:
    """Hybrid: the second, fourth, ... self-attention site (cross sites are refused with their reason)."""
    return site.cross or sum(not s.cross for s in before) % 2 == 1


def _substitute(gm: fx.GraphModule, site: AttentionSite, options: ATConvOptions, generator: torch.Generator,
                fresh: nn.Module, index: int) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    if site.cross:
        raise Refused("cross-attention: ATConv replaces self-attention only")
    projections = [nodes[n] for n in dict.fromkeys((site.q, site.k, site.v))]
    if any(op_name(p) != "linear" for p in projections):
        raise Refused("q/k/v do not come from linear projections of the tokens")
    inputs = {p.args[0] for p in projections}
    if len(inputs) != 1:
        raise Refused("q, k and v read different tensors")
    x = inputs.pop()
    shape = tuple(x.meta["val"].shape)
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
        raise Refused(f"the tokens are not a static [B, N, C] tensor ({shape})")
    tokens, channels = shape[1], shape[2]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise Refused(f"{tokens} tokens are not a square grid: the convolution needs H x W")
    out_proj = nodes.get(site.out_proj) if site.out_proj else None
    if out_proj is None or op_name(out_proj) != "linear" or tuple(out_proj.args[0].meta["val"].shape)[1:] != \
            (tokens, channels):
        raise Refused("no linear output projection reading [B, N, C]")
    k = options.kernel
    bins = k * k
    build = Builder(gm.graph, out_proj)
    with gm.graph.inserting_before(out_proj):
        value = _value(build, x, site, nodes, channels)
        weight = fresh_parameter(gm, fresh, f"atc{index}_k_weight", (channels, channels), generator, build)
        bias = fresh_parameter(gm, fresh, f"atc{index}_k_bias", (channels,), generator, build, fan_in=channels)
        # pool(Linear(x)) = Linear(pool(x)): a bin's average of an affine map is the map of the bin's
        # average, so the C x C routing linear runs on k^2 pooled rows instead of N tokens
        tokens_pooled = build(aten.adaptive_avg_pool1d.default, build(aten.transpose.int, x, 1, 2), [bins])
        routed = build(aten.linear.default, build(aten.transpose.int, tokens_pooled, 1, 2), weight, bias)
        pooled = build(aten.gelu.default, build(aten.transpose.int, routed, 1, 2), approximate="tanh")  # [B, C, k^2]
        gen_w = fresh_parameter(gm, fresh, f"atc{index}_gen_weight", (bins, bins), generator, build)
        gen_b = fresh_parameter(gm, fresh, f"atc{index}_gen_bias", (bins,), generator, build, fan_in=bins)
        kernels = build(aten.reshape.default, build(aten.linear.default, pooled, gen_w, gen_b), [-1, channels, k, k])
        lam = _zeros(gm, fresh, f"atc{index}_lambda", channels, build)
        inhibit = build(aten.mul.Tensor, build(aten.reshape.default, build(aten.sigmoid.default, lam),
                                               [1, channels, 1, 1]),
                        build(aten.mean.dim, kernels, [2, 3], True))
        kernels = build(aten.sub.Tensor, kernels, inhibit)
        image = build(aten.reshape.default, build(aten.transpose.int, value, 1, 2), [-1, channels, side, side])
        conv = build(torch.ops.graphopt.dynamic_dwconv.default, image, kernels)
        y = build(aten.transpose.int, build(aten.reshape.default, conv, [-1, channels, tokens]), 1, 2)
    out_proj.replace_input_with(out_proj.args[0], y)


def _value(build: Builder, x: fx.Node, site: AttentionSite, nodes: dict[str, fx.Node], channels: int) -> fx.Node:
    """The value projection of ``x``: its own linear, or the value rows of a projection it shares with the
    queries and keys (a fused qkv linear, or q, k and v merged by merge-linears), sliced so the trained
    weight is shared, not copied."""
    proj = nodes[site.v]
    weight = proj.args[1]
    bias = proj.args[2] if len(proj.args) > 2 else None
    width = tuple(weight.meta["val"].shape)[0]
    rows = _value_columns(site, nodes, proj)
    if rows is None and width == channels and not site.fused_qkv:
        return proj
    if rows is None:
        if width != 3 * channels:
            raise Refused(f"cannot tell which of the shared projection's {width} outputs are the values")
        rows = (2 * channels, 3 * channels)  # no slice says otherwise: q, k, v stacked, as in a fused qkv
    if rows[1] - rows[0] != channels:
        raise Refused(f"the values are {rows[1] - rows[0]} wide, not the tokens' {channels}")
    v_weight = build(aten.slice.Tensor, weight, 0, *rows)
    v_bias = build(aten.slice.Tensor, bias, 0, *rows) if isinstance(bias, fx.Node) else None
    return build(aten.linear.default, x, v_weight, v_bias)


def _value_columns(site: AttentionSite, nodes: dict[str, fx.Node], proj: fx.Node) -> tuple[int, int] | None:
    """The output columns of ``proj`` the attention's values are, where a slice of its last dimension
    says so on the way from the attention's value operand back to it; else None."""
    out = nodes[site.node]
    operands = [out.args[2]] if site.kind == "sdpa" else [a for a in out.args if isinstance(a, fx.Node)][-2:]
    for node in operands:
        columns = None
        while node is not proj and passes_through(node) and node.args and isinstance(node.args[0], fx.Node):
            dim = node.args[1] if len(node.args) > 1 else 0
            if node.target is aten.slice.Tensor and node.args[0] is proj and isinstance(dim, int) \
                    and dim % proj.meta["val"].dim() == proj.meta["val"].dim() - 1:
                columns = (int(node.args[2]), int(node.args[3]))
            node = node.args[0]
        if node is proj:
            return columns
    return None


def _zeros(gm: fx.GraphModule, fresh: nn.Module, name: str, size: int, build: Builder) -> fx.Node:
    """lambda, initialised to 0 (as in the paper: sigmoid(0) = 1/2 of the mean is inhibited at the start)."""
    node = fresh_parameter(gm, fresh, name, (size,), torch.Generator(), build, fan_in=1)
    with torch.no_grad():
        attribute(gm, node.target).zero_()
    return node


def _drop_pos_embed(gm: fx.GraphModule) -> str:
    """Remove ``tokens + pos_embed``: the first add of a [1, N, C] parameter to [B, N, C] tokens."""
    for node in gm.graph.nodes:
        if op_name(node) != "add" or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        for tokens, embed in ((a, b), (b, a)):
            if isinstance(embed, fx.Node) and embed.op == "get_attr" and isinstance(tokens, fx.Node):
                e, t = embed.meta.get("val"), tokens.meta.get("val")
                if e is not None and t is not None and e.dim() == 3 and t.dim() == 3 and e.shape[0] == 1 \
                        and tuple(e.shape[1:]) == tuple(t.shape[1:]):
                    node.replace_all_uses_with(tokens)
                    gm.graph.erase_node(node)
                    return f"position embedding {embed.target} dropped"
    return "no learned position embedding found to drop"


def atconv_pass(options: ATConvOptions | None = None) -> ApproxPass:
    """The ``atconv`` approximate pass with these options (the registered one: all sites, defaults)."""
    options = options or ATConvOptions()
    return substituting_pass(
        "atconv", lambda gm, pctx: substitute_atconv(gm, options, pctx),
        lambda n: (f"{n} attention site(s) now ATConv ({options.kernel}x{options.kernel} dynamic kernels, "
                   f"{'hybrid: every second site' if options.hybrid else 'all sites'}); value and output "
                   f"projections inherited, kernel generator fresh, lambda 0 (seed {options.seed})"),
        __doc__ or "")


ATCONV = atconv_pass()
