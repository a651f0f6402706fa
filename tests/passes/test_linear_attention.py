"""The linear-attention pass: LiT's ReLU linear attention + depthwise conv on V at every self-attention site."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import ApproxContext, PassError, UsageError
from graphopt.ops import linear_attention_reference
from graphopt.passes.linear_attention import (FRESH, LINEAR_ATTENTION, LinearAttentionOptions,
                                              linear_attention_pass, substitute_linear_attention)
from graphopt.pipeline import PassContext
from graphopt.quality import QualityCost, QualityEvaluator
from tests import zoo
from tests.test_approx import MeanStd


class SeparateQKV(nn.Module):
    """Third-party style: separate q/k/v linears, view/transpose head reshapes, SDPA, output linear."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(out.transpose(1, 2).reshape(b, n, c))


class ChannelsFirst(nn.Module):
    """unet-digits' style: fused 1x1-conv qkv, heads folded into the batch, bmm and V @ P^T."""

    def __init__(self, channels: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).reshape(b * self.heads, 3, d, h * w).unbind(1)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=-1)
        return x + self.proj(torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w))


def _dwc(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, side: int) -> torch.Tensor:
    """LiT's branch by hand: V [B, H, N, d] as a [B, H*d, s, s] image, depthwise conv, back."""
    b, heads, n, d = v.shape
    image = v.permute(0, 1, 3, 2).reshape(b, heads * d, side, side)
    out = F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=heads * d)
    return out.reshape(b, heads, d, n).permute(0, 1, 3, 2)


def _lit_calls(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.linear_attention.default]


def _substitute(model, args, options):
    opt = graphopt.optimize(model, args)
    ctx = PassContext("linear-attention")
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, options, ctx)
    return opt, gm, replaced, ctx


def test_separate_qkv_site_becomes_linear_attention_with_its_depthwise_conv_fused():
    torch.manual_seed(0)
    model = SeparateQKV().eval()
    x = torch.randn(3, 16, 16)  # 16 tokens: a 4 x 4 grid
    opt, gm, replaced, _ = _substitute(model, (x,), LinearAttentionOptions(fresh_qkv=False))
    assert replaced == 1
    fresh = getattr(gm, FRESH)
    b, n, c = x.shape
    q, k, v = (t.view(b, n, 2, 8).transpose(1, 2) for t in (model.to_q(x), model.to_k(x), model.to_v(x)))
    out = linear_attention_reference(q, k, v) + _dwc(v, fresh.lit0_dwc_weight, fresh.lit0_dwc_bias, 4)
    expected = x + model.to_out(out.transpose(1, 2).reshape(b, n, c))
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], expected.detach(), rtol=1e-5, atol=1e-5)
    assert not any("scaled_dot_product" in str(node.target) for node in gm.graph.nodes)
    assert fresh.lit0_dwc_weight.shape == (16, 1, 5, 5)
    # the branch is inside the op (one kernel on the GPU), not a conv2d of its own
    (site,) = _lit_calls(gm)
    assert [a.target for a in site.args[4:]] == [f"{FRESH}.lit0_dwc_weight", f"{FRESH}.lit0_dwc_bias"]
    assert not any("conv" in str(node.target) for node in gm.graph.nodes)


def test_channels_first_bmm_site_with_fresh_projections():
    torch.manual_seed(0)
    model = ChannelsFirst().eval()
    x = torch.randn(2, 8, 3, 3)
    opt, gm, replaced, _ = _substitute(model, (x,), LinearAttentionOptions(seed=3))
    assert replaced == 1
    fresh = getattr(gm, FRESH)
    assert not torch.equal(fresh.lit0_qkv_weight, model.qkv.weight)  # q/k/v afresh (LiT), the model's kept
    qkv = F.conv2d(x, fresh.lit0_qkv_weight, fresh.lit0_qkv_bias).reshape(2, 2, 3, 4, 9)
    q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))  # [B, H, N, d]
    out = linear_attention_reference(q, k, v) + _dwc(v, fresh.lit0_dwc_weight, fresh.lit0_dwc_bias, 3)
    expected = x + model.proj(out.transpose(-1, -2).reshape(2, 8, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], expected.detach(), rtol=1e-5, atol=1e-5)


def test_fewer_heads_regroup_inside_the_site():
    torch.manual_seed(0)
    model = SeparateQKV(dim=16, heads=4).eval()
    x = torch.randn(2, 9, 16)
    _, gm, replaced, _ = _substitute(model, (x,), LinearAttentionOptions(heads=1, fresh_qkv=False))
    fresh = getattr(gm, FRESH)
    q, k, v = (t[:, None] for t in (model.to_q(x), model.to_k(x), model.to_v(x)))  # one head of width 16
    v4 = model.to_v(x).view(2, 9, 4, 4).transpose(1, 2)
    local = _dwc(v4, fresh.lit0_dwc_weight, fresh.lit0_dwc_bias, 3).transpose(1, 2).reshape(2, 9, 16)
    (site,) = _lit_calls(gm)  # one head of width 16 in the op; its branch is the 4 model heads' one
    assert site.meta["val"].shape == (2, 1, 9, 16) and fresh.lit0_dwc_weight.shape == (16, 1, 5, 5)
    expected = x + model.to_out(linear_attention_reference(q, k, v)[:, 0] + local)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], expected.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="at least 1 head"):
        LinearAttentionOptions(heads=0)
    with pytest.raises(UsageError, match="odd"):
        LinearAttentionOptions(kernel=4)


def test_einsum_site_single_head():
    """The test zoo's UNet attention: einsum ``bci,bcj->bij`` scores and ``bij,bcj->bci`` output."""
    torch.manual_seed(0)
    model = zoo.ConvAttention(8).eval()
    x = torch.randn(2, 8, 4, 4)
    _, gm, replaced, _ = _substitute(model, (x,), LinearAttentionOptions(fresh_qkv=False))
    assert replaced == 1
    fresh = getattr(gm, FRESH)
    q, k, v = model.qkv(model.norm(x)).reshape(2, 3, 8, 16).unbind(1)
    q, k, v = (t.transpose(1, 2)[:, None] for t in (q, k, v))  # [B, 1 head, N, C]
    out = linear_attention_reference(q, k, v) + _dwc(v, fresh.lit0_dwc_weight, fresh.lit0_dwc_bias, 4)
    expected = x + model.proj(out[:, 0].transpose(1, 2).reshape(2, 8, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], expected.detach(), rtol=1e-5, atol=1e-5)


def test_the_source_graph_and_model_are_left_as_they_were():
    model, args, kwargs = zoo.dit()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt = graphopt.optimize(model, args, kwargs)
    before = opt.captured.run(opt.captured.example_inputs)
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions())
    assert replaced == 3 and not hasattr(opt.captured.graph_module, FRESH)
    torch.testing.assert_close(opt.captured.run(opt.captured.example_inputs), before, rtol=0, atol=0)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_cross_attention_is_left_alone_unless_asked():
    model, args, kwargs = zoo.text_unet()
    opt = graphopt.optimize(model, args, kwargs)
    ctx = PassContext("linear-attention")
    _, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(), ctx)
    assert replaced == 4 and sum("cross-attention" in note for note in ctx.notes) == 4
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(cross=True))
    assert replaced == 8
    # cross-attention keys lie on no image grid: those sites get the op without the depthwise-conv branch
    assert sorted(len(n.args) for n in _lit_calls(gm)) == [4] * 4 + [6] * 4


def test_keys_and_values_merged_across_layers_get_fresh_linears_of_their_own():
    """The default pipeline merges the key and value projections of the text context into one matmul for
    all four cross-attention layers: each replaced site gets new linears for its own columns (k, v), the
    shared matmul is not initialised afresh for one site, and it goes once no site reads it."""
    model, args, kwargs = zoo.text_unet()
    opt = graphopt.optimize(model, args, kwargs)
    merge = next(r for r in opt.report.passes if r.name == "merge-linears")
    assert any("8 linears" in note for note in merge.notes)  # to_k, to_v of four layers
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(cross=True))
    assert replaced == 8
    fresh = {name for name, _ in getattr(gm, FRESH).named_parameters()}
    split = sorted(n for n in fresh if "_kv" in n)
    assert len(split) == 8 and all(n.endswith(("_kv0_weight", "_kv1_weight")) for n in split)
    assert not any(n.endswith("_kv_weight") for n in fresh)
    merged = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("_merged_")
              and tuple(n.meta["val"].shape)[0] == 8 * 16]
    assert merged == []  # every cross-attention reads its own linears now: the shared matmul went
    assert all(torch.isfinite(t).all() for t in gm(*opt.captured.example_inputs))


def test_a_projection_also_read_outside_the_attention_is_not_initialised_afresh():
    """A fused qkv whose output another layer reads too: initialising it afresh would change that layer."""

    class AlsoRead(SeparateQKV):
        def forward(self, x):
            b, n, c = x.shape
            qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            fused = F.linear(x, qkv)
            q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in fused.chunk(3, -1))
            out = F.scaled_dot_product_attention(q, k, v)
            return x + self.to_out(out.transpose(1, 2).reshape(b, n, c)) + fused.sum(-1, keepdim=True)

    opt = graphopt.optimize(AlsoRead().eval(), (torch.randn(2, 16, 16),))
    ctx = PassContext("linear-attention")
    _, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(), ctx)
    assert replaced == 0 and len(ctx.notes) == 1
    assert "is also read by sum" in ctx.notes[0] and "fresh_qkv=False" in ctx.notes[0]
    _, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(fresh_qkv=False))
    assert replaced == 1


@pytest.mark.parametrize("factory, reason", [(zoo.mha, "not a square grid"), (zoo.uvit, "not a square grid")])
def test_sites_it_cannot_replace_are_listed_with_the_reason(factory, reason):
    model, args, kwargs = factory()
    opt = graphopt.optimize(model, args, kwargs)
    ctx = PassContext("linear-attention")
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions(), ctx)
    assert replaced == 0 and ctx.notes and all(reason in note for note in ctx.notes)


@pytest.fixture
def dit_context():
    from graphopt.models.samplers import Sampler, flow_times

    torch.manual_seed(0)
    model = zoo.TinyDiT().eval()  # velocity out, one channel in and out
    args = (torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10]))
    real = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    evaluator = QualityEvaluator.from_images(MeanStd(), real, proxy_samples=8, confirm_samples=12,
                                             confirm_seeds=(0,))
    sampler = Sampler("flow", "euler", flow_times(2), (1, 8, 8))
    return ApproxContext(model, sampler, args, evaluator, batch=12, progress=False)


def test_through_optimize_the_row_counts_sites_and_carries_the_measured_cost(dit_context, tmp_path):
    ctx = dit_context
    opt = graphopt.optimize(ctx.source, ctx.example_inputs, passes=["noop", "fold", "dce", "linear-attention"],
                            approx=ctx)
    row = opt.report.passes[-1]
    assert row.name == "linear-attention" and not row.exact and row.hits == 3
    cost = QualityCost.from_json(row.quality)
    assert cost.samples == 12 and cost.baseline == "before linear-attention"
    loaded = graphopt.load(opt.save(tmp_path / "lit"))  # saves and loads like any optimized module
    with torch.no_grad():
        torch.testing.assert_close(loaded(*ctx.example_inputs), opt(*ctx.example_inputs))
    report = graphopt.export_onnx(opt, tmp_path / "lit.onnx")
    assert report.max_abs_error < 1e-4


def test_a_model_without_attention_is_a_clear_error(dit_context):
    model, args, _ = zoo.list_unet()
    ctx = dit_context
    with pytest.raises(PassError, match="no attention site could be replaced"):
        LINEAR_ATTENTION.transform(graphopt.optimize(model, args), ctx, PassContext("linear-attention"))
    assert linear_attention_pass(LinearAttentionOptions(heads=1)).name == "linear-attention"
