"""The subnet pass: d of a stack's D layers kept equidistantly (VARiant), on every call or routed per scale."""

import dataclasses

import pytest
import torch
from torch import nn

import graphopt
from graphopt import PassError, UsageError
from graphopt.approx import ApproxContext
from graphopt.models.dit import SiT
from graphopt.models.var import VAR, MultiScaleVQ, VARSampler
from graphopt.passes.subnet import SubnetOptions, equidistant, subnet_pass
from tests.models.tiny import DIT, VAR_SCALES, VQ

EXACT = ["noop", "fold", "dce"]


def _subnet(model, args, **options):
    ctx = ApproxContext.for_model(model, args, samples=8, seeds=(0, 1), progress=False)
    return graphopt.optimize(model, args, passes=[*EXACT, subnet_pass(SubnetOptions(**options))], approx=ctx)


def test_equidistant_layers_keep_the_first_and_the_last():
    assert equidistant(12, 6) == (0, 2, 4, 6, 8, 11)
    assert equidistant(12, 3) == (0, 5, 11)
    assert equidistant(30, 16) == tuple(i * 29 // 15 for i in range(16))
    assert equidistant(4, 1) == (0,) and equidistant(4, 4) == (0, 1, 2, 3)
    with pytest.raises(UsageError, match="between 1 and 4"):
        equidistant(4, 5)


def test_a_dit_subnet_skips_the_dropped_layers_on_every_call():
    torch.manual_seed(0)
    model = SiT(dataclasses.replace(DIT, depth=4)).eval()
    args = (torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([1, 2]))
    opt = _subnet(model, args, keep=2)
    row = opt.report.passes[-1]
    assert row.name == "subnet" and not row.exact and row.hits == 2
    assert row.quality is not None and row.quality["samples"] == 8
    assert row.flops_after < row.flops_before
    assert "subnet: blocks: keeps 2 of 4 layers [0, 3]" in opt.report.table()
    reference = SiT(model.config).eval()
    reference.load_state_dict(model.state_dict())
    reference.blocks = nn.ModuleList([reference.blocks[i] for i in (0, 3)])  # I_2 of 4 layers
    x5 = (torch.randn(5, 1, 8, 8), torch.rand(5), torch.arange(5))
    with torch.no_grad():
        torch.testing.assert_close(opt(*x5), reference(*x5), rtol=1e-5, atol=1e-5)


def _var(depth=4, seed=0):
    torch.manual_seed(seed)
    config = dataclasses.replace(VAR_SCALES, depth=depth)
    vq = MultiScaleVQ(dataclasses.replace(VQ, patch_nums=config.patch_nums, latent_channels=config.latent_channels,
                                          codebook_size=config.codebook_size)).eval()
    return VAR(config).eval(), vq


class _SubnetReference(nn.Module):
    """VARiant by hand: scales past the bridge run only ``kept`` blocks; the others' caches are emptied."""

    def __init__(self, model: VAR, kept: tuple[int, ...], bridge_tokens: int):
        super().__init__()
        self.model, self.kept, self.bridge_tokens = model, kept, bridge_tokens

    def forward(self, x, label, *cache):
        m = self.model
        if cache[0].shape[2] < self.bridge_tokens:
            return m(x, label, *cache)
        start = cache[0].shape[2]
        cond = m.class_emb(label)
        h = m.word_embed(x) + m.pos_embed[:, start:start + x.shape[1]] + m.lvl_embed.weight[m._scale_at(start)]
        grown = []
        for i, block in enumerate(m.blocks):
            if i in self.kept:
                h, k, v = block(h, cond, cache[2 * i], cache[2 * i + 1])
                grown += [k, v]
            else:
                grown += [cache[2 * i][:, :, :0].clone(), cache[2 * i + 1][:, :, :0].clone()]
        return (m._head(h, cond), *grown)


def test_a_var_subnet_routes_late_scales_to_the_kept_layers_and_frees_the_dropped_caches():
    model, vq = _var(depth=4)
    opt = _subnet(model, model.example_inputs(), keep=2, bridge=2)  # scales 1x1, 2x2 run all 4 layers
    routing = opt.routing
    assert routing is not None and routing.at_least == 5 and routing.free_caches
    assert "subnet" not in opt.approximate_passes  # routing: other scales are still re-captured exactly
    sampler = VARSampler.for_model(model, vq)
    held, expected_held = [], []
    noise, labels = sampler.noise(3, seed=0), torch.tensor([1, 2, 3])
    images = sampler.sample_steps(lambda k: opt, noise, labels,
                                  on_cache=lambda k, c: held.append([t.shape[2] for t in c]))
    reference = _SubnetReference(model, (0, 3), bridge_tokens=5)
    want = sampler.sample_steps(lambda k: reference, noise, labels,
                                on_cache=lambda k, c: expected_held.append([t.shape[2] for t in c]))
    torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)
    assert held == expected_held
    assert held[-1] == [69, 69, 0, 0, 0, 0, 69, 69]  # kept layers 0 and 3 hold every token
    assert held[1] == [5] * 8  # the bridge zone ran every layer


def test_without_freeing_the_dropped_caches_stop_growing_after_the_bridge():
    model, vq = _var(depth=4)
    opt = _subnet(model, model.example_inputs(), keep=2, bridge=2, free_caches=False)
    sampler = VARSampler.for_model(model, vq)
    held = []
    sampler.sample_steps(lambda k: opt, sampler.noise(2, 0), torch.tensor([0, 1]),
                         on_cache=lambda k, c: held.append([t.shape[2] for t in c]))
    assert held[-1] == [69, 69, 5, 5, 5, 5, 69, 69]


def test_subnet_options_that_cannot_hold_are_clear_errors_and_leave_nothing_changed():
    model, _ = _var(depth=4)
    args = model.example_inputs()
    with pytest.raises(UsageError, match="keep or fraction, not both"):
        SubnetOptions(keep=2, fraction=0.5)
    with pytest.raises(UsageError, match="fraction must be in"):
        SubnetOptions(fraction=1.5)
    with pytest.raises(PassError, match="keep=9 but the stack has only 4 layers"):
        _subnet(model, args, keep=9)
    with pytest.raises(PassError, match="bridge=5 scales but the model has 3"):
        _subnet(model, args, bridge=5)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_a_cached_model_without_scales_needs_the_bridge_as_a_token_count():
    model, _ = _var(depth=4)

    class NoScales(nn.Module):  # the same computation with no config.patch_nums to read
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *args):
            return self.inner(*args)

    wrapped = NoScales().eval()
    with pytest.raises(PassError, match="subnet.bridge_tokens"):
        _subnet(wrapped, model.example_inputs())
    opt = _subnet(wrapped, model.example_inputs(), keep=2, bridge_tokens=5)
    assert opt.routing.at_least == 5


def test_a_model_without_repeated_layers_has_no_subnet():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with pytest.raises(PassError, match="no stack of repeated layers"):
        _subnet(model, (torch.randn(2, 4),))


def test_subnet_options_parse_from_text():
    from graphopt.passes import configure, options_of

    assert [o[0] for o in options_of("subnet")] == ["keep", "fraction", "bridge", "bridge_tokens", "free_caches"]
    p = configure("subnet", {"keep": "3", "free_caches": "false"})
    assert p.name == "subnet"
    with pytest.raises(UsageError, match="takes a number"):
        configure("subnet", {"keep": "half"})


def test_a_saved_subnet_keeps_its_routing(tmp_path):
    model, _ = _var(depth=4)
    opt = _subnet(model, model.example_inputs(), keep=2, bridge=2)
    loaded = graphopt.load(opt.save(tmp_path / "var-subnet"))
    assert loaded.routing == opt.routing
    args = model.example_inputs()  # the captured (last) scale: past the bridge, so routed
    with torch.no_grad():
        want, got = opt(*args), loaded(*args)
    assert got[3].shape[2] == 0  # a dropped layer's cache comes back empty
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
