import torch

from graphopt.verify import compare, tolerance


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
