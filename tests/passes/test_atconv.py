"""The atconv pass: ATConv (attentive 3x3 convolution) in place of self-attention in transformer blocks."""

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import DistillConfig, PassError, UsageError, distill
from graphopt.ops import dynamic_dwconv_reference
from graphopt.passes.atconv import ATConvOptions, atconv_pass, substitute_atconv
from graphopt.passes.linear_attention import FRESH
from graphopt.pipeline import PassContext
from graphopt.quality import QualityCost
from tests import zoo
from tests.passes.test_linear_attention import SeparateQKV, dit_context  # noqa: F401 - the fixture


def test_a_site_becomes_the_atconv_formula():
    torch.manual_seed(0)
    model = SeparateQKV(dim=8, heads=2).eval()
    x = torch.randn(2, 16, 8)  # a 4 x 4 token grid
    opt = graphopt.optimize(model, (x,))
    gm, replaced = substitute_atconv(opt.captured.graph_module, ATConvOptions(seed=1))
    assert replaced == 1
    f = getattr(gm, FRESH)
    routed = F.linear(x, f.atc0_k_weight, f.atc0_k_bias).transpose(1, 2)  # [B, C, N]
    kernels = F.linear(F.gelu(F.adaptive_avg_pool1d(routed, 9), approximate="tanh"), f.atc0_gen_weight,
                       f.atc0_gen_bias).reshape(2, 8, 3, 3)
    kernels = kernels - torch.sigmoid(f.atc0_lambda).view(1, 8, 1, 1) * kernels.mean((2, 3), keepdim=True)
    value = model.to_v(x).transpose(1, 2).reshape(2, 8, 4, 4)
    y = dynamic_dwconv_reference(value, kernels).reshape(2, 8, 16).transpose(1, 2)
    expected = x + model.to_out(y)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(f.atc0_lambda) == 0
    assert sum(p.numel() for p in f.parameters()) == 8 * 8 + 8 + 81 + 9 + 8  # C^2 + C + k^4 + k^2 + C
    # the routing linear runs on the k^2 pooled rows, not on the 16 tokens (pooling first is exact)
    routing = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
               and str(n.args[1].target).endswith("atc0_k_weight")]
    assert [tuple(n.meta["val"].shape) for n in routing] == [(2, 9, 8)]


def test_fused_qkv_value_rows_are_shared_and_hybrid_takes_every_second_site():
    model, args, kwargs = zoo.dit()
    opt = graphopt.optimize(model, args, kwargs)
    ctx = PassContext("atconv")
    gm, replaced = substitute_atconv(opt.captured.graph_module, ATConvOptions(), ctx)
    assert replaced == 3 and not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    shared = {p.data_ptr() for p in model.parameters()}
    qkv = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("qkv.weight")]
    assert len(qkv) == 3  # the value rows are sliced in the graph from the trained weight, not copied
    from graphopt.passes._substitution import attribute

    assert all(attribute(gm, n.target).data_ptr() in shared for n in qkv)
    gm, replaced = substitute_atconv(opt.captured.graph_module, ATConvOptions(hybrid=True, drop_pos_embed=True),
                                     ctx := PassContext("atconv"))
    assert replaced == 1 and sum("scaled_dot_product" in str(n.target) for n in gm.graph.nodes) == 2
    assert any("position embedding" in note and "dropped" in note for note in ctx.notes)
    with pytest.raises(UsageError, match="odd"):
        ATConvOptions(kernel=2)


def test_the_values_are_the_columns_the_attention_reads_from_a_merged_projection():
    """Values projected first: merge-linears stacks the weights v, q, k in graph order. The value linear
    is cut from the rows the attention's value operand slices (0:8), not the last third (the keys)."""

    class ValuesFirst(SeparateQKV):
        def forward(self, x):
            b, n, c = x.shape
            values = self.to_v(x)
            q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                       for t in (self.to_q(x), self.to_k(x), values))
            out = F.scaled_dot_product_attention(q, k, v)
            return x + self.to_out(out.transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    model = ValuesFirst(dim=8, heads=2).eval()
    x = torch.randn(2, 16, 8)
    opt = graphopt.optimize(model, (x,))
    assert any(r.name == "merge-linears" and r.hits == 3 for r in opt.report.passes)
    gm, replaced = substitute_atconv(opt.captured.graph_module, ATConvOptions(seed=1))
    assert replaced == 1
    rows = [n.args[2:] for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[1] == 0]
    assert rows == [(0, 8), (0, 8)]  # the weight's and the bias's value rows
    f = getattr(gm, FRESH)
    routed = F.linear(x, f.atc0_k_weight, f.atc0_k_bias).transpose(1, 2)
    kernels = F.linear(F.gelu(F.adaptive_avg_pool1d(routed, 9), approximate="tanh"), f.atc0_gen_weight,
                       f.atc0_gen_bias).reshape(2, 8, 3, 3)
    kernels = kernels - torch.sigmoid(f.atc0_lambda).view(1, 8, 1, 1) * kernels.mean((2, 3), keepdim=True)
    value = model.to_v(x).transpose(1, 2).reshape(2, 8, 4, 4)
    y = dynamic_dwconv_reference(value, kernels).reshape(2, 8, 16).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], (x + model.to_out(y)).detach(), rtol=1e-5, atol=1e-5)


def test_cross_attention_and_other_layouts_are_listed():
    model, args, kwargs = zoo.text_unet()
    ctx = PassContext("atconv")
    _, replaced = substitute_atconv(graphopt.optimize(model, args, kwargs).captured.graph_module, ATConvOptions(),
                                    ctx)
    assert replaced == 4 and sum("cross-attention" in note for note in ctx.notes) == 4
    model, args, kwargs = zoo.mha()
    ctx = PassContext("atconv")
    _, replaced = substitute_atconv(graphopt.optimize(model, args, kwargs).captured.graph_module, ATConvOptions(),
                                    ctx)
    assert replaced == 0 and len(ctx.notes) == 2 and all("[B, N, C]" in note for note in ctx.notes)
    with pytest.raises(PassError, match="no attention site could be replaced"):
        atconv_pass().transform(graphopt.optimize(model, args, kwargs), None, PassContext("atconv"))


def test_through_optimize_distil_save_and_export(dit_context, tmp_path):
    ctx = dit_context
    opt = graphopt.optimize(ctx.source, ctx.example_inputs, passes=["noop", "fold", "dce", "atconv"], approx=ctx)
    row = opt.report.passes[-1]
    assert row.name == "atconv" and row.hits == 3 and QualityCost.from_json(row.quality).samples == 12
    report = distill(opt, ctx.source, config=DistillConfig(steps=4, batch=4, checkpoint_every=2), context=ctx,
                     progress=False)
    assert report.quality is not None and opt.report.passes[-1].name == "distill"
    loaded = graphopt.load(opt.save(tmp_path / "atc"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*ctx.example_inputs), opt(*ctx.example_inputs))
    assert graphopt.export_onnx(opt, tmp_path / "atc.onnx").max_abs_error < 1e-4
