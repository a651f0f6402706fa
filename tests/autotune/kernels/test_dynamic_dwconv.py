import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from graphopt.autotune.kernels.dynamic_dwconv import (configs, dynamic_dwconv,  # noqa: E402
                                                      dynamic_dwconv_reference)
from tests.autotune.kernels.helpers import HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_H": 4, "BLOCK_W": 4, "num_warps": 1, "num_stages": 1}  # 2 x 2 tiles with ragged edges on 7 x 6


def shifted_taps(v, kernels):
    """sum_{i,j} K[:, :, i, j] * V shifted by (i - p, j - p), zero-padded: the definition, tap by tap."""
    k = kernels.shape[-1]
    p = k // 2
    padded = F.pad(v, (p, p, p, p))
    h, w = v.shape[-2:]
    return sum(kernels[:, :, i, j, None, None] * padded[:, :, i:i + h, j:j + w] for i in range(k) for j in range(k))


@pytest.mark.parametrize(("shape", "config"), [
    ((2, 3, 7, 6), SMALL),
    ((2, 3, 7, 6), None),
    ((1, 2, 1, 5), SMALL),  # a single row: every vertical tap but the centre reads padding
    ((1, 1, 1, 1), None),
])
def test_matches_reference(shape, config):
    v, kernels = torch.randn(shape), torch.randn(*shape[:2], 3, 3)
    close(dynamic_dwconv(v, kernels, config=config), dynamic_dwconv_reference(v, kernels))


def test_every_config():
    v, kernels = torch.randn(1, 2, 7, 6), torch.randn(1, 2, 3, 3)
    expected = dynamic_dwconv_reference(v, kernels)
    for config in configs():
        close(dynamic_dwconv(v, kernels, config=config), expected)


def test_other_odd_kernel_size_and_strided_input():
    v = torch.randn(1, 5, 6, 1).permute(0, 3, 1, 2)  # (B, C, H, W) = (1, 1, 5, 6), channels-last strides
    kernels = torch.randn(1, 1, 5, 5)
    close(dynamic_dwconv(v, kernels, config=SMALL), dynamic_dwconv_reference(v, kernels))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    v, kernels = torch.randn(1, 2, 7, 6).to(dtype), torch.randn(1, 2, 3, 3).to(dtype)
    close(dynamic_dwconv(v, kernels, config=SMALL), dynamic_dwconv_reference(v, kernels))


def test_reference_matches_the_definition():
    v, kernels = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(dynamic_dwconv_reference(v, kernels), shifted_taps(v, kernels))


def test_empty_input():
    assert dynamic_dwconv(torch.randn(0, 3, 4, 4), torch.randn(0, 3, 3, 3)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize(("call", "message"), [
    (lambda v, k: dynamic_dwconv(v.double(), k.double()), "v must be float32"),
    (lambda v, k: dynamic_dwconv(v, k.half()), "kernels must have the same dtype as the input"),
    (lambda v, k: dynamic_dwconv(v.to("meta"), k.to("meta")), "tensors are on meta"),
    (lambda v, k: dynamic_dwconv(v[0], k), r"v must have shape \(B, C, H, W\)"),
    (lambda v, k: dynamic_dwconv(v, k[:, :2]), r"kernels must have shape \(2, 3, 3, 3\)"),
    (lambda v, k: dynamic_dwconv(v, torch.randn(2, 3, 2, 2)), r"kernels must have shape \(2, 3, k, k\) with k odd"),
    (lambda v, k: dynamic_dwconv(v, k, config={**SMALL, "BLOCK_W": 3}), "BLOCK_W=3 must be a power of two"),
])
def test_preconditions(call, message):
    v, kernels = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=message):
        call(v, kernels)
