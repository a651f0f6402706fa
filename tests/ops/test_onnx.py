"""ONNX translations of graphopt's ops: optimize, export, onnxruntime parity at two batch sizes."""

import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt.onnx import custom_translation_table


class LinearAttention(nn.Module):
    """LiT-style: q, k, v of shape (B, 2 heads, 16 tokens, 4) from one linear."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.ops.graphopt.linear_attention(q, k, v, 1e-6).transpose(1, 2).reshape(b, n, c)


class LinearAttentionDWC(nn.Module):
    """LiT's whole attention core: the above plus the depthwise conv of V on the 4 x 4 token grid, fused in."""

    def __init__(self, bias=True):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.dwc = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=bias)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.ops.graphopt.linear_attention(q, k, v, 1e-6, self.dwc.weight, self.dwc.bias)
        return out.transpose(1, 2).reshape(b, n, c)


class DynamicDWConv(nn.Module):
    """ATConv-style: per-sample 3 x 3 kernels for each of 4 channels, generated from the pooled input."""

    def __init__(self):
        super().__init__()
        self.value = nn.Conv2d(4, 4, 1)
        self.gen = nn.Linear(4, 4 * 9)

    def forward(self, x):
        b, c, h, w = x.shape
        kernels = self.gen(x.mean((2, 3))).reshape(b, c, 3, 3)
        return torch.ops.graphopt.dynamic_dwconv(self.value(x), kernels)


class BlockCausalAttention(nn.Module):
    """VAR-style: scales of 1, 2x2 and 3x3 tokens on levels 0, 1, 2; two heads of 8."""

    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("level", torch.tensor([0] + [1] * 4 + [2] * 9))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.ops.graphopt.block_causal_attention(q, k, v, self.level, self.scale)
        return out.transpose(1, 2).reshape(b, n, c)


CASES = {
    "linear_attention": (LinearAttention, (3, 16, 8)),
    "linear_attention_dwc": (LinearAttentionDWC, (3, 16, 8)),
    "linear_attention_dwc_no_bias": (lambda: LinearAttentionDWC(bias=False), (3, 16, 8)),
    "dynamic_dwconv": (DynamicDWConv, (3, 4, 6, 5)),
    "block_causal_attention": (BlockCausalAttention, (3, 14, 16)),
    "block_causal_attention_scaled": (lambda: BlockCausalAttention(scale=0.5), (3, 14, 16)),
}


def export(model, x, path):
    opt = graphopt.optimize(model, (x,))
    assert any(str(n.target).startswith("graphopt.") for n in opt.graph_module.graph.nodes)
    return graphopt.export_onnx(opt, path)


def assert_standard_ops_only(path):
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions


@pytest.mark.parametrize("name", sorted(CASES))
def test_translation_matches_onnxruntime_at_two_batch_sizes(tmp_path, name):
    factory, shape = CASES[name]
    path = tmp_path / f"{name}.onnx"
    report = export(factory().eval(), torch.randn(shape), path)
    assert report.batch_sizes == (3, 4) and report.max_abs_error < 1e-5, report.line()
    assert_standard_ops_only(path)
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch axis stays symbolic"


@pytest.mark.parametrize("name", ["linear_attention", "linear_attention_dwc", "dynamic_dwconv",
                                  "block_causal_attention"])
def test_half_precision_computes_in_fp32_like_the_reference(tmp_path, name):
    factory, shape = CASES[name]
    path = tmp_path / f"{name}.onnx"
    report = export(factory().eval().half(), torch.randn(shape).half(), path)
    assert report.max_abs_error < 2e-3, report.line()
    inputs = onnx.load(str(path)).graph.input
    assert inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_every_op_of_the_package_has_a_translation():
    ops = {name for name in graphopt.ops.__all__ if isinstance(getattr(graphopt.ops, name), torch.library.CustomOpDef)}
    table = {str(t).removeprefix("graphopt.").removesuffix(".default"): f
             for t, f in custom_translation_table().items()}
    assert set(table) == ops
    assert all(f.__module__ == f"graphopt.ops.{name}" for name, f in table.items())  # one op, one file


@torch.library.custom_op("graphopt::untranslated_test_op", mutates_args=())
def untranslated(x: torch.Tensor) -> torch.Tensor:
    """An op in graphopt's namespace without an ONNX translation."""
    return x * 2


@untranslated.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Untranslated(nn.Module):
    def forward(self, x):
        return torch.ops.graphopt.untranslated_test_op(torch.ops.graphopt.linear_attention(x, x, x, 1e-6))


def test_an_op_without_translation_is_refused_clearly(tmp_path):
    opt = graphopt.optimize(Untranslated().eval(), (torch.randn(2, 2, 5, 4),))
    with pytest.raises(graphopt.OnnxExportError, match="graphopt.untranslated_test_op, which have no ONNX translation"):
        graphopt.export_onnx(opt, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
