import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from graphopt.autotune.kernels.rmsnorm import configs, rmsnorm, rmsnorm_reference  # noqa: E402
from tests.autotune.kernels.helpers import HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_N": 8, "num_warps": 1, "num_stages": 1}  # several loop steps and a masked tail for N = 19


@pytest.mark.parametrize(("shape", "config", "with_weight"), [
    ((2, 3, 19), SMALL, True),
    ((2, 3, 19), None, True),
    ((4, 16), SMALL, False),
    ((1,), None, True),
])
def test_matches_reference(shape, config, with_weight):
    x = torch.randn(shape) + 1
    weight = torch.randn(shape[-1]) if with_weight else None
    close(rmsnorm(x, weight, eps=1e-6, config=config), rmsnorm_reference(x, weight, eps=1e-6))


def test_every_config():
    x, weight = torch.randn(3, 19), torch.randn(19)
    expected = rmsnorm_reference(x, weight)
    for config in configs():
        close(rmsnorm(x, weight, config=config), expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    x, weight = torch.randn(2, 3, 19).to(dtype), torch.randn(19).to(dtype)
    close(rmsnorm(x, weight, config=SMALL), rmsnorm_reference(x, weight))


def test_reference_matches_torch():
    x, weight = torch.randn(2, 3, 19), torch.randn(19)
    torch.testing.assert_close(rmsnorm_reference(x, weight, eps=1e-5), F.rms_norm(x, (19,), weight, eps=1e-5))
    torch.testing.assert_close(rmsnorm_reference(x, None, eps=1e-5), F.rms_norm(x, (19,), None, eps=1e-5))


def test_empty_input():
    assert rmsnorm(torch.randn(0, 5), None).shape == (0, 5)


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, w: rmsnorm(x.to(torch.int32), w), "x must be float32, float16 or bfloat16"),
    (lambda x, w: rmsnorm(x.to("meta"), w.to("meta")), "tensors are on meta"),
    (lambda x, w: rmsnorm(x, w.to("meta")), "all tensors must be on one device"),
    (lambda x, w: rmsnorm(x[:, ::2], w[:10]), "x must be contiguous"),
    (lambda x, w: rmsnorm(x, w[:5]), r"weight must have shape \(19,\)"),
    (lambda x, w: rmsnorm(x, torch.randn(38)[::2]), "weight must be contiguous"),
    (lambda x, w: rmsnorm(x, w, config={**SMALL, "BLOCK_M": 8}), "config needs exactly the keys"),
    (lambda x, w: rmsnorm(x, w, config={**SMALL, "num_warps": 0}), "num_warps=0 must be positive"),
])
def test_preconditions(call, message):
    x, weight = torch.randn(3, 19), torch.randn(19)
    with pytest.raises(ValueError, match=message):
        call(x, weight)
