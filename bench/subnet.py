"""The subnet pass (VARiant): quality, speed and KV-cache memory of d of D layers.

    python bench/subnet.py [--models var-digits,dit-digits] [--samples 500] [--seeds 0,1,2]
                           [--distill-steps 300] [--batch 250] [--repeats 3]

var-digits, at d = D, D/2, D/4 and 2 (the subnet pass routes the scales after the bridge zone to the
kept layers): FD in the digit classifier's features (n per seed, mean ± std over the seeds, the
pass's own measured quality row), class agreement of the generated digits with their labels (the
classifier's prediction, same images), seconds per image and per scale (median of ``--repeats``
interleaved runs at ``--batch`` images, guidance doubles the calls' batch), the late scales'
speed-up against the full model, and the KV-cache bytes held after the last scale, measured from
the tensors the model returned, next to VARiant's formula (T d + T_bridge (D - d)) / (T D) (T the
sequence length, T_bridge the bridge zone's; 680 and 91 in VAR-d30), with the dropped layers'
caches kept (they stop growing) and freed (the pass's default).

dit-digits, at the same fractions of its depth: FD of the subnet on every sampling step, without and
with distillation (``graphopt.distill``, every parameter, ``--distill-steps`` steps on the digits,
the best-scoring state kept), and ms per image. Writes the section between the subnet markers of
bench/RESULTS.md and the raw figures to bench-out/subnet.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _sections import replace_section  # bench/, beside this script

import graphopt
from graphopt import DistillConfig, distill
from graphopt.approx import ApproxContext
from graphopt.bench import sample_images
from graphopt.metrics import DigitFeatures, digit_bounds, frechet_distance
from graphopt.models import load
from graphopt.models.data import load_digits
from graphopt.passes.subnet import BRIDGE_FRACTION, SubnetOptions, equidistant, subnet_pass
from graphopt.quality import QualityEvaluator

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- subnet:begin -->", "<!-- subnet:end -->"
EXACT = ["noop", "fold", "dce"]


def depths(depth: int) -> list[int]:
    """D, D/2, D/4 and 2 (distinct, at least 1, largest first)."""
    return sorted({depth, max(1, depth // 2), max(1, depth // 4), min(2, depth)}, reverse=True)


def held_bytes(cache: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages behind ``cache``: what holding it costs."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache}
    return sum(storages.values())


def images_and_agreement(model, sampler, n: int, seed: int, batch: int, classifier) -> tuple[torch.Tensor, float]:
    labels = sampler.labels(n, seed)
    images = sample_images(model, sampler, n, seed, batch, labels)
    with torch.no_grad():
        predicted = classifier(images.clamp(-1, 1)).argmax(dim=1)
    return images, float((predicted == labels).float().mean())


def time_scales(models: dict[str, object], sampler, batch: int, repeats: int) -> dict[str, list[float]]:
    """Per model, the median seconds of each scale's call over ``repeats`` interleaved sampling runs."""
    noise, labels = sampler.noise(batch, 123), sampler.labels(batch, 123)
    runs: dict[str, list[list[float]]] = {k: [] for k in models}
    for _ in range(repeats + 1):  # the first round warms up (and captures the scales)
        for key, model in models.items():
            times: list[float] = []

            def timed(k, model=model, times=times):
                def call(*args):
                    start = time.perf_counter()
                    out = model(*args)
                    times.append(time.perf_counter() - start)
                    return out
                return call

            sampler.sample_steps(timed, noise, labels)
            runs[key].append(times)
    return {k: [statistics.median(r[s] for r in v[1:]) for s in range(len(v[0]))] for k, v in runs.items()}


def measure_var(samples: int, seeds: tuple[int, ...], batch: int, repeats: int, progress: bool) -> dict:
    ref = load("var-digits")
    model, sampler, examples = ref
    config = model.config
    depth, scales = config.depth, config.patch_nums
    bridge = round(BRIDGE_FRACTION * len(scales))
    tokens, bridge_tokens = config.tokens, sum(p * p for p in scales[:bridge])
    evaluator = QualityEvaluator.for_digits(16, confirm_samples=samples, confirm_seeds=seeds)
    ctx = ApproxContext(model, sampler, examples, evaluator, batch=batch, progress=progress)
    features = DigitFeatures()
    classifier, heldout = features.model, features(load_digits(16).heldout_images)
    modules: dict[str, object] = {}
    rows = []
    for d in depths(depth):
        start = time.perf_counter()
        if d == depth:
            module = graphopt.optimize(model, examples)
            quality = None
        else:
            module = graphopt.optimize(model, examples, passes=[*EXACT, subnet_pass(SubnetOptions(keep=d))],
                                       approx=ctx)
            quality = module.report.passes[-1].quality
        optimize_s = time.perf_counter() - start
        fds, agreements = [], []
        for seed in seeds:
            images, agreement = images_and_agreement(module, sampler, samples, seed, batch, classifier)
            fds.append(frechet_distance(features(images), heldout))
            agreements.append(agreement)
        # the KV cache after the last scale, dropped layers' caches freed (default) and kept
        held: dict[str, int] = {}
        for free in (True, False):
            if d == depth and not free:
                held["kept"] = held["freed"]
                continue
            target = module if free else graphopt.optimize(
                model, examples, passes=[*EXACT, subnet_pass(SubnetOptions(keep=d, free_caches=False))],
                approx=ApproxContext.for_model(model, examples, samples=4, seeds=(0,), progress=False))
            last: list[tuple[torch.Tensor, ...]] = []
            sampler.sample_steps(lambda k, m=target: m, sampler.noise(8, 0), sampler.labels(8, 0),
                                 on_cache=lambda k, c: last.append(c) if k == len(scales) - 1 else None)
            held["freed" if free else "kept"] = held_bytes(last[0])
        modules[f"d={d}"] = module
        rows.append(dict(d=d, kept=equidistant(depth, d), fd=fds, fd_mean=statistics.fmean(fds),
                         fd_std=statistics.stdev(fds) if len(fds) > 1 else 0.0, agreement=agreements,
                         agreement_mean=statistics.fmean(agreements), quality_row=quality,
                         held_freed=held["freed"], held_kept=held["kept"], optimize_s=round(optimize_s, 1)))
    per_scale = time_scales(modules, sampler, batch, repeats)
    full_bytes = rows[0]["held_kept"]
    for row in rows:
        times = per_scale[f"d={row['d']}"]
        row["scale_s"] = times
        row["s_per_image"] = sum(times) / batch
        row["late_s"] = sum(times[bridge:])
        row["formula_kept"] = (tokens * row["d"] + bridge_tokens * (depth - row["d"])) / (tokens * depth)
        row["formula_freed"] = row["d"] / depth
        row["measured_kept"] = row["held_kept"] / full_bytes
        row["measured_freed"] = row["held_freed"] / full_bytes
    for row in rows:
        row["late_speedup"] = rows[0]["late_s"] / row["late_s"]
        row["speedup"] = rows[0]["s_per_image"] / row["s_per_image"]
    return dict(depth=depth, scales=list(scales), bridge=bridge, tokens=tokens, bridge_tokens=bridge_tokens,
                cfg=sampler.cfg_scale, top_p=sampler.top_p, top_k=sampler.top_k, rows=rows,
                bounds=dataclasses.asdict(digit_bounds(features, 16)))


def measure_dit(samples: int, seeds: tuple[int, ...], batch: int, distill_steps: int, repeats: int,
                progress: bool) -> dict:
    ref = load("dit-digits")
    model, sampler, examples = ref
    depth = model.config.depth
    evaluator = QualityEvaluator.for_digits(16, confirm_samples=samples, confirm_seeds=seeds)
    ctx = ApproxContext(model, sampler, examples, evaluator, batch=batch, progress=progress)
    rows = []
    full = graphopt.optimize(model, examples)
    for d in depths(depth):
        if d == depth:
            continue
        module = graphopt.optimize(model, examples, passes=[*EXACT, subnet_pass(SubnetOptions(keep=d))], approx=ctx)
        quality = module.report.passes[-1].quality
        timings = {"full": [], "subnet": []}
        for _ in range(repeats + 1):
            for key, m in (("full", full), ("subnet", module)):
                start = time.perf_counter()
                sample_images(m, sampler, 64, 1000, 64)
                timings[key].append(time.perf_counter() - start)
        ms = {k: statistics.median(v[1:]) / 64 * 1e3 for k, v in timings.items()}
        start = time.perf_counter()
        report = distill(module, model, config=DistillConfig(steps=0, all_steps=distill_steps, lr=3e-4,
                                                             checkpoint_every=max(1, distill_steps // 4)),
                         context=ctx, progress=progress)
        rows.append(dict(d=d, kept=equidistant(depth, d), quality=quality, distilled=report.quality,
                         distill_steps=report.steps, distill_minutes=report.minutes, kept_step=report.kept_step,
                         ms_full=ms["full"], ms_subnet=ms["subnet"], distill_wall_s=round(time.perf_counter() - start)))
    return dict(depth=depth, sampler=f"{sampler.method} {sampler.steps} steps, NFE {sampler.nfe}, cfg {sampler.cfg_scale}",
                rows=rows)


def _fd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def section(var: dict | None, dit: dict | None, args: argparse.Namespace) -> str:
    lines = [BEGIN, "## Subnets (VARiant): d of D layers", "",
             f"Command: `python bench/subnet.py --samples {args.samples} --seeds {args.seeds} --batch {args.batch} "
             f"--repeats {args.repeats} --distill-steps {args.distill_steps}` (`--models` measures a subset and keeps "
             "the others' last figures)  ",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. FD in "
             f"classifier-digits features, n={args.samples} per seed, mean ± std over seeds {args.seeds}.", ""]
    if var is not None:
        r0 = var["rows"][0]
        b = var["bounds"]
        lines += [f"### var-digits (D = {var['depth']}, scales {var['scales']}, {var['tokens']} tokens; bridge zone "
                  f"= first {var['bridge']} scales, {var['bridge_tokens']} tokens; cfg {var['cfg']}, top-p "
                  f"{var['top_p']})", "",
                  f"FD floor (held-out halves) {b['floor']:.2f}, train vs held-out {b['train_vs_heldout']:.2f}, "
                  f"noise ceiling {b['ceiling']:.0f}. Seconds per image: {args.batch} images per call (x2 with "
                  f"guidance), median of {args.repeats} runs. KV bytes: held after the last scale, as a fraction of "
                  f"the full model's ({r0['held_kept'] / 1e6:.2f} MB at 8 images).", "",
                  "| d | kept layers | FD | class agreement | s/image | speed-up | late scales speed-up | KV held, "
                  "dropped caches kept (formula) | KV held, freed (d/D) |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in var["rows"]:
            lines.append(f"| {r['d']} | {list(r['kept'])} | {_fd(r['fd'])} | {r['agreement_mean']:.3f} | "
                         f"{r['s_per_image'] * 1e3:.2f} ms | {r['speedup']:.2f}x | {r['late_speedup']:.2f}x | "
                         f"{r['measured_kept']:.4f} ({r['formula_kept']:.4f}) | {r['measured_freed']:.4f} "
                         f"({r['formula_freed']:.4f}) |")
        lines.append("")
    if dit is not None:
        lines += [f"### dit-digits (D = {dit['depth']}; the subnet on every step; {dit['sampler']})", "",
                  "| d | kept layers | FD full model | FD subnet | FD subnet + distillation (steps, kept step) | "
                  "ms/image full | ms/image subnet |", "| ---: | --- | --- | --- | --- | ---: | ---: |"]
        for r in dit["rows"]:
            q, dq = r["quality"], r["distilled"]
            lines.append(f"| {r['d']} | {list(r['kept'])} | {_fd(q['baseline_values'])} | {_fd(q['values'])} | "
                         f"{_fd(dq['values'])} ({r['distill_steps']}, {r['kept_step']}) | {r['ms_full']:.2f} | "
                         f"{r['ms_subnet']:.2f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="var-digits,dit-digits")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print, do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    models = args.models.split(",")
    unknown = set(models) - {"var-digits", "dit-digits"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: choose var-digits and/or dit-digits")
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    saved = out / "subnet.json"
    # a model not measured in this run keeps its figures from the last run that measured it
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    var = (measure_var(args.samples, seeds, args.batch, args.repeats, True) if "var-digits" in models
           else previous.get("var"))
    dit = (measure_dit(args.samples, seeds, min(args.batch, 256), args.distill_steps, args.repeats, True)
           if "dit-digits" in models else previous.get("dit"))
    saved.write_text(json.dumps({"var": var, "dit": dit, "commands": {
        **previous.get("commands", {}), **{m: " ".join(sys.argv) for m in models}}}, indent=2, default=list))
    text = section(var, dit, args)
    print(text)
    if not args.no_write:
        replace_section(HERE / "RESULTS.md", BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
