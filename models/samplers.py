"""Samplers for the reference generators: Euler and Heun ODE solvers, DDIM, classifier-free guidance.

Both families are written as x = alpha(l) x0 + sigma(l) eps over a noise level l that falls to 0:

- ``edm``: l = sigma, alpha = 1, sigma = l; the model returns the denoised D(x; sigma) = x0_hat, and
  the probability-flow ODE is dx/dsigma = (x - D) / sigma.
- ``flow``: l = t in [0, 1], alpha = 1 - t, sigma = t; the model returns the velocity v = eps - x0,
  which is dx/dt itself; x0_hat = x - t v and eps_hat = x + (1 - t) v.

Euler takes x += (l' - l) dx/dl. Heun averages that slope with the one at the Euler estimate,
except on a final step to l = 0, where the second slope is undefined (EDM's rule). DDIM sets
x' = alpha(l') x0_hat + sigma(l') eps_hat; for these two linear families that is algebraically
Euler, which the tests check. Every sampler takes the explicit list of levels, so a search can
choose them, and calls the model through one interface (``model(x, sigma)`` or
``model(x, t, y)``), so an OptimizedModule drops in. Guidance batches the conditional and the
null-class halves into one call: v = v_null + s (v_cond - v_null).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

METHODS = ("euler", "heun", "ddim")
FAMILIES = ("edm", "flow")


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> tuple[float, ...]:
    """Karras et al.'s schedule: ``steps`` levels from sigma_max to sigma_min, then 0."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if steps == 1:
        return (sigma_max, 0.0)
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    levels = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return tuple(float(s) for s in levels) + (0.0,)


def flow_times(steps: int, shift: float = 1.0) -> tuple[float, ...]:
    """``steps + 1`` times from 1 to 0; ``shift > 1`` spends more steps at high noise (SD3's shift)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return tuple(float(v) for v in t)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to turn noise into images with a given denoiser: family, method, levels, guidance.

    ``levels`` are decreasing noise levels (sigmas for ``edm``, times for ``flow``) ending at 0.
    ``shape`` is one image's (C, H, W).
    """

    family: str
    method: str
    levels: tuple[float, ...]
    shape: tuple[int, int, int]
    cfg_scale: float = 1.0
    null_class: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown sampler family {self.family!r}; choose one of {FAMILIES}")
        if self.method not in METHODS:
            raise ValueError(f"unknown sampler method {self.method!r}; choose one of {METHODS}")
        levels = list(self.levels)
        if len(levels) < 2 or levels[-1] != 0 or any(a <= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must strictly decrease to 0, got {self.levels}")
        if self.cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("classifier-free guidance needs a null class")

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    @property
    def nfe(self) -> int:
        """Denoiser calls per sample (guidance batches both halves into one call)."""
        if self.method == "heun":
            return 2 * self.steps - 1
        return self.steps

    def with_steps(self, steps: int, method: str | None = None) -> "Sampler":
        """The same sampler on the family's default schedule with ``steps`` steps."""
        levels = edm_sigmas(steps) if self.family == "edm" else flow_times(steps)
        return dataclasses.replace(self, levels=levels, method=method or self.method)

    def noise(self, n: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Seeded starting noise at the first level (sigma_max * N(0, I) for edm, N(0, I) for flow)."""
        g = torch.Generator().manual_seed(seed)
        scale = self.levels[0] if self.family == "edm" else 1.0
        return (torch.randn((n, *self.shape), generator=g, dtype=torch.float64) * scale).float().to(device)

    def labels(self, n: int, seed: int, num_classes: int = 10) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, num_classes, (n,), generator=g)

    def sample(self, model: Callable, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate from ``noise`` at ``levels[0]`` down to 0; returns the images (not clamped)."""
        return self.sample_steps(lambda step: model, noise, labels)

    def sample_steps(self, model_at: Callable[[int], Callable], noise: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`sample` with the denoiser chosen per step: ``model_at(i)`` serves step ``i`` (both of
        Heun's evaluations in it). A sampling plan uses this to skip blocks and scale skips per step."""
        x = noise
        with torch.no_grad():
            for step, (level, nxt) in enumerate(zip(self.levels, self.levels[1:])):
                model = model_at(step)
                h = nxt - level
                if self.method == "ddim":
                    x0, eps = self._predict(model, x, level, labels)
                    a, s = self._alpha_sigma(nxt)
                    x = a * x0 + s * eps
                    continue
                d = self._slope(model, x, level, labels)
                x_next = x + h * d
                if self.method == "heun" and nxt > 0:
                    x_next = x + h * 0.5 * (d + self._slope(model, x_next, nxt, labels))
                x = x_next
        return x

    def _alpha_sigma(self, level: float) -> tuple[float, float]:
        return (1.0, level) if self.family == "edm" else (1.0 - level, level)

    def _call(self, model: Callable, x: torch.Tensor, level: float, labels: torch.Tensor | None) -> torch.Tensor:
        levels = torch.full((x.shape[0],), level, dtype=x.dtype, device=x.device)
        if self.family == "edm":
            return model(x, levels)
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        if self.cfg_scale == 1.0:
            return model(x, levels, labels)
        null = torch.full_like(labels, self.null_class)
        both = model(torch.cat([x, x]), torch.cat([levels, levels]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def _slope(self, model: Callable, x: torch.Tensor, level: float, labels: torch.Tensor | None) -> torch.Tensor:
        out = self._call(model, x, level, labels)
        return (x - out) / level if self.family == "edm" else out

    def _predict(self, model: Callable, x: torch.Tensor, level: float,
                 labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._call(model, x, level, labels)
        if self.family == "edm":
            return out, (x - out) / level
        return x - level * out, x + (1 - level) * out
