import math

import numpy as np
import pytest
import torch

from graphopt.metrics import frechet_distance
from graphopt.quality import QualityCost, QualityEvaluator, ReferenceStats


class MeanStd:
    """A tiny feature extractor: per-image mean and standard deviation and two pixels."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return torch.stack([flat.mean(1), flat.std(1), flat[:, 0], flat[:, -1]], dim=1)


def _real(n: int = 400) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _generator(shift: float, calls: list | None = None):
    def generate(n: int, seed: int) -> torch.Tensor:
        if calls is not None:
            calls.append((n, seed))
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1 + shift).clamp(-1, 1)
    return generate


@pytest.fixture
def evaluator():
    return QualityEvaluator.from_images(MeanStd(), _real(), proxy_samples=64, confirm_samples=100,
                                        confirm_seeds=(0, 1, 2))


def test_scores_are_fd_against_the_cached_reference_statistics(evaluator):
    images = _generator(0.3)(200, 5)
    assert evaluator.score(images) == pytest.approx(frechet_distance(MeanStd()(images), MeanStd()(_real())))
    assert evaluator.reference.samples == 400


def test_the_proxy_uses_few_samples_from_its_own_seed(evaluator):
    calls = []
    value = evaluator.proxy(_generator(0.0, calls))
    assert calls == [(64, evaluator.proxy_seed)] and evaluator.proxy_seed not in evaluator.confirm_seeds
    assert value < evaluator.proxy(_generator(0.5))


def test_measure_confirms_over_seeds_next_to_a_cached_baseline(evaluator):
    calls, base_calls = [], []
    cost = evaluator.measure(_generator(0.2, calls), ("untuned", _generator(0.0, base_calls)))
    assert calls == [(100, 0), (100, 1), (100, 2)] and base_calls == calls
    assert cost.samples == 100 and cost.seeds == (0, 1, 2) and len(cost.values) == 3
    assert cost.std > 0 and cost.delta == pytest.approx(cost.mean - cost.baseline_mean) and cost.delta > 0
    assert 0 < cost.psnr_db < 60
    evaluator.measure(_generator(0.1), ("untuned", _generator(0.0, base_calls)))
    assert len(base_calls) == 3  # the baseline was sampled once per seed, then reused
    line = cost.line()
    assert "FD" in line and "n=100" in line and "seeds 0,1,2" in line and "untuned" in line and "dB" in line


def test_a_change_that_changes_nothing_has_infinite_psnr_and_zero_delta(evaluator):
    cost = evaluator.measure(_generator(0.0), ("same", _generator(0.0)), samples=50, seeds=(3,))
    assert cost.delta == 0 and math.isinf(cost.psnr_db) and cost.std == 0
    assert QualityCost.from_json(cost.to_json()).psnr_db is None  # JSON has no infinity


def test_quality_cost_round_trips_through_json(evaluator):
    cost = evaluator.measure(_generator(0.2), ("base", _generator(0.0)))
    assert QualityCost.from_json(cost.to_json()) == cost


def test_reference_statistics_save_and_load_without_pickle(tmp_path):
    stats = ReferenceStats.from_features(np.random.default_rng(0).normal(size=(50, 3)), "mine")
    back = ReferenceStats.load(stats.save(tmp_path / "ref.npz"))
    assert back.source == "mine" and back.samples == 50
    np.testing.assert_array_equal(back.cov, stats.cov)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a reference statistics file"):
        ReferenceStats.load(tmp_path / "bad.npz")
    assert [p.name for p in tmp_path.iterdir()] .count("ref.npz") == 1 and len(list(tmp_path.iterdir())) == 2


def test_bad_settings_are_refused():
    stats = ReferenceStats.from_features(np.zeros((4, 2)) + np.arange(4)[:, None], "x")
    with pytest.raises(ValueError, match="at least 2 samples"):
        QualityEvaluator(MeanStd(), stats, proxy_samples=1)
    with pytest.raises(ValueError, match="at least one seed"):
        QualityEvaluator(MeanStd(), stats, confirm_seeds=())


def test_the_shipped_evaluator_uses_the_digit_classifier():
    evaluator = QualityEvaluator.for_digits()
    assert evaluator.reference.source == "held-out digits" and evaluator.reference.mean.shape == (64,)
    from graphopt.models.data import load_digits

    held = load_digits(16).heldout_images
    assert evaluator.score(held) < evaluator.score(torch.rand_like(held) * 2 - 1) / 10


def test_output_fidelity_is_the_relative_error_against_the_baseline_per_seed():
    from graphopt.quality import OutputFidelity

    fidelity = OutputFidelity(samples=8, seeds=(0, 1))
    base = lambda n, seed: torch.full((n, 3), float(seed + 1))  # noqa: E731
    same = fidelity.measure(base, ("original", base))
    assert same.values == (0.0, 0.0) and same.psnr_db == float("inf") and same.samples == 8
    off = fidelity.measure(lambda n, seed: base(n, seed) * 1.1, ("original", base))
    assert off.values == pytest.approx((0.1, 0.1)) and off.delta == pytest.approx(0.1)
    assert "rel. output error 0.10" in off.line()
    with pytest.raises(ValueError, match="against a baseline"):
        fidelity.measure(base)
