"""``graphopt bench``: latency, NFE, FD, parameters, FLOPs and a sample grid for a reference generator.

Latency is the median over ``repeats`` timed runs of the whole sampler on one batch, after one
warm-up run, divided by the batch size. FD is measured on ``samples`` fresh samples per seed
against the held-out digits, with the floor and ceiling alongside. With ``passes`` the denoiser is
first optimized by graphopt, and the fidelity to the original sampler (PSNR on the same noise and
labels) is reported with the rest: no speed figure without its quality figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .errors import UsageError


@dataclasses.dataclass(frozen=True)
class BenchResult:
    model: str
    sampler: str
    method: str
    steps: int
    nfe: int
    cfg_scale: float
    batch: int
    latency_ms_per_image: float
    latency_repeats: int
    fd: dict[str, Any]
    fd_floor: float
    fd_ceiling: float
    classifier_accuracy: float
    parameters: int
    flops_per_image: float
    passes: tuple[str, ...]
    psnr_vs_original: float | None
    grid: str
    conditions: dict[str, Any]

    def summary(self) -> str:
        fd = self.fd
        lines = [
            f"{self.model}: {self.sampler}/{self.method}, {self.steps} steps, NFE {self.nfe}, batch {self.batch}",
            f"  latency        {self.latency_ms_per_image:.3f} ms/image (median of {self.latency_repeats})",
            f"  FD             {fd['mean']:.2f} ± {fd['std']:.2f} (n={fd['samples']}, seeds {fd['seeds']}); "
            f"floor {self.fd_floor:.2f}, noise ceiling {self.fd_ceiling:.1f}",
            f"  parameters     {self.parameters:,}",
            f"  FLOPs/image    {self.flops_per_image / 1e6:.1f} M",
        ]
        if self.passes:
            lines.append(f"  passes         {','.join(self.passes)}; PSNR vs original {self.psnr_vs_original:.1f} dB")
        lines.append(f"  grid           {self.grid}")
        return "\n".join(lines)


def sample_images(model: Any, sampler: Any, n: int, seed: int, batch: int, labels: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``n`` samples (seeded: the same seed gives the same noise and labels), generated ``batch`` at a time."""
    noise = sampler.noise(n, seed)
    if sampler.family == "flow" and labels is None:
        labels = sampler.labels(n, seed)
    out = [sampler.sample(model, noise[i:i + batch], None if labels is None else labels[i:i + batch])
           for i in range(0, n, batch)]
    return torch.cat(out)


def run_bench(name: str, *, steps: int = 16, method: str = "heun", batch: int = 64, samples: int = 500,
              seeds: Sequence[int] = (0, 1), repeats: int = 5, out_dir: str | os.PathLike = "bench-out",
              passes: Sequence[str] | None = None, progress: bool = True) -> BenchResult:
    from . import optimize
    from .analysis.cost import graph_cost
    from .capture import capture
    from .metrics import DigitFeatures, digit_bounds, fd_over_seeds, psnr
    from .models import REFERENCES, load
    from .models.data import load_digits
    from .images import grid, save_png

    if name not in REFERENCES or REFERENCES[name] == "classifier":
        generators = [n for n, f in REFERENCES.items() if f != "classifier"]
        raise UsageError(f"bench needs a reference generator ({', '.join(generators)}), got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = load(name)
    sampler = ref.sampler.with_steps(steps, method)
    denoiser: Any = ref.model
    if passes is not None:
        denoiser = optimize(ref.model, ref.example_inputs, passes=list(passes))

    captured = capture(ref.model, ref.example_inputs)
    cost = graph_cost(captured.graph_module, captured.batch_symbol())
    calls_per_image = sampler.nfe * (2 if sampler.cfg_scale != 1.0 else 1)
    flops = float(cost.at(1)[0]) * calls_per_image

    bar = tqdm(total=repeats + 1 + len(seeds) + 1, desc=f"bench {name}", disable=not progress)
    timings = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sample_images(denoiser, sampler, batch, seed=1000 + i, batch=batch)
        if i:  # the first run warms up allocators and caches
            timings.append(time.perf_counter() - start)
        bar.update()

    extractor = DigitFeatures()
    heldout = extractor(load_digits(ref.config.resolution).heldout_images)

    def generate(n: int, seed: int) -> torch.Tensor:
        images = sample_images(denoiser, sampler, n, seed, batch)
        bar.update()
        return images

    fd = fd_over_seeds(generate, heldout, extractor, samples, seeds)
    bounds = digit_bounds(extractor, ref.config.resolution)
    fidelity = None
    if passes is not None:
        fidelity = psnr(sample_images(denoiser, sampler, batch, 0, batch), sample_images(ref.model, sampler, batch, 0, batch))
    labels = torch.arange(64) % 10 if sampler.family == "flow" else None
    grid_path = save_png(grid(sample_images(denoiser, sampler, 64, 0, 64, labels), nrow=8), out / f"{name}-grid.png")
    bar.update()
    bar.close()
    result = BenchResult(
        model=name, sampler=sampler.family, method=method, steps=sampler.steps, nfe=sampler.nfe,
        cfg_scale=sampler.cfg_scale, batch=batch,
        latency_ms_per_image=statistics.median(timings) / batch * 1e3, latency_repeats=repeats,
        fd=dataclasses.asdict(fd), fd_floor=bounds.floor, fd_ceiling=bounds.ceiling,
        classifier_accuracy=extractor.accuracy, parameters=sum(p.numel() for p in ref.model.parameters()),
        flops_per_image=flops, passes=tuple(passes or ()), psnr_vs_original=fidelity, grid=str(grid_path),
        conditions={"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                    "warmup_runs": 1})
    (out / f"{name}-bench.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result
