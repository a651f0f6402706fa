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
    class_agreement: dict[str, Any] | None = None  # class-conditional samples: classifier's label == asked label

    def summary(self) -> str:
        fd = self.fd
        lines = [
            f"{self.model}: {self.sampler}/{self.method}, {self.steps} steps, NFE {self.nfe}, batch {self.batch}",
            f"  latency        {self.latency_ms_per_image:.3f} ms/image (median of {self.latency_repeats})",
            f"  FD             {fd['mean']:.2f} ± {fd['std']:.2f} (n={fd['samples']}, seeds {fd['seeds']}); "
            f"floor {self.fd_floor:.2f}, noise ceiling {self.fd_ceiling:.1f}",
            *([f"  class agreement {self.class_agreement['mean']:.3f} (classifier's digit == the label asked for, "
               f"same samples)"] if self.class_agreement else []),
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
    if sampler.family in ("flow", "var") and labels is None:
        labels = sampler.labels(n, seed)
    out = [sampler.sample(model, noise[i:i + batch], None if labels is None else labels[i:i + batch])
           for i in range(0, n, batch)]
    return torch.cat(out)


def _first_sample(inputs: tuple) -> tuple:
    """``inputs`` cut to their first sample: every tensor whose leading size is the first tensor's."""
    batch = next(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim())
    return tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t for t in inputs)


def run_bench(name: str, *, steps: int | None = None, method: str | None = None, batch: int = 64, samples: int = 500,
              seeds: Sequence[int] = (0, 1), repeats: int = 5, out_dir: str | os.PathLike = "bench-out",
              passes: Sequence[str] | None = None, progress: bool = True) -> BenchResult:
    from . import optimize
    from .analysis.cost import graph_cost
    from .capture import capture
    from .metrics import DigitFeatures, digit_bounds, fd_over_seeds, psnr
    from .models import REFERENCES, generators, load
    from .models.data import load_digits
    from .images import grid, save_png

    if name not in generators():
        raise UsageError(f"bench needs a reference generator ({', '.join(generators())}), got {name!r}")
    scale_by_scale = REFERENCES[name] == "var"
    if scale_by_scale and (steps is not None or method is not None):
        raise UsageError(f"{name} samples scale by scale (one call per scale): steps and sampler do not apply")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = load(name)
    sampler = ref.sampler if scale_by_scale else ref.sampler.with_steps(steps or 16, method or "heun")
    method = sampler.method
    denoiser: Any = ref.model
    if passes is not None:
        denoiser = optimize(ref.model, ref.example_inputs, passes=list(passes))

    if scale_by_scale:  # every scale is a call of its own shape, each counted once
        calls = [ref.model.example_inputs(scale=k) for k in range(sampler.steps)]
        repeats_per_call, guided = 1, sampler.cfg_scale != 0.0
    else:  # one shape, nfe calls
        calls = [ref.example_inputs]
        repeats_per_call, guided = sampler.nfe, sampler.cfg_scale != 1.0
    flops = 0.0
    for inputs in calls:  # costed at batch 1 from a static capture, 2-3x cheaper than a dynamic-batch one
        captured = capture(ref.model, _first_sample(inputs), dynamic_batch=False)
        flops += float(graph_cost(captured.graph_module).at(1)[0])
    flops *= repeats_per_call * (2 if guided else 1)

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

    conditional = sampler.family in ("flow", "var")
    agreements: list[float] = []

    def generate(n: int, seed: int) -> torch.Tensor:
        labels = sampler.labels(n, seed) if conditional else None
        images = sample_images(denoiser, sampler, n, seed, batch, labels)
        if labels is not None:  # does the classifier read the digit each sample was asked for?
            with torch.no_grad():
                agreements.append(float((extractor.model(images.clamp(-1, 1)).argmax(1) == labels).float().mean()))
        bar.update()
        return images

    fd = fd_over_seeds(generate, heldout, extractor, samples, seeds)
    agreement = None
    if agreements:
        agreement = {"mean": statistics.fmean(agreements), "values": agreements, "samples": samples,
                     "seeds": list(seeds)}
    bounds = digit_bounds(extractor, ref.config.resolution)
    fidelity = None
    if passes is not None:
        fidelity = psnr(sample_images(denoiser, sampler, batch, 0, batch), sample_images(ref.model, sampler, batch, 0, batch))
    labels = torch.arange(64) % 10 if conditional else None
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
                    "warmup_runs": 1},
        class_agreement=agreement)
    (out / f"{name}-bench.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


@dataclasses.dataclass(frozen=True)
class PlanBenchRow:
    """One way of sampling in a plan benchmark: NFE, cost, latency and FD over seeds."""

    label: str
    method: str
    steps: int
    nfe: int
    gflops_per_image: float
    latency_ms_per_image: float
    fd: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PlanBenchResult:
    """A plan against the model's default sampler at the same NFE and at 32 NFE, measured in one run."""

    model: str
    plan: str
    batch: int
    rows: tuple[PlanBenchRow, ...]
    fd_floor: float
    fd_ceiling: float
    conditions: dict[str, Any]

    def table(self) -> str:
        reference = self.rows[-1]
        head = ("sampler", "NFE", "GFLOPs/img", "ms/img", "FD (mean ± std over seeds)", "speedup vs last row")
        rows = [head] + [(r.label, str(r.nfe), f"{r.gflops_per_image:.3f}", f"{r.latency_ms_per_image:.3f}",
                          f"{r.fd['mean']:.2f} ± {r.fd['std']:.2f}",
                          f"{reference.latency_ms_per_image / r.latency_ms_per_image:.2f}x") for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        fd = self.rows[0].fd
        lines.append(f"FD: n={fd['samples']} per seed, seeds {','.join(map(str, fd['seeds']))}; floor "
                     f"{self.fd_floor:.2f}, noise ceiling {self.fd_ceiling:.1f}; latency: median of "
                     f"{self.conditions['repeats']} runs at batch {self.batch} after a warm-up, "
                     f"{self.conditions['threads']} CPU threads")
        return "\n".join(lines)


def run_plan_bench(name: str, plan_path: str | os.PathLike, *, batch: int = 64, samples: int = 500,
                   seeds: Sequence[int] = (0, 1, 2), repeats: int = 3, out_dir: str | os.PathLike = "bench-out",
                   progress: bool = True) -> PlanBenchResult:
    """Benchmark a sampling plan against the model's default sampler at the plan's NFE and at 32 NFE
    (Heun: 33), all on the same seeds: latency per image, NFE, FLOPs per image, FD with its spread.
    The default samplers run the model as it is; the plan runs its planned denoiser."""
    from .autodiffusion import steps_for_nfe
    from .metrics import DigitFeatures, digit_bounds, fd_over_seeds
    from .models import REFERENCES, generators, load
    from .models.data import load_digits
    from .plan import SamplingPlan
    from .planned import PlannedDenoiser, example_call

    if name not in generators():
        raise UsageError(f"bench needs a reference generator ({', '.join(generators())}), got {name!r}")
    if REFERENCES[name] == "var":
        raise UsageError(f"--plan benchmarks a diffusion sampling plan; {name} samples scale by scale")
    ref = load(name)
    plan = SamplingPlan.load(plan_path, ref.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = ref.sampler.method
    same = ref.sampler.with_steps(steps_for_nfe(method, plan.nfe), method)
    long = ref.sampler.with_steps(steps_for_nfe(method, 33 if method == "heun" else 32), method)
    samplers = [(f"plan ({plan.method}, {plan.steps} steps)", plan.sampler()),
                (f"default {method}, {same.steps} steps", same), (f"default {method}, {long.steps} steps", long)]
    extractor = DigitFeatures()
    heldout = extractor(load_digits(ref.config.resolution).heldout_images)
    bounds = digit_bounds(extractor, ref.config.resolution)
    noise = ref.sampler.noise(2, 0)
    planned = PlannedDenoiser.build(ref.model, example_call(plan.family, noise, plan.levels[0], None, plan.null_class))
    bar = tqdm(total=len(samplers) * (repeats + 1 + len(seeds)), desc=f"bench {name} plan", disable=not progress)
    rows = []
    for label, sampler in samplers:
        as_plan = plan if sampler is samplers[0][1] else dataclasses.replace(
            plan, levels=sampler.levels, method=sampler.method, skipped=(), skip_scales=None)
        timings = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            sample_images(ref.model, sampler, batch, seed=1000 + i, batch=batch)
            if i:
                timings.append(time.perf_counter() - start)
            bar.update()

        def generate(n: int, seed: int, sampler: Any = sampler) -> torch.Tensor:
            images = sample_images(ref.model, sampler, n, seed, batch)
            bar.update()
            return images

        fd = fd_over_seeds(generate, heldout, extractor, samples, seeds)
        rows.append(PlanBenchRow(label, sampler.method, len(sampler.levels) - 1, as_plan.nfe,
                                 planned.plan_cost(as_plan)["gflops_per_image"],
                                 statistics.median(timings) / batch * 1e3, dataclasses.asdict(fd)))
    bar.close()
    result = PlanBenchResult(name, str(plan_path), batch, tuple(rows), bounds.floor, bounds.ceiling,
                             {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "machine": platform.machine(), "repeats": repeats, "warmup_runs": 1})
    (out / f"{name}-plan-bench.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result
