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


# ------------------------------------------------------------------ LiT's depthwise-conv branch, fused


def dwc(heads, d_v, size, dtype=torch.float32, bias=True):
    weight = (torch.randn(heads * d_v, 1, size, size) / size).to(dtype)
    return weight, (torch.randn(heads * d_v).to(dtype) if bias else None)


@pytest.mark.parametrize("dtype", (torch.float32, *DOT_HALF_DTYPES))
@pytest.mark.parametrize(("shape", "size", "config"), [
    ((2, 2, 4, 12, 20), 5, None),  # side 4, a 5 x 5 kernel wider than half the grid; non-power-of-2 D, Dv
    ((1, 2, 8, 20, 18), 5, SMALL),  # side 8: 64 tokens in 4 query blocks, tiles over D and Dv with tails
    ((1, 3, 8, 12, 24), 3, SMALL),
    ((2, 1, 1, 4, 6), 5, None),  # one token: only the centre tap lands
    ((1, 2, 4, 0, 3), 3, None),  # no features: no state to reduce, the attention is 0, the branch alone
])
def test_dwc_branch_matches_reference(shape, size, config, dtype):
    b, h, side, d, d_v = shape
    q, k, v = qkv(b, h, side * side, d, d_v=d_v, dtype=dtype)
    weight, bias = dwc(h, d_v, size, dtype)
    out = linear_attention(q, k, v, dwc_weight=weight, dwc_bias=bias, config=config)
    close(out, linear_attention_reference(q, k, v, dwc_weight=weight, dwc_bias=bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dwc_branch_without_bias_every_config_and_strided(dtype):
    packed = torch.randn(2, 16, 3, 2, 12).to(dtype)  # (B, N, 3, H, D): strided q, k, v on a 4 x 4 grid
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    weight, _ = dwc(2, 12, 5, dtype, bias=False)
    weight = weight.transpose(-1, -2).contiguous().transpose(-1, -2)  # a strided kernel too
    expected = linear_attention_reference(q, k, v, dwc_weight=weight)
    for config in configs():
        close(linear_attention(q, k, v, dwc_weight=weight, config=config), expected)


def test_dwc_branch_is_the_conv_the_pass_used_to_emit():
    """The reference adds exactly conv2d(groups=H*Dv) on V's image layout, permuted back."""
    import torch.nn.functional as F

    q, k, v = qkv(2, 2, 9, 4, d_v=3)
    weight, bias = dwc(2, 3, 5)
    image = v.permute(0, 1, 3, 2).reshape(2, 6, 3, 3)
    local = F.conv2d(image, weight, bias, padding=2, groups=6).reshape(2, 2, 3, 9).permute(0, 1, 3, 2)
    torch.testing.assert_close(linear_attention_reference(q, k, v, dwc_weight=weight, dwc_bias=bias),
                               linear_attention_reference(q, k, v) + local)
    out = linear_attention(q, k, v, dwc_weight=weight, dwc_bias=bias, config=SMALL)
    close(out, linear_attention(q, k, v, config=SMALL) + local)


@pytest.mark.parametrize(("call", "message"), [
    (lambda q, k, v, w, b: linear_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], dwc_weight=w),
     r"one square token grid \(Nq = Nk = side\*side\), got Nq = 8, Nk = 8"),
    (lambda q, k, v, w, b: linear_attention(q[:, :, :4], k, v, dwc_weight=w), "got Nq = 4, Nk = 9"),
    (lambda q, k, v, w, b: linear_attention(q, k, v, dwc_weight=w[:, :, :4, :4]), "with k odd"),
    (lambda q, k, v, w, b: linear_attention(q, k, v, dwc_weight=w[:8]), r"dwc_weight must have shape \(16, 1, k, k\)"),
    (lambda q, k, v, w, b: linear_attention(q, k, v, dwc_weight=w, dwc_bias=b[:3]), r"dwc_bias must have shape \(16,\)"),
    (lambda q, k, v, w, b: linear_attention(q, k, v, dwc_bias=b), "dwc_bias given without dwc_weight"),
    (lambda q, k, v, w, b: linear_attention(q, k, v, dwc_weight=w.half()), "dwc_weight must have the same dtype"),
])
def test_dwc_preconditions(call, message):
    q, k, v = qkv(1, 2, 9, 8)
    weight, bias = dwc(2, 8, 5)
    with pytest.raises(ValueError, match=message):
        call(q, k, v, weight, bias)
