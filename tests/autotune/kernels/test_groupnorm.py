import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from graphopt.autotune.kernels.groupnorm import configs, groupnorm, groupnorm_reference, num_splits  # noqa: E402
from tests.autotune.kernels.helpers import HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_SIZE": 16, "num_warps": 1, "num_stages": 1}  # groups of 2 x 35 values: 5 chunks, ragged tail


def _inputs(shape, dtype=torch.float32):
    x = torch.randn(shape) * 2 + 3
    c = shape[1]
    return x.to(dtype), torch.randn(c), torch.randn(c)


@pytest.mark.parametrize(("shape", "groups", "silu", "config"), [
    ((2, 6, 5, 7), 3, False, SMALL),
    ((2, 6, 5, 7), 3, True, SMALL),
    ((2, 6, 5, 7), 3, True, None),
    ((1, 8, 3), 8, True, SMALL),  # one channel per group, 1-D spatial
    ((3, 4), 2, False, None),  # no spatial dimensions
])
def test_matches_reference(shape, groups, silu, config):
    x, weight, bias = _inputs(shape)
    out = groupnorm(x, groups, weight, bias, eps=1e-6, silu=silu, config=config)
    close(out, groupnorm_reference(x, groups, weight, bias, eps=1e-6, silu=silu))


def test_split_statistics_merge_exactly():
    # the small config splits each group of 70 values into 5 chunks (the last one 6 values long):
    # the merged mean and variance must equal those of the whole group
    assert num_splits(6, 70, 16) == 5
    x, _, _ = _inputs((2, 6, 5, 7))
    close(groupnorm(x, 3, config=SMALL), groupnorm_reference(x, 3))


def test_without_affine_and_weight_only():
    x, weight, _ = _inputs((2, 6, 5, 7))
    close(groupnorm(x, 2, config=SMALL), groupnorm_reference(x, 2))
    close(groupnorm(x, 2, weight, config=SMALL), groupnorm_reference(x, 2, weight))


def test_every_config():
    x, weight, bias = _inputs((2, 4, 5, 7))
    expected = groupnorm_reference(x, 2, weight, bias, silu=True)
    for config in configs():
        close(groupnorm(x, 2, weight, bias, silu=True, config=config), expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    x, weight, bias = _inputs((2, 6, 5, 7), dtype)
    close(groupnorm(x, 3, weight, bias, silu=True, config=SMALL), groupnorm_reference(x, 3, weight, bias, silu=True))


def test_reference_matches_torch():
    x, weight, bias = _inputs((2, 6, 5, 7))
    torch.testing.assert_close(groupnorm_reference(x, 3, weight, bias, eps=1e-6),
                               F.group_norm(x, 3, weight, bias, 1e-6))
    torch.testing.assert_close(groupnorm_reference(x, 3, weight, bias, silu=True),
                               F.silu(F.group_norm(x, 3, weight, bias)))


def test_empty_input():
    assert groupnorm(torch.randn(0, 4, 3, 3), 2).shape == (0, 4, 3, 3)


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, w: groupnorm(x.double(), 3), "x must be float32, float16 or bfloat16"),
    (lambda x, w: groupnorm(x.to("meta"), 3), "tensors are on meta"),
    (lambda x, w: groupnorm(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), 3), "x must be contiguous"),
    (lambda x, w: groupnorm(x, 4), "num_groups=4 must be positive and divide the 6 channels"),
    (lambda x, w: groupnorm(x, 3, w[:4]), r"weight must have shape \(6,\)"),
    (lambda x, w: groupnorm(x[0, 0, 0], 1), r"x must have shape \(B, C, \*spatial\)"),
    (lambda x, w: groupnorm(x, 3, config={"BLOCK_N": 16, "num_warps": 1, "num_stages": 1}),
     "config needs exactly the keys"),
])
def test_preconditions(call, message):
    x, weight, _ = _inputs((2, 6, 5, 7))
    with pytest.raises(ValueError, match=message):
        call(x, weight)
