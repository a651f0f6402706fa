import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from graphopt.autotune.kernels.attention import (attention, attention_reference, block_causal_mask,  # noqa: E402
                                                 configs)
from tests.autotune.kernels.helpers import DOT_HALF_DTYPES, close  # noqa: E402

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


def var_levels(patch_nums=(1, 2, 3, 4)):
    """VAR's level vector: scale k contributes pn_k^2 tokens of level k (here 1 + 4 + 9 + 16 = 30)."""
    return torch.repeat_interleave(torch.arange(len(patch_nums)), torch.tensor([p * p for p in patch_nums]))


def qkv(b, h, l_q, d, l_k=None, d_v=None, dtype=torch.float32):
    l_k, d_v = l_k or l_q, d_v or d
    return (torch.randn(b, h, l_q, d).to(dtype), torch.randn(b, h, l_k, d).to(dtype),
            torch.randn(b, h, l_k, d_v).to(dtype))


@pytest.mark.parametrize(("shape", "config"), [
    ((1, 2, 37, 12), SMALL),  # 3 query blocks, 3 key blocks, ragged tails, D padded to 16
    ((1, 2, 37, 12), None),
    ((2, 1, 5, 16), None),
    ((1, 1, 1, 3), SMALL),
])
def test_non_causal_matches_reference(shape, config):
    q, k, v = qkv(*shape)
    close(attention(q, k, v, config=config), attention_reference(q, k, v))


def test_cross_attention_lengths_and_value_dim_differ():
    q, k, v = qkv(2, 2, 9, 12, l_k=21, d_v=20)
    close(attention(q, k, v, scale=0.3, config=SMALL), attention_reference(q, k, v, scale=0.3))


@pytest.mark.parametrize("config", [SMALL, None])
def test_block_causal_matches_reference(config):
    level = var_levels()
    q, k, v = qkv(2, 2, len(level), 8)
    close(attention(q, k, v, level=level, config=config), attention_reference(q, k, v, level=level))


def test_block_causal_with_unsorted_levels():
    # the block skipping must be an optimisation only: shuffled levels mask pairs in every key block
    level = var_levels()[torch.randperm(30)]
    q, k, v = qkv(1, 2, 30, 8)
    close(attention(q, k, v, level=level, config=SMALL), attention_reference(q, k, v, level=level))


def test_every_config():
    level = var_levels((1, 2, 3, 4, 4))  # L = 46: multi-block for the small configs, ragged for all
    q, k, v = qkv(1, 1, len(level), 12)
    expected = attention_reference(q, k, v, level=level)
    for config in configs():
        close(attention(q, k, v, level=level, config=config), expected)


def test_strided_views_of_a_packed_projection():
    packed = torch.randn(2, 20, 3, 2, 8)  # (B, L, 3, H, D), as a fused QKV projection gives it
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) views with stride(2) = 3 H D
    assert not q.is_contiguous()
    close(attention(q, k, v, config=SMALL), attention_reference(q, k, v))


@pytest.mark.parametrize("dtype", DOT_HALF_DTYPES)
def test_half_precision_accumulates_in_fp32(dtype):
    level = var_levels()
    q, k, v = qkv(1, 2, 30, 16, dtype=dtype)
    close(attention(q, k, v, level=level, config=SMALL), attention_reference(q, k, v, level=level))


def test_no_keys_gives_zeros():
    q, k, v = qkv(1, 1, 4, 8, l_k=1)
    out = attention(q, k[:, :, :0], v[:, :, :0])
    assert out.shape == (1, 1, 4, 8) and not out.any()


def test_reference_matches_torch():
    level = var_levels()
    q, k, v = qkv(2, 2, 30, 8)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(attention_reference(q, k, v, scale=1.0, level=level),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(level), scale=1.0))
    causal = torch.arange(5)  # one token per level is plain causal attention
    q5, k5, v5 = qkv(1, 1, 5, 8)
    torch.testing.assert_close(attention_reference(q5, k5, v5, level=causal),
                               F.scaled_dot_product_attention(q5, k5, v5, is_causal=True))


@pytest.mark.parametrize(("call", "message"), [
    (lambda q, k, v, lv: attention(q.double(), k.double(), v.double()), "q must be float32, float16 or bfloat16"),
    (lambda q, k, v, lv: attention(q, k.half(), v), r"k must have the same dtype as the input \(torch.float32\)"),
    (lambda q, k, v, lv: attention(q.to("meta"), k.to("meta"), v.to("meta")), "tensors are on meta"),
    (lambda q, k, v, lv: attention(q[0], k[0], v[0]), r"q must have shape \(B, H, L, D\)"),
    (lambda q, k, v, lv: attention(q, k[:, :1], v), r"k must have shape \(1, 2, 30, 8\)"),
    (lambda q, k, v, lv: attention(q, k, v[:, :, :7]), r"v must have shape \(1, 2, 30, 8\)"),
    (lambda q, k, v, lv: attention(q, k, v, level=lv.float()), "level must be an integer tensor"),
    (lambda q, k, v, lv: attention(q, k, v, level=lv[:-1]), r"level must have shape \(30,\)"),
    (lambda q, k, v, lv: attention(q[:, :, :5], k, v, level=lv), "a level vector needs Lq == Lk"),
    (lambda q, k, v, lv: attention(*qkv(1, 1, 2, 300)), "head dims D=300, Dv=300 must be at most 256"),
    (lambda q, k, v, lv: attention(q, k, v, config={**SMALL, "BLOCK_N": 8}), "BLOCK_N=8 must be at least 16"),
])
def test_preconditions(call, message):
    q, k, v = qkv(1, 2, 30, 8)
    with pytest.raises(ValueError, match=message):
        call(q, k, v, var_levels())
