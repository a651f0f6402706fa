import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
import graphopt.models
from graphopt.analysis import analyse


def _nodes(captured: graphopt.CapturedGraph) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in captured.graph_module.graph.nodes}


def _weight(captured: graphopt.CapturedGraph, name: str) -> str:
    """The parameter a projection node reads as its weight, e.g. ``model.enc1_attn.qkv.weight``."""
    return str(_nodes(captured)[name].args[1].target)


def test_unet_explicit_softmax_attention(analysed):
    captured, a = analysed("unet")
    (site,) = a.attention_sites
    nodes = _nodes(captured)
    assert site.kind == "softmax" and site.label == "enc1_attn"
    assert [str(nodes[n].target) for n in site.nodes] == [
        "aten.einsum.default", "aten.div.Tensor", "aten.softmax.int", "aten.einsum.default"]
    assert site.q == site.k == site.v and site.fused_qkv
    assert str(nodes[site.q].target) == "aten.conv2d.default"
    assert _weight(captured, site.q) == "model.enc1_attn.qkv.weight"
    assert _weight(captured, site.out_proj) == "model.enc1_attn.proj.weight"
    # One head over 4x4 pixels: scores [B, 16, 16], channels (16) contracted.
    assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (1, 16, 16, 16)
    assert site.q_input == site.kv_input and str(nodes[site.q_input].target) == "aten.group_norm.default"
    assert not site.cross


def test_dit_sdpa_sites(analysed):
    captured, a = analysed("dit")
    assert len(a.attention_sites) == 3
    for i, site in enumerate(a.attention_sites):
        assert site.kind == "sdpa" and site.nodes == (site.node,)
        assert site.q == site.k == site.v and site.fused_qkv
        assert _weight(captured, site.q) == f"model.blocks.{i}.qkv.weight"
        assert _weight(captured, site.out_proj) == f"model.blocks.{i}.proj.weight"
        assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (2, 16, 16, 16)
        assert site.q_input == site.kv_input is not None and not site.cross


def test_multihead_attention_sites(analysed):
    captured, a = analysed("mha")
    assert len(a.attention_sites) == 2
    for i, site in enumerate(a.attention_sites):
        assert site.kind == "sdpa" and site.fused_qkv and site.label == f"blocks.{i}.attn"
        assert _weight(captured, site.q) == f"model.blocks.{i}.attn.in_proj_weight"
        assert _weight(captured, site.out_proj) == f"model.blocks.{i}.attn.out_proj.weight"
        assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (2, 6, 6, 8)
        assert site.q_input == site.kv_input is not None and not site.cross


def test_models_without_attention(analysed):
    for name in ("dataclass", "kwargs"):
        assert analysed(name)[1].attention_sites == ()


class _SeparateHeads(nn.Module):
    """Separate q/k/v projections, 4-d heads, q @ k^T * scale, cross-attention to a context."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        b, n, d = x.shape
        def split(t):
            return t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, d))


class _FoldedHeads(nn.Module):
    """Heads folded into the batch, [B*H, L, E], with bmm, and a fused kv projection."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        def fold(t):
            return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

        k, v = self.kv(x).chunk(2, dim=-1)
        q, k, v = fold(self.q(x)), fold(k), fold(v)
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d // self.heads), dim=-1)
        o = torch.bmm(p, v).reshape(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.out(o)


def test_separate_projections_and_cross_attention():
    model = _SeparateHeads().eval()
    captured = graphopt.capture(model, (torch.randn(2, 5, 16), torch.randn(2, 7, 16)))
    (site,) = analyse(captured).attention_sites
    assert site.kind == "softmax" and not site.fused_qkv
    assert [_weight(captured, n) for n in (site.q, site.k, site.v, site.out_proj)] == [
        "model.to_q.weight", "model.to_k.weight", "model.to_v.weight", "model.to_out.weight"]
    assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (4, 5, 7, 4)
    x, context = (n.name for n in captured.graph_module.graph.find_nodes(op="placeholder"))
    assert (site.q_input, site.kv_input, site.cross) == (x, context, True)


def test_heads_folded_into_the_batch():
    captured = graphopt.capture(_FoldedHeads().eval(), (torch.randn(2, 6, 12),))
    (site,) = analyse(captured).attention_sites
    assert site.kind == "softmax" and not site.fused_qkv and site.k == site.v
    assert _weight(captured, site.q) == "model.q.weight" and _weight(captured, site.k) == "model.kv.weight"
    assert _weight(captured, site.out_proj) == "model.out.weight"
    assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (3, 6, 6, 4)
    (x,) = (n.name for n in captured.graph_module.graph.find_nodes(op="placeholder"))
    assert (site.q_input, site.kv_input, site.cross) == (x, x, False)


class _Causal(nn.Module):
    """Fused qkv, an additive bias and a causal masked_fill between the scaled scores and softmax."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 5):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.randn(heads, tokens, tokens))
        self.register_buffer("future", torch.ones(tokens, tokens, dtype=torch.bool).triu(1))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + self.bias
        p = scores.masked_fill(self.future, float("-inf")).softmax(dim=-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, d))


def test_masked_attention():
    captured = graphopt.capture(_Causal().eval(), (torch.randn(2, 5, 8),))
    (site,) = analyse(captured).attention_sites
    nodes = _nodes(captured)
    assert site.kind == "softmax" and site.fused_qkv
    assert [str(nodes[n].target).split(".")[1] for n in site.nodes] == [
        "matmul", "mul", "add", "masked_fill", "softmax", "matmul"]
    assert _weight(captured, site.q) == "model.qkv.weight" and _weight(captured, site.out_proj) == "model.proj.weight"
    assert (site.heads, site.seq_len, site.kv_len, site.head_dim) == (2, 5, 5, 4)


def test_a_softmax_that_is_not_attention_is_ignored():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return F.softmax(self.fc(x), dim=-1) * x

    assert analyse(graphopt.capture(Gate().eval(), (torch.randn(2, 8),))).attention_sites == ()


# ---------------------------------------------------------------- self- or cross-attention


def _placeholders(captured: graphopt.CapturedGraph) -> list[str]:
    return [n.name for n in captured.graph_module.graph.find_nodes(op="placeholder")]


def test_text_unet_tells_self_from_cross_attention(analysed):
    captured, a = analysed("text_unet")
    nodes, context = _nodes(captured), _placeholders(captured)[-1]
    # Each transformer block: attn1 over the image tokens, then attn2 to the text context.
    assert [s.cross for s in a.attention_sites] == [False, True] * 4
    for self_site, cross_site in zip(a.attention_sites[::2], a.attention_sites[1::2]):
        assert self_site.q_input == self_site.kv_input
        assert str(nodes[self_site.q_input].target) == "aten.layer_norm.default"
        assert cross_site.kv_input == context and cross_site.q_input != context
        assert str(nodes[cross_site.q_input].target) == "aten.layer_norm.default"
        assert cross_site.kv_len == 5 and cross_site.seq_len == self_site.seq_len


def test_pixart_cross_attends_to_the_projected_caption(analysed):
    captured, a = analysed("pixart")
    nodes = _nodes(captured)
    assert [s.cross for s in a.attention_sites] == [False, True] * 2
    for cross_site in a.attention_sites[1::2]:
        assert nodes[cross_site.kv_input].meta["graphopt_module"].startswith("caption_projection")
        assert (cross_site.seq_len, cross_site.kv_len) == (16, 5)


def test_third_party_style_self_attention(analysed):
    """The zoo's text UNet projects q, k and v with separate linears and reshapes heads with
    reshape/transpose; with no context it attends to itself."""
    from tests.zoo import CrossAttention

    torch.manual_seed(0)
    captured = graphopt.capture(CrossAttention(8).eval(), (torch.randn(2, 6, 8),))
    (site,) = analyse(captured).attention_sites
    assert not site.fused_qkv and len({site.q, site.k, site.v}) == 3
    assert site.q_input == site.kv_input == _placeholders(captured)[0] and not site.cross


def test_reference_models_have_only_self_attention():
    for name, count in (("unet-digits", 4), ("dit-digits", 4)):
        ref = graphopt.models.load(name)
        sites = analyse(graphopt.capture(ref.model, ref.example_inputs, dynamic_batch=False)).attention_sites
        assert len(sites) == count and not any(s.cross for s in sites), name
        assert all(s.q_input == s.kv_input is not None for s in sites), name


class _Streams(nn.Module):
    """Separate q/k/v projections whose inputs are chosen by ``kv``: how keys/values relate to the
    queries' tensor ``norm1(x)``."""

    def __init__(self, kv: str, dim: int = 8):
        super().__init__()
        self.kv = kv
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.context_proj = nn.Linear(dim, dim)
        self.latents = nn.Parameter(torch.randn(1, 3, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q_in = self.latents.expand(x.shape[0], -1, -1) if self.kv == "latent queries" else h
        kv_in = {
            "same norm": h,
            "other norm": self.norm2(x),  # rare, but one token stream through two per-token norms
            "pooled": F.avg_pool1d(h.transpose(1, 2), 2).transpose(1, 2),  # KV compression
            "context": context,
            "projected context": self.context_proj(F.silu(context)),
            "stream and context": torch.cat([h, context], dim=1),
            "latent queries": h,
        }[self.kv]
        return F.scaled_dot_product_attention(self.to_q(q_in), self.to_k(kv_in), self.to_v(kv_in))


@pytest.mark.parametrize("kv, cross", [
    ("same norm", False), ("other norm", False), ("pooled", False), ("context", True),
    ("projected context", True), ("stream and context", True), ("latent queries", True)])
def test_cross_attention_is_keys_and_values_not_derived_from_the_query_stream(kv, cross):
    captured = graphopt.capture(_Streams(kv).eval(), (torch.randn(2, 6, 8), torch.randn(2, 4, 8)))
    (site,) = analyse(captured).attention_sites
    assert site.cross is cross
    assert site.q_input is not None and site.kv_input is not None
    assert (site.q_input == site.kv_input) is (kv == "same norm")
