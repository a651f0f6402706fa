"""diffusers pipelines on this CPU: the original denoiser against graphopt's, per call and per pipeline run.

    python bench/pipelines.py [--repeats 11] [--steps 10] [--batch 4] [--passes noop,fold,cse,merge-linears,batch-branches,dce]

Two pipelines built from config with random weights (nothing is downloaded): a DiTPipeline (a
DiT-S-width transformer: 4 blocks, 6 heads of 64, 16x16x4 latents, patch 2; small AutoencoderKL;
DDIMScheduler; guidance 4, so each denoiser call sees twice the batch) and a DDPMPipeline
(UNet2DModel at 32x32x3, channels 32/64/64 with attention at the lowest level; DDPMScheduler).
Each pipeline's denoiser is optimized by ``graphopt.optimize_pipeline`` with ``--passes`` (default:
the exact pipeline). In one run, rounds alternate original and optimized (each round times both, so
drift hits them alike) and the medians are reported: one denoiser call on the recorded arguments,
and one whole pipeline call of ``--steps`` steps (same generator seed), with the ratio original /
optimized, and the largest pixel difference between the two pipelines' images (exact passes: the
optimized images are the original's within float error).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

import graphopt
from graphopt.pipelines import record_denoiser_call
from graphopt.passes import DEFAULT_PIPELINE


def dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), id2label={i: str(i) for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, pipe, call: dict, repeats: int, passes) -> dict:
    recorded = record_denoiser_call(pipe, **call)
    attr, original = recorded.denoiser, recorded.module
    start = time.perf_counter()
    report = graphopt.optimize_pipeline(pipe, passes=passes, **call)
    optimize_s = time.perf_counter() - start
    optimized = getattr(pipe, attr)

    def run(denoiser):
        setattr(pipe, attr, denoiser)
        return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images

    with torch.no_grad():
        want, got = run(original), run(optimized)  # also the warm-up of both
        for module in (original, optimized):
            module(*recorded.args, **recorded.kwargs)
        calls = {"original": [], "optimized": []}
        runs = {"original": [], "optimized": []}
        for _ in range(repeats):
            for label, module in (("original", original), ("optimized", optimized)):
                calls[label].append(_timed(lambda: module(*recorded.args, **recorded.kwargs)))
                runs[label].append(_timed(lambda: run(module)))
    setattr(pipe, attr, optimized)
    med = {k: statistics.median(v) for k, v in calls.items()}
    run_med = {k: statistics.median(v) for k, v in runs.items()}
    return {"name": name, "denoiser": f"{type(original).__name__} ({report.call})", "optimize_s": optimize_s,
            "call_ms": med, "run_ms": run_med, "max_pixel_diff": float(np.abs(want - got).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--passes", default=None, help="comma-separated passes (default: the exact pipeline)")
    ns = parser.parse_args(argv)
    import diffusers

    passes = ns.passes.split(",") if ns.passes else None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"torch threads {torch.get_num_threads()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"graphopt {graphopt.__version__}")
    default = ",".join(DEFAULT_PIPELINE) + " (default)"
    print(f"passes: {ns.passes or default}; {ns.steps} steps, {ns.batch} images per call, "
          f"medians of {ns.repeats} interleaved rounds\n")
    cases = [
        ("DiTPipeline, guidance 4", dit_pipeline(),
         {"class_labels": list(range(ns.batch)), "guidance_scale": 4.0, "num_inference_steps": ns.steps}),
        ("DDPMPipeline", ddpm_pipeline(), {"batch_size": ns.batch, "num_inference_steps": ns.steps}),
    ]
    rows = [measure(name, pipe, call, ns.repeats, passes) for name, pipe, call in cases]
    print("| pipeline | denoiser call | per call: original / optimized | ratio | pipeline run: original / "
          "optimized | ratio | max pixel diff | optimize |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c, p = r["call_ms"], r["run_ms"]
        print(f"| {r['name']} | {r['denoiser']} | {c['original'] * 1e3:.2f} / {c['optimized'] * 1e3:.2f} ms | "
              f"{c['original'] / c['optimized']:.2f}x | {p['original'] * 1e3:.0f} / {p['optimized'] * 1e3:.0f} ms | "
              f"{p['original'] / p['optimized']:.2f}x | {r['max_pixel_diff']:.1e} | {r['optimize_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
