import copy

import torch

from graphopt.verify import bound_text, compare, compare_precise, precise_run, tolerance


def test_identical_outputs_have_zero_error():
    x = torch.randn(4, 4)
    cmp = compare([x], [x.clone()])
    assert cmp.within and cmp.max_abs_error == 0 and cmp.max_rel_error == 0


def test_tolerance_scales_with_magnitude_and_dtype():
    ref = torch.full((8,), 1000.0)
    assert compare([ref + 0.05], [ref]).within           # 5e-5 relative: within fp32's 1e-4
    assert not compare([ref + 1.0], [ref]).within        # 1e-3 relative: beyond it
    half = ref.half()
    assert compare([half + 4], [half]).within           # fp16 is looser
    assert tolerance(torch.int64) == (0.0, 0.0)
    assert not compare([torch.tensor([1, 2])], [torch.tensor([1, 3])]).within


def test_shape_count_and_nan_mismatches_fail():
    x = torch.zeros(3)
    assert not compare([x], [torch.zeros(4)]).within
    assert not compare([x], [x, x]).within
    assert not compare([torch.tensor([float("nan")])], [torch.tensor([0.0])]).within
    assert compare([torch.tensor([float("nan")])], [torch.tensor([float("nan")])]).within


# ------------------------------------------------------------------ fp16/bf16: an fp32 run as the referee


def _rounded(exact, offset, index=0, dtype=torch.bfloat16):
    """``exact`` with ``offset`` added at ``index``, in ``dtype``."""
    out = exact.clone()
    out[index] += offset
    return out.to(dtype)


def _refuse():
    raise AssertionError("the fp32 run is only needed when the plain bound fails")


def test_every_comparison_states_its_bound():
    x = torch.ones(3, dtype=torch.bfloat16)
    assert compare([x], [x]).tolerance == "bfloat16: max|err| <= 0.01 + 0.02 x max|ref|"
    assert "float32: max|err| <= 1e-05 + 0.0001" in compare([x.float(), x], [x.float(), x]).line()
    assert bound_text([torch.int64]) == "int64: exact"
    assert bound_text([torch.float16], atol=0.5, rtol=0.0) == "float16: max|err| <= 0.5 + 0 x max|ref|"


def test_two_roundings_as_far_from_the_exact_result_pass_where_the_plain_bound_fails():
    exact = torch.linspace(0, 1, 64)
    original = _rounded(exact, 0.03)     # the original's own error: 0.03
    candidate = _rounded(exact, -0.03)   # as far, the other way: 0.06 from the original
    assert not compare([candidate], [original]).within
    cmp = compare_precise([candidate], [original], lambda: [exact])
    assert cmp.within and cmp.max_abs_error > 0.05  # errors stay those against the original
    assert "against an fp32 run of the same graph" in cmp.tolerance and "x the original's own 0.03" in cmp.tolerance


def test_a_candidate_further_than_twice_the_originals_error_fails():
    exact = torch.linspace(0, 1, 64)
    cmp = compare_precise([_rounded(exact, -0.08)], [_rounded(exact, 0.03)], lambda: [exact])
    assert not cmp.within and "max|err| 0.08" in cmp.line() and "FAILED" in cmp.line()


def test_the_fp32_run_is_not_needed_when_the_plain_bound_holds_or_nothing_is_half():
    exact = torch.linspace(0, 1, 64)
    assert compare_precise([_rounded(exact, 0.001)], [_rounded(exact, 0.0)], _refuse).within
    assert not compare_precise([exact + 1], [exact], _refuse).within  # fp32 outputs keep the plain bound
    assert not compare_precise([exact[:3].bfloat16()], [exact.bfloat16()], _refuse).within  # shapes differ


def test_outputs_of_other_dtypes_keep_their_plain_bound_beside_half_ones():
    exact = torch.linspace(0, 1, 64)
    half = [_rounded(exact, -0.03), _rounded(exact, 0.03)]
    ok = compare_precise([half[0], exact], [half[1], exact], lambda: [exact, exact])
    bad = compare_precise([half[0], exact + 1], [half[1], exact], lambda: [exact, exact])
    assert ok.within and not bad.within


class _Rounding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("shift", torch.full((8,), 0.1))

    def forward(self, x):
        return (self.lin(x).float() * 3.1 + self.shift).to(torch.bfloat16)


def test_precise_run_raises_weights_inputs_and_dtype_arguments_and_leaves_the_graph_alone():
    torch.manual_seed(0)
    model = _Rounding()
    exact_model = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model.to(torch.bfloat16))
    code = gm.code
    x = torch.randn(4, 8)
    [out] = precise_run(gm, [x.bfloat16()])
    with torch.no_grad():
        exact_model.lin.weight.copy_(model.lin.weight.float())
        exact_model.lin.bias.copy_(model.lin.bias.float())
        exact_model.shift.copy_(model.shift.float())
        want = exact_model.lin(x.bfloat16().float()) * 3.1 + exact_model.shift
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    assert gm.code == code and gm.lin.weight.dtype == torch.bfloat16 and gm.shift.dtype == torch.bfloat16
    assert gm(x.bfloat16()).dtype == torch.bfloat16
