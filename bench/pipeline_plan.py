"""A searched sampling plan run through a stock diffusers pipeline's own scheduler, with its FD.

    python bench/pipeline_plan.py --plan PLAN.json [--samples 500] [--seeds 0,1,2] [--batch 500]

PLAN.json is a plan for unet-digits found by ``graphopt search unet-digits --nfe 6 --sampler euler
--space steps --out DIR`` (DIR/plan.json). unet-digits (the EDM denoiser D(x; sigma) trained here)
is put behind diffusers' UNet interface (``EDMAsDiffusers``: the pipeline's variance-preserving x_t
at integer time step t becomes EDM's x = x_t / sqrt(alphas_cumprod[t]) at sigma_t =
sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]), and the output is the denoised image, the
scheduler's ``prediction_type="sample"``) and sampled by a stock ``DDPMPipeline`` with a
``DPMSolverMultistepScheduler`` (DPM-Solver++; order 1 is DDIM, which is Euler's method on EDM's
ODE, the method the plan was searched for; order 2 is the pipeline's usual 2M). Rows, each FD over
``--samples`` images per seed (mean ± std over ``--seeds``, the shipped digits evaluator):

- the scheduler's own spacing at the plan's step count (linspace, and Karras sigmas);
- the plan, given to the scheduler by ``graphopt.plan_scheduler`` (nearest training time steps;
  the rounding's largest relative sigma error is printed);
- the same plan through graphopt's own sampler, and the default schedule with Heun at 17 steps (NFE 33);
- the plan in the pipeline with the denoiser optimized by ``graphopt.optimize_pipeline`` (exact
  passes): the images' largest difference from the unoptimized pipeline's, and the time per image of
  both, medians of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from diffusers import ConfigMixin, DDPMPipeline, DPMSolverMultistepScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

import graphopt
from graphopt.bench import sample_images
from graphopt.models import load
from graphopt.plan import SamplingPlan
from graphopt.quality import QualityEvaluator


class EDMAsDiffusers(ModelMixin, ConfigMixin):
    """An EDM denoiser D(x; sigma) as a diffusers UNet predicting the clean sample at VP time step t."""

    ignore_for_config = ["model", "alphas_cumprod"]

    @register_to_config
    def __init__(self, model: torch.nn.Module, alphas_cumprod: torch.Tensor, sample_size: int, in_channels: int):
        super().__init__()
        self.model = model
        alphas = alphas_cumprod.double()
        self.register_buffer("sigmas", ((1 - alphas) / alphas).sqrt().float(), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).long().expand(sample.shape[0])
        sigma = self.sigmas[t]
        x0 = self.model(sample * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), sigma)
        return UNet2DOutput(sample=x0) if return_dict else (x0,)


def pipeline(model: torch.nn.Module, order: int, karras: bool = False) -> DDPMPipeline:
    scheduler = DPMSolverMultistepScheduler(prediction_type="sample", solver_order=order, use_karras_sigmas=karras)
    denoiser = EDMAsDiffusers(model=model, alphas_cumprod=scheduler.alphas_cumprod, sample_size=16, in_channels=1).eval()
    pipe = DDPMPipeline(unet=denoiser, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator_of(pipe: DDPMPipeline, steps: int, batch: int):
    def generate(n: int, seed: int) -> torch.Tensor:
        rng = torch.Generator().manual_seed(seed)
        out = []
        with torch.no_grad():
            for start in range(0, n, batch):
                images = pipe(batch_size=min(batch, n - start), generator=rng, num_inference_steps=steps,
                              output_type="np").images
                out.append(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1)
        return torch.cat(out)
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="plan.json of a unet-digits search (graphopt search ...)")
    parser.add_argument("--samples", type=int, default=500, help="images per seed (500)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (0,1,2)")
    parser.add_argument("--batch", type=int, default=500, help="images per pipeline call (500)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (5)")
    ns = parser.parse_args()
    seeds = tuple(int(s) for s in ns.seeds.split(","))
    torch.manual_seed(0)
    ref = load("unet-digits")
    plan = SamplingPlan.load(ns.plan, ref.model)
    evaluator = QualityEvaluator.for_digits(confirm_samples=ns.samples, confirm_seeds=seeds)
    print(f"{platform.machine()} {platform.processor() or ''} CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; unet-digits; plan {ns.plan}: {plan.describe()}; FD over {ns.samples} samples "
          f"x seeds {list(seeds)} (mean ± std), batch {ns.batch}", flush=True)
    rows = []

    def row(label: str, where: str, nfe: int, generate) -> None:
        start = time.perf_counter()
        cost = evaluator.measure(generate)
        rows.append((label, where, nfe, cost.mean, cost.std))
        print(f"{label} [{where}]: NFE {nfe}, FD {cost.mean:.2f} ± {cost.std:.2f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    steps = plan.steps
    reference = ref.sampler.with_steps(17, "heun")
    row("default sampling, Heun NFE 33 (reference)", "graphopt sampler", reference.nfe,
        lambda n, s: sample_images(ref.model, reference, n, s, ns.batch))
    row("the plan, Euler", "graphopt sampler", plan.nfe, lambda n, s: sample_images(ref.model, plan.sampler(), n, s,
                                                                                    ns.batch))
    for order in (1, 2):
        solver = f"DPM-Solver++ order {order}" + (" (DDIM)" if order == 1 else " (2M)")
        row(f"{solver}, scheduler's linspace spacing", "DDPMPipeline", steps,
            generator_of(pipeline(ref.model, order), steps, ns.batch))
        row(f"{solver}, scheduler's Karras sigmas", "DDPMPipeline", steps,
            generator_of(pipeline(ref.model, order, karras=True), steps, ns.batch))
        planned = pipeline(ref.model, order)
        planned.scheduler = graphopt.plan_scheduler(plan, planned.scheduler)
        print(f"  plan_steps: {planned.scheduler.plan_steps.line()}", flush=True)
        row(f"{solver}, the plan via plan_scheduler", "DDPMPipeline", steps, generator_of(planned, steps, ns.batch))

    # the same plan with the denoiser optimized (exact passes): images and time per image against the original
    pipe = pipeline(ref.model, 2)
    pipe.scheduler = graphopt.plan_scheduler(plan, pipe.scheduler)
    original = pipe.unet
    report = graphopt.optimize_pipeline(pipe, batch_size=2, num_inference_steps=steps)
    optimized = pipe.unet
    times: dict[str, list[float]] = {"original": [], "optimized": []}
    images = {}
    with torch.no_grad():
        for _ in range(ns.repeats + 1):  # the first round warms both up
            for name, unet in (("original", original), ("optimized", optimized)):
                pipe.unet = unet
                start = time.perf_counter()
                images[name] = pipe(batch_size=ns.batch, generator=torch.Generator().manual_seed(0),
                                    output_type="np").images
                times[name].append((time.perf_counter() - start) / ns.batch)
    first, second = (statistics.median(times[k][1:]) for k in ("original", "optimized"))
    print(f"optimize_pipeline: {report.line()}", flush=True)
    print(f"the plan in the pipeline, original / optimized denoiser: {first * 1e3:.3f} / {second * 1e3:.3f} ms/image "
          f"({first / second:.2f}x), max pixel diff {np.abs(images['original'] - images['optimized']).max():.2g}",
          flush=True)
    print("\n| sampling | run by | NFE | FD |\n| --- | --- | ---: | --- |")
    for label, where, nfe, mean, std in rows:
        print(f"| {label} | {where} | {nfe} | {mean:.2f} ± {std:.2f} |")


if __name__ == "__main__":
    main()
