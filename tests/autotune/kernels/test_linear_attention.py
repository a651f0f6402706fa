import pytest
import torch

pytest.importorskip("triton")

from graphopt.autotune.kernels.linear_attention import (configs, linear_attention,  # noqa: E402
                                                        linear_attention_reference)
from tests.autotune.kernels.helpers import DOT_HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_DV": 16, "num_warps": 1, "num_stages": 1}


def qkv(b, h, n_q, d, n_k=None, d_v=None, dtype=torch.float32):
    n_k, d_v = n_k or n_q, d_v or d
    return (torch.randn(b, h, n_q, d).to(dtype), torch.randn(b, h, n_k, d).to(dtype),
            torch.randn(b, h, n_k, d_v).to(dtype))


def quadratic_form(q, k, v, eps=1e-6):
    """sum_j (phi(Q_i) . phi(K_j)) V_j / (sum_j phi(Q_i) . phi(K_j) + eps): the N x N form of the same map."""
    a = torch.relu(q) @ torch.relu(k).transpose(-2, -1)
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


# fp16 too: stage 1 multiplies phi(K) and V in the input dtype, so the ReLU'd tile must stay fp16 (an fp32
# tile there is the mixed-dtype tl.dot Triton 3.6 refuses to compile); bf16 is checked on a GPU only
DTYPES = (torch.float32, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "config"), [
    ((2, 2, 23, 12, 23, 20), None),
    ((1, 2, 37, 20, 37, 18), SMALL),  # tiles over D and Dv (2 x 2), keys and queries (3 blocks), tails
    ((1, 1, 9, 8, 30, 8), SMALL),  # fewer queries than keys
    ((1, 1, 1, 1, 1, 1), None),
])
def test_matches_reference(shape, config, dtype):
    b, h, n_q, d, n_k, d_v = shape
    q, k, v = qkv(b, h, n_q, d, n_k, d_v, dtype=dtype)
    close(linear_attention(q, k, v, config=config), linear_attention_reference(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config(dtype):
    q, k, v = qkv(1, 2, 21, 12, d_v=20, dtype=dtype)
    expected = linear_attention_reference(q, k, v)
    for config in configs():
        close(linear_attention(q, k, v, config=config), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_and_eps(dtype):
    packed = torch.randn(2, 19, 3, 2, 8).to(dtype)  # (B, N, 3, H, D), as a fused QKV projection gives it
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    close(linear_attention(q, k, v, eps=0.5, config=SMALL), linear_attention_reference(q, k, v, eps=0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_with_no_positive_feature_gives_zero(dtype):
    q, k, v = qkv(1, 1, 4, 8, dtype=dtype)
    q[..., 1, :] = -1.0  # phi(Q_1) = 0: numerator and denominator are 0, the output 0 / eps = 0
    out = linear_attention(q, k, v, config=SMALL)
    assert not out[..., 1, :].any()
    close(out, linear_attention_reference(q, k, v))


@pytest.mark.parametrize("dtype", DOT_HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    q, k, v = qkv(1, 2, 21, 12, d_v=20, dtype=dtype)
    close(linear_attention(q, k, v, config=SMALL), linear_attention_reference(q, k, v))


def test_reference_matches_quadratic_form():
    q, k, v = qkv(2, 2, 23, 12, 17, 20)
    torch.testing.assert_close(linear_attention_reference(q, k, v), quadratic_form(q, k, v))


@pytest.mark.parametrize(("call", "message"), [
    (lambda q, k, v: linear_attention(q.double(), k.double(), v.double()), "q must be float32"),
    (lambda q, k, v: linear_attention(q, k, v.half()), "v must have the same dtype as the input"),
    (lambda q, k, v: linear_attention(q.to("meta"), k, v), "all tensors must be on one device"),
    (lambda q, k, v: linear_attention(q, k, v[..., None]), r"v must have shape \(B, H, N, D\)"),
    (lambda q, k, v: linear_attention(q, k[..., :4], v), r"k must have shape \(1, 2, 9, 8\)"),
    (lambda q, k, v: linear_attention(q, k, v[:, :, :3]), r"v must have shape \(1, 2, 9, 8\)"),
    (lambda q, k, v: linear_attention(q, k, v, config={**SMALL, "BLOCK_D": 8}), "BLOCK_D=8 must be at least 16"),
])
def test_preconditions(call, message):
    q, k, v = qkv(1, 2, 9, 8)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)
