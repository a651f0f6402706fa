import pytest
import torch

from graphopt.models import build_model, default_sampler
from graphopt.models.samplers import Sampler, edm_sigmas, flow_times
from tests.models.tiny import DIT, UNET


class Counting:
    """Wraps a denoiser and counts calls and the batch sizes it saw."""

    def __init__(self, model):
        self.model, self.calls, self.batches = model, 0, []

    def __call__(self, *args):
        self.calls += 1
        self.batches.append(args[0].shape[0])
        return self.model(*args)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_model("unet", UNET).eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = build_model("dit", DIT).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity; give it a function of its inputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("method", ["euler", "heun", "ddim"])
def test_edm_sampler_shapes_determinism_and_nfe(unet, method):
    sampler = default_sampler("unet", UNET, steps=4, method=method)
    counting = Counting(unet)
    a = sampler.sample(counting, sampler.noise(3, seed=7))
    b = sampler.sample(unet, sampler.noise(3, seed=7))
    c = sampler.sample(unet, sampler.noise(3, seed=8))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert counting.calls == sampler.nfe == {"euler": 4, "heun": 7, "ddim": 4}[method]


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_flow_sampler_with_labels(dit, method):
    sampler = default_sampler("dit", DIT, steps=3, method=method)
    labels = sampler.labels(4, seed=0)
    a = sampler.sample(dit, sampler.noise(4, 0), labels)
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, sampler.sample(dit, sampler.noise(4, 0), labels))
    assert not torch.equal(a, sampler.sample(dit, sampler.noise(4, 0), (labels + 1) % 10))


def test_ddim_equals_euler_for_linear_families(unet, dit):
    for family, model, config, labels in (("unet", unet, UNET, None), ("dit", dit, DIT, torch.arange(2))):
        euler = default_sampler(family, config, steps=5, method="euler")
        ddim = default_sampler(family, config, steps=5, method="ddim")
        noise = euler.noise(2, 0)
        torch.testing.assert_close(ddim.sample(model, noise, labels), euler.sample(model, noise, labels),
                                   rtol=1e-4, atol=1e-4)


def test_guidance_batches_both_halves_and_mixes_them(dit):
    plain = default_sampler("dit", DIT, steps=2, method="euler")
    guided = Sampler("flow", "euler", plain.levels, plain.shape, cfg_scale=3.0, null_class=DIT.num_classes)
    counting = Counting(dit)
    noise, labels = plain.noise(2, 0), torch.tensor([1, 2])
    out = guided.sample(counting, noise, labels)
    assert counting.batches == [4, 4]  # conditional and null halves in one call per step
    # one step by hand: v = v_null + s (v_cond - v_null)
    one = Sampler("flow", "euler", (1.0, 0.0), plain.shape, cfg_scale=3.0, null_class=DIT.num_classes)
    t = torch.ones(2)
    with torch.no_grad():
        v = dit(noise, t, torch.full((2,), 10)) + 3.0 * (dit(noise, t, labels) - dit(noise, t, torch.full((2,), 10)))
    torch.testing.assert_close(one.sample(dit, noise, labels), noise - v)
    assert out.shape == noise.shape


def test_explicit_levels_are_validated():
    shape = (1, 8, 8)
    with pytest.raises(ValueError, match="strictly decrease to 0"):
        Sampler("edm", "euler", (1.0, 2.0, 0.0), shape)
    with pytest.raises(ValueError, match="strictly decrease to 0"):
        Sampler("edm", "euler", (3.0, 1.0), shape)
    with pytest.raises(ValueError, match="unknown sampler method"):
        Sampler("edm", "rk4", (1.0, 0.0), shape)
    with pytest.raises(ValueError, match="null class"):
        Sampler("flow", "euler", (1.0, 0.0), shape, cfg_scale=2.0)
    sigmas = edm_sigmas(5)
    assert len(sigmas) == 6 and sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    assert flow_times(4) == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert flow_times(2, shift=3.0)[1] == pytest.approx(0.75)
