"""The generated Triton source: index math, symbolic batch, one kernel per distinct region."""

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.autotune.codegen import FloorDiv, ModIndex, generate, merged_dims, offset, pyexpr
from graphopt.autotune.regions import Operand, partition
from graphopt.capture import capture

B = sympy.Symbol("s0", integer=True, positive=True)
X = sympy.Symbol("xindex", integer=True, nonnegative=True)
ONE, ZERO = sympy.Integer(1), sympy.Integer(0)


def op(shape, strides):
    return Operand(None, tuple(sympy.sympify(s) for s in shape), tuple(sympy.sympify(s) for s in strides))


def test_a_contiguous_full_operand_reads_at_the_flat_index():
    domain = (B, sympy.Integer(5), sympy.Integer(16))
    full = op((B, 5, 16), (80, 16, 1))
    groups = merged_dims(domain, [full])
    assert groups == [[0, 1, 2]] and offset(full, domain, groups, X) == X


def test_a_per_sample_shift_reads_one_row_per_sample():
    domain = (B, sympy.Integer(5), sympy.Integer(16))
    full = op((B, 5, 16), (80, 16, 1))
    shift = op((B, 1, 16), (48, 16, 1))  # a chunk of a (B, 48) projection, unsqueezed
    groups = merged_dims(domain, [full, shift])
    assert groups == [[0], [1, 2]] or groups == [[0], [1], [2]]
    assert pyexpr(offset(shift, domain, groups, X)) == "48*(xindex // 80) + (xindex % 16)"


def test_a_transposed_operand_uses_its_strides():
    domain = (sympy.Integer(4), sympy.Integer(6))
    t = op((4, 6), (1, 4))
    groups = merged_dims(domain, [t])
    assert groups == [[0], [1]]
    assert pyexpr(offset(t, domain, groups, X)) == "(xindex // 6) + 4*(xindex % 6)"


def test_a_symbolic_inner_size_divides_as_one_number():
    """With the batch inside (a (G, B, 32) domain: branches stacked ahead of the batch), the outer
    index divides by 32*B; printed without parentheses, ``x // 32*s0`` is ``(x // 32)*s0``."""
    domain = (sympy.Integer(3), B, sympy.Integer(32))
    bias = op((3, 1, 32), (32, 32, 1))
    text = pyexpr(offset(bias, domain, merged_dims(domain, [bias]), X))
    assert text == "32*(xindex // (32*s0)) + (xindex % 32)"
    for x in range(3 * 5 * 32):  # at batch 5, against the index it stands for
        assert eval(text, {"xindex": x, "s0": 5}) == 32 * (x // (5 * 32)) + x % 32


def test_index_helpers_simplify():
    assert FloorDiv(X, 1) == X and FloorDiv(FloorDiv(X, 4), 3) == FloorDiv(X, 12) and ModIndex(X, 1) == 0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(3)])

    def forward(self, x, scale):
        for norm in self.norms:
            x = x + F.gelu(norm(x) * (1 + scale[:, None]), approximate="tanh")
        return x


def kernels_of(model, *args):
    gm = capture(model.eval(), args).graph_module
    return [generate(r) for r in partition(gm).regions]


def test_identical_regions_share_one_source_and_the_batch_is_an_argument_not_a_literal():
    kernels = kernels_of(Block(), torch.randn(3, 5, 16), torch.randn(3, 16))
    # each block is one norm region, the residual add included: x is read from outside, not produced inside
    assert len(kernels) == 3 and len({k.source for k in kernels}) == 1
    norm = kernels[0]
    assert norm.row == 16 and norm.name.startswith("fused_layer_norm_add_mul_gelu_")
    assert [n.target.__name__.split(".")[0] for n in norm.region.nodes] == ["layer_norm", "add", "mul", "gelu", "add"]
    src = norm.source
    assert "@triton.jit" in src and "# layer_norm" in src and "# gelu" in src and "tl.sigmoid" in src
    assert "tl.load(in0_ptr + xindex," in src  # contiguous x: the flat index, whatever the other operands do
    assert "16*(xindex // 80) + (xindex % 16)" in src  # the per-sample scale
    assert " 3" not in src.split("def ")[1].split("\n")[0]  # no batch literal in the signature
    compile(src, norm.name, "exec")  # valid Python


def test_repeated_values_are_computed_once():
    class Twice(nn.Module):
        def forward(self, x):
            y = x + 1
            return F.silu(y), F.silu(y) * 2

    (kernel,) = kernels_of(Twice(), torch.randn(2, 8))
    assert kernel.source.count("tl.sigmoid") == 1 and "same value as" in kernel.source


def test_a_pointwise_kernel_walks_its_output_in_memory_order():
    class Residual(nn.Module):
        def forward(self, x, y):  # x: (B, N, C) with a transposed layout, as patchify leaves it
            return x + y * 2

    x = torch.randn(2, 6, 5).transpose(1, 2)
    (kernel,) = kernels_of(Residual(), x, torch.randn(2, 5, 6))
    # the output and x (same layout) at the flat index; only the contiguous y needs index math
    assert "tl.store(out0_ptr + xindex," in kernel.source and kernel.source.count("_ptr + xindex,") == 2
