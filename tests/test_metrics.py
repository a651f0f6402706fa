import math

import pytest
import torch

from graphopt.metrics import DigitFeatures, digit_bounds, fd_over_seeds, frechet_distance, psnr


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifts = [frechet_distance(a, a + d) for d in (0.5, 1.0, 2.0)]
    # a pure mean shift by d in all 8 dims adds exactly 8 d^2
    assert shifts == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)


def test_fd_matches_the_closed_form_for_scaled_gaussians():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50000, 4, generator=g, dtype=torch.float64)
    # N(0, I) vs N(0, 4I) in 4 dims: tr(I + 4I - 2 * 2I) = 4
    assert frechet_distance(a, 2 * torch.randn(50000, 4, generator=g, dtype=torch.float64)) == pytest.approx(4, rel=0.05)


def test_fd_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))


def test_psnr_known_values():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x, x) == math.inf
    assert psnr(x + 0.2, x) == pytest.approx(10 * math.log10(4 / 0.04))


def test_digit_features_rank_real_digits_far_from_noise():
    extractor = DigitFeatures()
    assert extractor.accuracy >= 0.97
    bounds = digit_bounds(extractor)
    assert bounds.floor < bounds.train_vs_heldout * 3 and bounds.ceiling > 20 * bounds.floor
    result = fd_over_seeds(lambda n, s: torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(s)),
                           extractor(torch.zeros(10, 1, 16, 16) - 1 + torch.rand(10, 1, 16, 16)), extractor, 50, (0, 1))
    assert result.samples == 50 and len(result.values) == 2 and result.std >= 0
