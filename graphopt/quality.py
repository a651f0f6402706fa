"""The quality evaluator every approximate decision uses, and the quality cost it reports.

An approximate change (a pass that alters outputs, a plan that skips work) is judged by the
images it samples, never by one denoiser call. A *generator* is a callable ``(n, seed) -> images``
(N, C, H, W) in [-1, 1]: the same seed gives the same noise and labels, so two ways of sampling
compared on the same seeds differ only by what changed (common random numbers). The evaluator:

- keeps the reference statistics (mean and covariance of the real images' features) computed once,
  and a cache of baseline results per (baseline, n, seed), so nothing is sampled twice;
- scores the inner loops of a search with a cheap **proxy**: FD on ``proxy_samples`` images from
  one fixed ``proxy_seed`` (kept apart from the confirmation seeds, so a search cannot overfit the
  noise it is finally judged on);
- **confirms** a result at ``confirm_samples`` images for each of ``confirm_seeds`` before it is
  reported, and reports mean, spread and each value, next to the baseline on the same seeds and the
  PSNR of the change against the baseline's images from the same noise.

The feature extractor is pluggable: anything mapping images to (N, D) features, with reference
statistics from the user's own images (:meth:`QualityEvaluator.from_images`) or saved ones
(:meth:`ReferenceStats.load`), e.g. an Inception network and statistics a user has locally.
:meth:`QualityEvaluator.for_digits` is the shipped one: the digit classifier's 64-d features
against the held-out digits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .metrics import FeatureExtractor, frechet_distance_stats, gaussian_stats

PSNR_RANGE = 2.0  # images in [-1, 1], as graphopt.metrics.psnr

Generator = Callable[[int, int], torch.Tensor]
"""``(n, seed) -> images``: a way of sampling, seeded."""


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance of the reference images' features, computed once."""

    mean: np.ndarray
    cov: np.ndarray
    samples: int
    source: str

    @staticmethod
    def from_features(features: torch.Tensor | np.ndarray, source: str) -> "ReferenceStats":
        mean, cov = gaussian_stats(features)
        return ReferenceStats(mean, cov, len(features), source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as .npz (plain arrays, no pickle), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, mean=self.mean, cov=self.cov, samples=np.array(self.samples), source=np.array(self.source))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "ReferenceStats":
        try:
            with np.load(path, allow_pickle=False) as data:
                stats = ReferenceStats(data["mean"], data["cov"], int(data["samples"]), str(data["source"]))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a reference statistics file ({e})") from e
        d = stats.mean.shape[0] if stats.mean.ndim == 1 else -1
        if stats.cov.shape != (d, d):
            raise ValueError(f"{path}: mean {stats.mean.shape} and covariance {stats.cov.shape} do not match")
        return stats


@dataclasses.dataclass(frozen=True)
class QualityCost:
    """What an approximate change cost in quality, measured: metric, sample count, seeds, spread.

    ``values`` are the metric per seed for the changed sampling, ``baseline_values`` the same for
    the baseline it is compared with (``baseline`` names it), on the same seeds; ``psnr_db`` is the
    fidelity of the changed samples to the baseline's from the same noise and labels.
    """

    metric: str
    samples: int
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    baseline: str | None = None
    baseline_values: tuple[float, ...] | None = None
    psnr_db: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def baseline_mean(self) -> float | None:
        return statistics.fmean(self.baseline_values) if self.baseline_values else None

    @property
    def baseline_std(self) -> float | None:
        if not self.baseline_values:
            return None
        return statistics.stdev(self.baseline_values) if len(self.baseline_values) > 1 else 0.0

    @property
    def delta(self) -> float | None:
        """Mean change against the baseline (positive: worse, for a distance)."""
        base = self.baseline_mean
        return None if base is None else self.mean - base

    def line(self) -> str:
        seeds = ",".join(map(str, self.seeds))
        text = f"{self.metric} {self.mean:.2f} ± {self.std:.2f} (n={self.samples}, seeds {seeds})"
        if self.baseline_values:
            text += (f" vs {self.baseline_mean:.2f} ± {self.baseline_std:.2f} for {self.baseline} "
                     f"({self.delta:+.2f})")
        if self.psnr_db is not None:
            text += f"; PSNR vs {self.baseline or 'baseline'} {self.psnr_db:.1f} dB"
        return text

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["psnr_db"] = None if self.psnr_db is None or math.isinf(self.psnr_db) else self.psnr_db
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> "QualityCost":
        base = data.get("baseline_values")
        return QualityCost(str(data["metric"]), int(data["samples"]), tuple(int(s) for s in data["seeds"]),
                           tuple(float(v) for v in data["values"]), data.get("baseline"),
                           None if base is None else tuple(float(v) for v in base), data.get("psnr_db"))


@dataclasses.dataclass(frozen=True)
class OutputFidelity:
    """Quality for a model with no sampler or data (a ``file.py:factory`` model): the relative RMS
    error of its outputs against a baseline's (the original model's) on the same inputs, drawn
    like the example inputs, ``samples`` per seed. The baseline scores 0 by definition."""

    samples: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    metric: str = "rel. output error"

    @property
    def confirm_samples(self) -> int:
        return self.samples

    @property
    def confirm_seeds(self) -> tuple[int, ...]:
        return self.seeds

    def measure(self, generate: Generator, baseline: tuple[str, Generator] | None = None, *,
                samples: int | None = None, seeds: Sequence[int] | None = None) -> QualityCost:
        """Per seed: ``||out - base|| / ||base||`` of ``generate(n, seed)`` against the baseline's."""
        if baseline is None:
            raise ValueError("output fidelity is measured against a baseline")
        n = self.samples if samples is None else int(samples)
        seeds = self.seeds if seeds is None else tuple(int(s) for s in seeds)
        values, errors, ranges = [], [], []
        for seed in seeds:
            out, base = generate(n, seed).double(), baseline[1](n, seed).double()
            values.append(float((out - base).norm() / base.norm().clamp_min(1e-12)))
            errors.append(float(((out - base) ** 2).mean()))
            ranges.append(float(base.max() - base.min()))
        mse = statistics.fmean(errors)
        peak = max(ranges) if ranges else 1.0
        psnr = math.inf if mse == 0 else 10 * math.log10(max(peak, 1e-12) ** 2 / mse)
        return QualityCost(self.metric, n, seeds, tuple(values), baseline[0], tuple(0.0 for _ in seeds), psnr)


class QualityEvaluator:
    """FD of generated images against cached reference statistics: a proxy for inner loops and a
    confirmation at larger n before anything is reported (see the module docstring)."""

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStats, *, metric: str = "FD",
                 proxy_samples: int = 256, proxy_seed: int = 1000, confirm_samples: int = 500,
                 confirm_seeds: Sequence[int] = (0, 1, 2)):
        if proxy_samples < 2 or confirm_samples < 2:
            raise ValueError("FD needs at least 2 samples per seed")
        if not confirm_seeds:
            raise ValueError("confirmation needs at least one seed")
        self.extractor = extractor
        self.reference = reference
        self.metric = metric
        self.proxy_samples = int(proxy_samples)
        self.proxy_seed = int(proxy_seed)
        self.confirm_samples = int(confirm_samples)
        self.confirm_seeds = tuple(int(s) for s in confirm_seeds)
        self._baselines: dict[tuple[str, int, int], tuple[float, torch.Tensor]] = {}

    @staticmethod
    def for_digits(resolution: int = 16, **options: Any) -> "QualityEvaluator":
        """The shipped evaluator: ``classifier-digits`` features against the held-out digits."""
        from .metrics import DigitFeatures
        from .models.data import load_digits

        extractor = DigitFeatures()
        reference = ReferenceStats.from_features(extractor(load_digits(resolution).heldout_images),
                                                 "held-out digits")
        return QualityEvaluator(extractor, reference, metric="FD", **options)

    @staticmethod
    def from_images(extractor: FeatureExtractor, images: torch.Tensor, source: str = "reference images",
                    **options: Any) -> "QualityEvaluator":
        """An evaluator for a user's own feature extractor and reference images (N, C, H, W) in [-1, 1]."""
        with torch.no_grad():
            features = extractor(images)
        return QualityEvaluator(extractor, ReferenceStats.from_features(features, source), **options)

    def options(self) -> dict[str, Any]:
        """The settings that decide every figure, for reports."""
        return {"metric": self.metric, "reference": self.reference.source, "reference_samples": self.reference.samples,
                "proxy_samples": self.proxy_samples, "proxy_seed": self.proxy_seed,
                "confirm_samples": self.confirm_samples, "confirm_seeds": list(self.confirm_seeds)}

    def score(self, images: torch.Tensor) -> float:
        """The metric of a set of images against the reference statistics."""
        with torch.no_grad():
            features = self.extractor(images)
        return frechet_distance_stats(*gaussian_stats(features), self.reference.mean, self.reference.cov)

    def proxy(self, generate: Generator) -> float:
        """The cheap score for inner loops: FD of ``proxy_samples`` images from ``proxy_seed``."""
        return self.score(generate(self.proxy_samples, self.proxy_seed))

    def baseline(self, key: str, generate: Generator, n: int, seed: int) -> tuple[float, torch.Tensor]:
        """(score, images) of a baseline way of sampling, computed once per (key, n, seed)."""
        entry = (key, n, seed)
        if entry not in self._baselines:
            images = generate(n, seed)
            self._baselines[entry] = (self.score(images), images)
        return self._baselines[entry]

    def measure(self, generate: Generator, baseline: tuple[str, Generator] | None = None, *,
                samples: int | None = None, seeds: Sequence[int] | None = None) -> QualityCost:
        """Confirm ``generate`` at ``samples`` (default ``confirm_samples``) for each seed, next to the
        baseline ``(name, generator)`` on the same seeds, with the PSNR between the two."""
        n = self.confirm_samples if samples is None else int(samples)
        seeds = self.confirm_seeds if seeds is None else tuple(int(s) for s in seeds)
        values, base_values, errors = [], [], []
        for seed in seeds:
            images = generate(n, seed)
            values.append(self.score(images))
            if baseline is not None:
                base_score, base_images = self.baseline(baseline[0], baseline[1], n, seed)
                base_values.append(base_score)
                diff = images.double().clamp(-1, 1) - base_images.double().clamp(-1, 1)
                errors.append(float((diff ** 2).mean()))
        fidelity = None
        if errors:
            mse = statistics.fmean(errors)
            fidelity = math.inf if mse == 0 else 10 * math.log10(PSNR_RANGE**2 / mse)
        return QualityCost(self.metric, n, seeds, tuple(values), baseline[0] if baseline else None,
                           tuple(base_values) if baseline else None, fidelity)
