"""Partitioning captured graphs into pointwise, norm and attention regions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.autotune.regions import partition
from graphopt.capture import capture


def regions_of(model, *args):
    gm = capture(model.eval(), args).graph_module
    return gm, partition(gm)


def ops(part):
    return [(r.kind, r.ops()) for r in part.regions]


class AdaLN(nn.Module):
    """DiT's block epilogue and prologue: modulate(LN(x), shift, scale), then a gated residual."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, c):
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=1)
        h = self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return x + gate.unsqueeze(1) * self.proj(h)


def test_adaln_modulate_fuses_into_the_norm_and_the_gated_residual_is_one_region():
    gm, part = regions_of(AdaLN(), torch.randn(2, 5, 16), torch.randn(2, 16))
    assert ops(part) == [("pointwise", ["silu"]), ("norm", ["layer_norm", "add", "mul", "add"]),
                         ("pointwise", ["mul", "add"])]
    norm = part.regions[1]
    # 1 + scale has shape (B, 1, D): recomputed inside the (B, N, D) kernel, never written out
    assert [tuple(n.meta["val"].shape) for n in norm.outputs] == [(2, 5, 16)]
    assert len(norm.outputs) == 1 and str(norm.domain[0]).startswith("s")  # the batch stays symbolic
    assert dict(part.left_on_aten) == {"linear": 2}


class GroupNormSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x, emb):
        h = self.conv(F.silu(self.norm(x)))
        return h + emb[:, :, None, None]


def test_groupnorm_takes_its_silu_and_the_add_after_the_conv_is_its_own_region():
    _, part = regions_of(GroupNormSiLU(), torch.randn(2, 6, 5, 7), torch.randn(2, 6))
    assert ops(part) == [("norm", ["group_norm", "silu"]), ("pointwise", ["add"])]
    assert dict(part.left_on_aten) == {"conv2d": 1}


class Diamond(nn.Module):
    """a feeds a matmul and the add after it: a and c in one kernel would need the matmul inside."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        a = torch.sigmoid(x * 2)
        return a + self.lin(a)


def test_a_merge_that_would_need_an_outside_op_inside_the_kernel_is_refused():
    _, part = regions_of(Diamond(), torch.randn(3, 8))
    assert ops(part) == [("pointwise", ["mul", "sigmoid"]), ("pointwise", ["add"])]
    first = part.regions[0]
    assert [n.name for n in first.outputs] == ["sigmoid"]  # read by the linear and by the add


class SharedSmall(nn.Module):
    """1 + s is read by two different full-size groups: it is written once, not recomputed."""

    def forward(self, x, y, s):
        t = 1 + s
        return torch.relu(x * t), torch.exp(y) @ t.transpose(-1, -2)


def test_a_small_node_read_outside_the_group_is_not_inlined():
    _, part = regions_of(SharedSmall(), torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 1, 8))
    kinds = ops(part)
    assert ("pointwise", ["add"]) in kinds and ("pointwise", ["mul", "relu"]) in kinds


class Attn(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_only_plain_attention_becomes_an_attention_region():
    q = torch.randn(2, 2, 5, 8)
    _, part = regions_of(Attn(), q, q.clone(), q.clone(), torch.ones(5, 5, dtype=torch.bool))
    assert [r.kind for r in part.regions].count("attention") == 1
    assert dict(part.left_on_aten) == {"scaled_dot_product_attention": 1}


class IntOps(nn.Module):
    def forward(self, x, idx):
        return x * 2, idx + 1


def test_integer_tensors_stay_on_aten():
    _, part = regions_of(IntOps(), torch.randn(2, 3), torch.arange(6).reshape(2, 3))
    assert ops(part) == [("pointwise", ["mul"])]
    assert dict(part.left_on_aten) == {"add": 1}


@pytest.mark.parametrize("exponent,fused", [(2.0, True), (0.5, True), (-1.0, True), (2.7, False)])
def test_pow_is_fused_for_the_exponents_it_has_an_exact_form_for(exponent, fused):
    class Pow(nn.Module):
        def forward(self, x):
            return (x.abs() + 1) ** exponent

    _, part = regions_of(Pow(), torch.randn(2, 3))
    assert (["abs", "add", "pow"] in [r.ops() for r in part.regions]) == fused


class ResidualThenNorm(nn.Module):
    """DiT between blocks: the gated residual feeds the next block's LayerNorm and the next residual."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, gate):
        x = x + gate.unsqueeze(1) * y
        return x, self.proj(self.norm(x))


def test_the_pointwise_producer_of_a_norm_input_becomes_its_prologue():
    _, part = regions_of(ResidualThenNorm(), torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 16))
    (region,) = part.regions
    assert region.kind == "norm" and region.ops() == ["mul", "add", "layer_norm"]
    assert [n.target.__name__.split(".")[0] for n in region.prologue()] == ["mul", "add"]
    assert [n.name for n in region.outputs] == ["add", "layer_norm"]  # the new residual is still stored


def test_groupnorm_takes_the_embedding_add_before_it():
    class ResBlockTail(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 6)

        def forward(self, h, emb):
            return F.silu(self.norm(h + emb[:, :, None, None]))

    _, part = regions_of(ResBlockTail(), torch.randn(2, 6, 5, 7), torch.randn(2, 6))
    assert ops(part) == [("norm", ["add", "group_norm", "silu"])]
