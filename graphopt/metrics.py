"""Quality metrics that need no download: Frechet distance in a shipped feature space, and fidelity.

Frechet distance between Gaussians fitted to two feature sets (the FID formula):

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

computed in float64 with symmetric square roots from eigendecompositions (negative eigenvalues
from round-off are clipped to 0). With the shipped digit classifier's 64-d features it ranks
generated digits against the held-out real ones; with a user-supplied extractor (Inception
features, say) the same function gives FID on the user's data.

FD is biased upwards at small sample counts, so every figure states its sample count and seeds, and
is reported with a floor (real vs real: the two halves of the held-out set) and a ceiling (Gaussian
noise vs the held-out set). Fidelity of an optimized sampler to the original is the PSNR of the
two on the same noise and labels: 10 log10(range^2 / MSE), range 2 for images in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable, Protocol, Sequence

import numpy as np
import torch


class FeatureExtractor(Protocol):
    """Maps images (N, C, H, W) in [-1, 1] to features (N, D)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class DigitFeatures:
    """The shipped digit classifier's feature layer (``classifier-digits``), batched, no grad."""

    def __init__(self, batch: int = 512):
        from graphopt.models import load

        ref = load("classifier-digits")
        self.model, self.batch = ref.model, batch
        self.accuracy = float(ref.record.get("heldout_accuracy", float("nan")))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = [self.model.features(images[i:i + self.batch].float().clamp(-1, 1))
                     for i in range(0, len(images), self.batch)]
        return torch.cat(parts)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _features(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of a feature set (N, D), N >= 2: what FD compares."""
    f = _features(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need a feature set (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """FD between two Gaussians given by mean and covariance."""
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape} and {mu_b.shape}")
    root_a = _sqrt_psd(cov_a)
    cross = np.trace(_sqrt_psd(root_a @ cov_b @ root_a))
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0))


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FD between feature sets ``a`` (N, D) and ``b`` (M, D)."""
    fa, fb = _features(a), _features(b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1] or min(len(fa), len(fb)) < 2:
        raise ValueError(f"need two feature sets (N, D) with the same D and N >= 2, got {fa.shape} and {fb.shape}")
    return frechet_distance_stats(*gaussian_stats(fa), *gaussian_stats(fb))


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of ``images`` against ``reference`` over the whole set (inf when identical)."""
    mse = float(((images.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


@dataclasses.dataclass(frozen=True)
class FDResult:
    """FD over several seeds: mean, standard deviation and each value, with the sample count."""

    mean: float
    std: float
    values: tuple[float, ...]
    samples: int
    seeds: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.samples}, seeds {','.join(map(str, self.seeds))})"


def fd_over_seeds(generate: Callable[[int, int], torch.Tensor], reference: torch.Tensor, extractor: FeatureExtractor,
                  samples: int, seeds: Sequence[int]) -> FDResult:
    """FD of ``generate(samples, seed)`` against ``reference`` features, for each seed."""
    values = tuple(frechet_distance(extractor(generate(samples, s)), reference) for s in seeds)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return FDResult(statistics.fmean(values), std, values, samples, tuple(seeds))


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What FD means on the digits: real-vs-real floor, train-vs-held-out, Gaussian-noise ceiling."""

    floor: float
    train_vs_heldout: float
    ceiling: float
    heldout: int


def digit_bounds(extractor: FeatureExtractor, resolution: int = 16, seed: int = 0) -> Bounds:
    from graphopt.models.data import load_digits

    data = load_digits(resolution)
    held = extractor(data.heldout_images)
    half = len(held) // 2
    noise = torch.randn(data.heldout_images.shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return Bounds(frechet_distance(held[:half], held[half:]), frechet_distance(extractor(data.train_images), held),
                  frechet_distance(extractor(noise), held), len(held))
