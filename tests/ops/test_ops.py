"""graphopt's custom ops: reference semantics, export through the fake implementation, save and load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.ops import dynamic_dwconv_reference, linear_attention_reference


def test_linear_attention_is_the_normalised_kernel_sum():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    out = torch.ops.graphopt.linear_attention(q, k, v, 1e-6)
    scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # the quadratic form it reassociates
    torch.testing.assert_close(out, (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(out, linear_attention_reference(q, k, v))
    assert out.shape == (2, 3, 5, 6)


def _lit_branch_inputs(dtype=torch.float64, side=3, heads=2, d=3, d_v=2, size=3):
    g = torch.Generator().manual_seed(0)
    shapes = [(1, heads, side * side, d), (1, heads, side * side, d), (1, heads, side * side, d_v),
              (heads * d_v, 1, size, size), (heads * d_v,)]
    return [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def test_linear_attention_with_dwc_branch_adds_the_depthwise_conv_of_v_on_its_token_grid():
    q, k, v, w, b = (t.detach().float() for t in _lit_branch_inputs(side=4, size=5))
    image = v.permute(0, 1, 3, 2).reshape(1, 4, 4, 4)  # [B, heads * Dv, side, side]
    local = F.conv2d(image, w, b, padding=2, groups=4).reshape(1, 2, 2, 16).permute(0, 1, 3, 2)
    out = torch.ops.graphopt.linear_attention(q, k, v, 1e-6, w, b)
    torch.testing.assert_close(out, torch.ops.graphopt.linear_attention(q, k, v, 1e-6) + local)
    torch.testing.assert_close(torch.ops.graphopt.linear_attention(q, k, v, dwc_weight=w),
                               torch.ops.graphopt.linear_attention(q, k, v) + local - b[None, :, None].reshape(1, 2, 1, 2))
    with pytest.raises(ValueError, match=r"one square token grid \(Nq = Nk = side\*side\), got Nq = 15"):
        torch.ops.graphopt.linear_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], 1e-6, w, b)
    torch.library.opcheck(torch.ops.graphopt.linear_attention.default, (q, k, v, 1e-6, w, b))


@pytest.mark.parametrize("given", ["weight and bias", "weight", "none"])
def test_linear_attention_gradients_reach_q_k_v_and_the_branch(given):
    """Distillation trains the branch's weight and bias through the op (graphopt.distill)."""
    q, k, v, w, b = _lit_branch_inputs()
    extra = {"weight and bias": (w, b), "weight": (w,), "none": ()}[given]
    assert torch.autograd.gradcheck(lambda *t: torch.ops.graphopt.linear_attention(*t[:3], 1e-6, *t[3:]),
                                    (q, k, v, *extra))


def test_dynamic_dwconv_gives_each_sample_its_own_kernel():
    v, w = torch.randn(2, 3, 6, 5), torch.randn(2, 3, 3, 3)
    out = torch.ops.graphopt.dynamic_dwconv(v, w)
    for b in range(2):
        torch.testing.assert_close(out[b], F.conv2d(v[b:b + 1], w[b][:, None], padding=1, groups=3)[0])
    torch.testing.assert_close(out, dynamic_dwconv_reference(v, w))


class UsesOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.gen = nn.Linear(8, 9)

    def forward(self, x):  # x: (B, 16, 8), a 4 x 4 token grid
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.ops.graphopt.linear_attention(q, k, v, 1e-6).transpose(1, 2).reshape(b, n, c)
        kernels = self.gen(x.mean(1))[:, None, :].expand(b, c, 9).reshape(b, c, 3, 3)
        grid = y.transpose(1, 2).reshape(b, c, 4, 4)
        return torch.ops.graphopt.dynamic_dwconv(grid, kernels)


def test_graphs_holding_the_ops_capture_optimize_save_and_load(tmp_path):
    model, x = UsesOps().eval(), torch.randn(3, 16, 8)
    opt = graphopt.optimize(model, (x,))
    targets = {str(n.target) for n in opt.graph_module.graph.nodes}
    assert {"graphopt.linear_attention.default", "graphopt.dynamic_dwconv.default"} <= targets
    with torch.no_grad():
        assert opt(torch.randn(5, 16, 8)).shape == (5, 8, 4, 4)
    opt.save(tmp_path / "m")
    loaded = graphopt.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_lowering_puts_the_ops_on_their_kernels():
    pytest.importorskip("triton")
    model, x = UsesOps().eval(), torch.randn(3, 16, 8)
    opt = graphopt.optimize(model, (x,), target="cuda")  # TRITON_INTERPRET=1 in the suite: on the CPU
    kernels = {r["kernel"] for r in opt.report.lowering["regions"] if r["kind"] == "attention"}
    assert kernels == {"linear_attention", "dynamic_dwconv"}
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_onnx_export_of_a_graph_with_the_ops_matches_onnxruntime(tmp_path):
    opt = graphopt.optimize(UsesOps().eval(), (torch.randn(3, 16, 8),))
    report = graphopt.export_onnx(opt, tmp_path / "m.onnx")  # tests/ops/test_onnx.py: each translation
    assert report.batch_sizes == (3, 4) and report.max_abs_error < 1e-5, report.line()


def test_block_causal_attention_by_levels():
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    same = torch.zeros(6, dtype=torch.long)  # one level: everyone sees everyone
    torch.testing.assert_close(torch.ops.graphopt.block_causal_attention(q, k, v, same),
                               F.scaled_dot_product_attention(q, k, v))
    causal = torch.arange(6)  # one token per level: plain causal attention
    torch.testing.assert_close(torch.ops.graphopt.block_causal_attention(q, k, v, causal, 0.5),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5))


class VARAttention(nn.Module):
    """Scales of 1, 2x2 and 3x3 tokens: 14 tokens on levels 0, 1, 2."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("level", torch.tensor([0] + [1] * 4 + [2] * 9))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.ops.graphopt.block_causal_attention(q, k, v, self.level).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_causal_attention_is_lowered_onto_the_flash_kernel(dtype):
    pytest.importorskip("triton")
    model, x = VARAttention().eval().to(dtype), torch.randn(3, 14, 16, dtype=dtype)
    opt = graphopt.optimize(model, (x,), target="cuda")
    assert [(r["kind"], r["kernel"]) for r in opt.report.lowering["regions"]] == [("attention",
                                                                                     "block_causal_attention")]
    (site,) = opt.kernel_modules()
    assert not site.configs()[0].get("ATEN")  # the kernel by default: it skips masked key blocks
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=2e-3, rtol=2e-3)
