import dataclasses
import math

import pytest
import torch

from graphopt.models.var import (VAR, MultiScaleVQ, VARSampler, filter_logits, inverse_cdf, level_ids)
from tests.models.tiny import VAR as TINY, VQ, VAR_SCALES


def _tokenizer_and_model(config=VAR_SCALES, seed=0):
    torch.manual_seed(seed)
    vq = MultiScaleVQ(dataclasses.replace(VQ, patch_nums=config.patch_nums, latent_channels=config.latent_channels,
                                          codebook_size=config.codebook_size)).eval()
    return vq, VAR(config).eval()


def test_level_ids_number_every_token_by_its_scale():
    assert level_ids((1, 2, 3)).tolist() == [0] + [1] * 4 + [2] * 9


def test_the_tokenizer_reconstructs_through_its_codes_at_every_scale():
    vq = MultiScaleVQ(VQ).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        indices = vq.encode(x)
        assert [tuple(i.shape) for i in indices] == [(3, p * p) for p in VQ.patch_nums]
        f_hat = sum(vq.embed(k, idx) for k, idx in enumerate(indices))
        torch.testing.assert_close(vq.decode_indices(indices), vq.decode(f_hat))
        inputs = vq.teacher_inputs(indices)
    assert inputs.shape == (3, sum(p * p for p in VQ.patch_nums[1:]), VQ.latent_channels)


def test_phi_is_shared_by_nearest_tick():
    vq = MultiScaleVQ(VQ)
    # 4 scales: k/(K-1) = 0, 1/3, 2/3, 1 against ticks 1/12, 13/36, 23/36, 11/12
    assert [list(vq.phis).index(vq.phi(k)) for k in range(4)] == [0, 1, 2, 3]


def test_a_last_scale_other_than_the_latent_grid_is_refused():
    with pytest.raises(ValueError, match="last scale must be the latent grid"):
        MultiScaleVQ(dataclasses.replace(VQ, patch_nums=(1, 2, 4)))


def test_per_scale_calls_with_the_cache_equal_the_teacher_forced_forward():
    """The KV-cached inference path computes what training computes under the block-causal mask."""
    vq, model = _tokenizer_and_model()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    label = torch.tensor([3, model.null_class])
    with torch.no_grad():
        indices = vq.encode(x)
        inputs = vq.teacher_inputs(indices)
        full = model.teacher_forced(inputs, label)
        cache = model.empty_cache(2)
        start, per_scale = 0, []
        for k, p in enumerate(model.config.patch_nums):
            xk = torch.zeros(2, 1, inputs.shape[2]) if k == 0 else inputs[:, start - 1:start - 1 + p * p]
            out = model(xk, label, *cache)
            per_scale.append(out[0])
            cache = out[1:]
            start += p * p
    torch.testing.assert_close(torch.cat(per_scale, dim=1), full, rtol=1e-4, atol=1e-5)
    assert all(c.shape[2] == model.config.tokens for c in cache)


def test_a_cache_that_ends_inside_a_scale_is_refused():
    _, model = _tokenizer_and_model()
    cache = tuple(torch.zeros(1, 2, 3, 16) for _ in range(4))  # 3: inside scale 1 (tokens 1..4)
    with pytest.raises(ValueError, match="scale boundary"):
        model(torch.zeros(1, 4, 16), torch.tensor([0]), *cache)
    with pytest.raises(ValueError, match="expected 4 cache tensors"):
        model(torch.zeros(1, 1, 16), torch.tensor([0]), *cache[:2])


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, 2, 1.0)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, ...: the nucleus of 0.7 is the first two
    kept = torch.isfinite(filter_logits(logits, 0, 0.7)[0])
    assert kept.tolist() == [True, True, False, False, False] and float(probs[:1].sum()) < 0.7
    assert torch.isfinite(filter_logits(logits, 0, 0.01)[0, 0])  # the most likely token always stays


def test_inverse_cdf_picks_the_first_index_past_the_draw():
    probs = torch.tensor([[0.5, 0.25, 0.25]]).expand(4, 3)
    u = torch.tensor([0.1, 0.5, 0.74, 0.99])
    assert inverse_cdf(probs, u).tolist() == [0, 1, 1, 2]


def test_sampling_is_seeded_and_labels_change_the_images():
    vq, model = _tokenizer_and_model()
    sampler = VARSampler.for_model(model, vq)
    assert sampler.nfe == 3 and sampler.tokens == 69
    noise = sampler.noise(4, seed=0)
    a = sampler.sample(model, noise, torch.tensor([0, 1, 2, 3]))
    b = sampler.sample(model, sampler.noise(4, seed=0), torch.tensor([0, 1, 2, 3]))
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, sampler.sample(model, sampler.noise(4, seed=1), torch.tensor([0, 1, 2, 3])))


def test_the_sampler_has_no_other_schedule():
    vq, model = _tokenizer_and_model()
    sampler = VARSampler.for_model(model, vq)
    assert sampler.with_steps(3) is sampler
    with pytest.raises(ValueError, match="3 scales"):
        sampler.with_steps(8)


def test_example_inputs_are_a_last_scale_call_with_the_earlier_scales_cached():
    model = VAR(TINY)
    x, label, *cache = model.example_inputs(batch=3)
    assert x.shape == (3, 64, TINY.latent_channels) and label.shape == (3,)
    assert len(cache) == 2 * TINY.depth and cache[0].shape == (3, TINY.heads, 91, TINY.dim // TINY.heads)
    with torch.no_grad():
        logits, *grown = model(x, label, *cache)
    assert logits.shape == (3, 64, TINY.codebook_size) and grown[0].shape[2] == TINY.tokens
    assert math.isclose(float(cache[0].norm(dim=-1).mean()), 1.0, rel_tol=1e-4)


def test_the_teacher_forced_subnet_is_what_per_scale_calls_with_the_subnet_compute():
    """Training's subnet logits for the scales after the bridge are the logits of per-scale calls that
    run only the kept blocks there, on the caches the full path left for the bridge scales."""
    vq, model = _tokenizer_and_model(dataclasses.replace(VAR_SCALES, depth=4))
    kept, bridge = (0, 3), 5  # scales 1x1 and 2x2 are the bridge
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    label = torch.tensor([4, 7])
    with torch.no_grad():
        inputs = vq.teacher_inputs(vq.encode(x))
        full, late = model.teacher_forced(inputs, label, kept, bridge)
        torch.testing.assert_close(full, model.teacher_forced(inputs, label))
        cache = model.empty_cache(2)
        for p, xk in ((1, torch.zeros(2, 1, inputs.shape[2])), (2, inputs[:, :4])):
            out = model(xk, label, *cache)
            cache = out[1:]
        m = model  # the 8x8 scale through blocks 0 and 3 only
        h = m.word_embed(inputs[:, 4:]) + m.pos_embed[:, 5:] + m.lvl_embed.weight[2]
        cond = m.class_emb(label)
        for i in kept:
            h, _, _ = m.blocks[i](h, cond, cache[2 * i], cache[2 * i + 1])
        torch.testing.assert_close(late, m._head(h, cond), rtol=1e-4, atol=1e-5)
