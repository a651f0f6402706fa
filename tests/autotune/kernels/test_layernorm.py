import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from graphopt.autotune.kernels.layernorm import configs, layernorm, layernorm_reference  # noqa: E402
from tests.autotune.kernels.helpers import HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_N": 8, "num_warps": 1, "num_stages": 1}  # several loop steps and a masked tail for N = 19


def _inputs(b, t, n, dtype=torch.float32):
    x = torch.randn(b, t, n) * 3 + 2  # a mean far from 0 catches E[x^2] - mu^2 cancellation
    weight, bias = torch.randn(n), torch.randn(n)
    scale, shift = torch.randn(b, 2 * n).chunk(2, dim=1)  # strided views, as adaLN's chunk gives them
    return x.to(dtype), weight, bias, scale, shift


@pytest.mark.parametrize(("b", "t", "n", "config"), [(2, 3, 19, None), (2, 3, 19, SMALL), (1, 1, 1, None),
                                                     (3, 5, 16, SMALL)])
def test_matches_reference_with_affine_and_modulation(b, t, n, config):
    x, weight, bias, scale, shift = _inputs(b, t, n)
    out = layernorm(x, weight, bias, scale=scale, shift=shift, eps=1e-6, config=config)
    close(out, layernorm_reference(x, weight, bias, scale=scale, shift=shift, eps=1e-6))


@pytest.mark.parametrize("parts", [(), ("weight",), ("bias",), ("scale",), ("shift",), ("weight", "scale")])
def test_each_optional_operand_alone(parts):
    x, weight, bias, scale, shift = _inputs(2, 3, 19)
    given = {k: v for k, v in {"weight": weight, "bias": bias, "scale": scale, "shift": shift}.items() if k in parts}
    close(layernorm(x, **given, config=SMALL), layernorm_reference(x, **given))


def test_every_config():
    x, weight, bias, scale, shift = _inputs(2, 3, 19)
    expected = layernorm_reference(x, weight, bias, scale=scale, shift=shift)
    for config in configs():
        close(layernorm(x, weight, bias, scale=scale, shift=shift, config=config), expected)


def test_modulation_as_b1n_and_rows_without_tokens():
    x, _, _, scale, shift = _inputs(2, 4, 12)
    close(layernorm(x, scale=scale[:, None], shift=shift[:, None]), layernorm_reference(x, scale=scale, shift=shift))
    x2 = torch.randn(3, 12)  # (B, N): one token per sample
    s2 = torch.randn(3, 12)
    close(layernorm(x2, scale=s2), layernorm_reference(x2, scale=s2))
    close(layernorm(x2[0]), layernorm_reference(x2[0]))  # a single row


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    x, weight, bias, scale, shift = _inputs(2, 3, 19, dtype)
    out = layernorm(x, weight.to(dtype), bias, scale=scale.to(dtype), shift=shift, config=SMALL)
    close(out, layernorm_reference(x, weight.to(dtype), bias, scale=scale.to(dtype), shift=shift))


def test_reference_matches_torch():
    x, weight, bias, scale, shift = _inputs(2, 3, 19)
    torch.testing.assert_close(layernorm_reference(x, weight, bias, eps=1e-6),
                               F.layer_norm(x, (19,), weight, bias, 1e-6))
    modulated = F.layer_norm(x, (19,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]  # DiT's modulate(norm(x))
    torch.testing.assert_close(layernorm_reference(x, scale=scale, shift=shift, eps=1e-6), modulated)


def test_empty_input():
    assert layernorm(torch.randn(0, 3, 5)).shape == (0, 3, 5)


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, w: layernorm(x.double()), "x must be float32, float16 or bfloat16"),
    (lambda x, w: layernorm(x.to("meta")), "tensors are on meta"),
    (lambda x, w: layernorm(x, w.to("meta")), "all tensors must be on one device"),
    (lambda x, w: layernorm(x.transpose(0, 1)), "x must be contiguous"),
    (lambda x, w: layernorm(x, w[:-1]), r"weight must have shape \(19,\)"),
    (lambda x, w: layernorm(x, w.int()), "weight must be float32"),
    (lambda x, w: layernorm(x, scale=torch.randn(3, 19)), r"scale must have shape \(2, 19\) or \(2, 1, 19\)"),
    (lambda x, w: layernorm(x, shift=torch.randn(2, 3, 19)), r"shift must have shape"),
    (lambda x, w: layernorm(x, config={"BLOCK_N": 8}), "config needs exactly the keys"),
    (lambda x, w: layernorm(x, config={**SMALL, "BLOCK_N": 24}), "BLOCK_N=24 must be a power of two"),
])
def test_preconditions(call, message):
    x, weight, *_ = _inputs(2, 3, 19)
    with pytest.raises(ValueError, match=message):
        call(x, weight)
