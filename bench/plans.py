"""Sampling plans against the default schedule: FD, seconds per image and FLOPs at low NFE.

    python bench/plans.py [--models unet-digits,dit-digits] [--nfe 4,6,8] [--samples 500] [--seeds 0,1,2]

For each reference generator and NFE budget (Heun's NFE is the odd one at or below it), these ways
of sampling are measured in one run on the same seeds: the default schedule, the default schedule
skip-tuned (rho_top/rho_bottom searched), searched time steps, searched time steps + skipped
blocks, the joint search with skip scales (the last two under a FLOPs budget a little below the
default schedule's, so skipping has to pay), and searched time steps with the Euler sampler (whose
NFE is the budget itself). Skip scales need encoder-decoder skips, so DiT rows
without them are left out. Every search is AutoDiffusion's evolution with the proxy (FD on
``--proxy-samples`` from one seed apart from the reported ones); every reported FD is over
``--samples`` per seed and ``--seeds``, with its spread, next to the 32-NFE default sampler (Heun,
17 steps, NFE 33) on the same seeds. Seconds per image: median of ``--repeats`` sampling runs of
``--latency-batch`` images after a warm-up, on this CPU. Writes the section between the plan
markers of bench/RESULTS.md (``--results``) and a Pareto plot per model beside it; every search's
folder and the raw measurements (plans.json) go under ``--out``, and ``--render OUT/plans.json``
rewrites the section from those without measuring again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from _sections import replace_section  # bench/, beside this script

from graphopt.autodiffusion import EvolutionConfig, search_run, steps_for_nfe
from graphopt.bench import sample_images
from graphopt.errors import BudgetError
from graphopt.models import load
from graphopt.plan import SamplingPlan
from graphopt.planned import PlannedDenoiser, PlanSampler
from graphopt.quality import QualityEvaluator

HERE = Path(__file__).parent
BEGIN, END = "<!-- plans:begin -->", "<!-- plans:end -->"
CONFIGS = (  # label, search space, FLOPs budget as a fraction of the default schedule's (None: none), method
    ("skip-tuned", ("skip-scale",), None, None),
    ("searched steps", ("steps",), None, None),
    ("searched steps + skips", ("steps", "skips"), 0.95, None),
    ("joint: steps + skips + skip scales", ("steps", "skips", "skip-scale"), 0.95, None),
    ("searched steps, Euler", ("steps",), None, "euler"),
)


def latency(model, sampler, batch: int, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sample_images(model, sampler, batch, seed=2000 + i, batch=batch)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="unet-digits,dit-digits")
    parser.add_argument("--nfe", default="4,6,8")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--proxy-samples", type=int, default=256)
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--out", default="bench-out/plans")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--render", metavar="PLANS_JSON",
                        help="only rewrite the RESULTS.md section from a finished run's plans.json (no measuring)")
    ns = parser.parse_args(argv)
    if ns.render:
        saved = json.loads(Path(ns.render).read_text())
        write_section(Path(ns.results), saved["conditions"], saved["models"])
        return 0
    seeds = tuple(int(s) for s in ns.seeds.split(","))
    budgets = [int(n) for n in ns.nfe.split(",")]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = QualityEvaluator.for_digits(proxy_samples=ns.proxy_samples, confirm_samples=ns.samples,
                                            confirm_seeds=seeds)
    config = EvolutionConfig(population=ns.population, parents=max(2, ns.population // 4),
                             mutations=ns.population // 2, crossovers=ns.population // 4,
                             generations=ns.generations, steps_only=max(1, ns.generations // 3),
                             increments=max(1, ns.generations // 3))
    started = time.perf_counter()
    records = {}
    for name in ns.models.split(","):
        ref = load(name)
        method = ref.sampler.method
        reference = ref.sampler.with_steps(steps_for_nfe(method, 33), method)
        planned = PlannedDenoiser.build(ref.model, ref.example_inputs)
        # first every search, then every measurement, so the timings are taken back to back
        ways: list[tuple[str, object]] = [(f"default, NFE {reference.nfe} (reference)", reference)]
        searches = []
        for nfe in budgets:
            default = ref.sampler.with_steps(steps_for_nfe(method, nfe), method)
            ways.append(("default schedule", default))
            default_cost = planned.plan_cost(SamplingPlan(planned.identity(), default.family, default.method,
                                                          default.levels, default.shape))["gflops_per_image"]
            for label, space, fraction, other_method in CONFIGS:
                if "skip-scale" in space and planned.skips == 0:
                    continue
                folder = out / f"{name}-nfe{nfe}-{'-'.join(space)}{'-' + other_method if other_method else ''}"
                shutil.rmtree(folder, ignore_errors=True)
                sampler = ref.sampler if other_method is None else ref.sampler.with_steps(4, other_method)
                try:
                    result = search_run(ref.model, sampler, ref.example_inputs, nfe=nfe, space=space,
                                        evaluator=evaluator, config=config, workers=ns.workers, out=folder,
                                        max_gflops=None if fraction is None else default_cost * fraction,
                                        model_spec=name, progress=False)
                except BudgetError as err:  # too few generations for the skip bound to open: say so, go on
                    print(f"{name} NFE {nfe} {label}: {err}", flush=True)
                    searches.append({"nfe": nfe, "label": label, "failed": str(err)})
                    continue
                print(f"{name} NFE {nfe} {label}: searched in {result.plan.search['minutes']:.1f} min", flush=True)
                ways.append((label, result.plan.sampler()))
                searches.append({"nfe": nfe, "label": label, "evaluations": result.plan.search["evaluations"],
                                 "minutes": result.plan.search["minutes"], "folder": str(folder),
                                 "skipped": sum(len(s) for s in result.plan.skipped)})

        def measure(sampler, label: str):
            generate = lambda n, s: sample_images(ref.model, sampler, n, s, 256)  # noqa: E731
            cost = evaluator.measure(generate, (f"default {method}, {reference.steps} steps", baseline))
            plan = sampler.plan if isinstance(sampler, PlanSampler) else SamplingPlan(
                planned.identity(), sampler.family, sampler.method, sampler.levels, sampler.shape)
            row = {"label": label, "method": plan.method, "nfe": plan.nfe, "fd": cost.mean, "fd_std": cost.std,
                   "values": cost.values, "s_per_image": latency(ref.model, sampler, ns.latency_batch, ns.repeats),
                   "gflops": planned.plan_cost(plan)["gflops_per_image"]}
            print(f"{name} {label}: NFE {row['nfe']}, FD {cost.mean:.2f} ± {cost.std:.2f}, "
                  f"{row['s_per_image'] * 1e3:.2f} ms/image, {row['gflops']:.3f} GFLOPs", flush=True)
            return row

        baseline = lambda n, s: sample_images(ref.model, reference, n, s, 256)  # noqa: E731
        print(f"{name}: measuring", flush=True)
        rows = [measure(sampler, label) for label, sampler in ways]
        records[name] = {"rows": rows, "searches": searches}
        done = [s for s in searches if "failed" not in s]
        joint = [s for s in done if s["label"].startswith("joint")] or [s for s in done if "skips" in s["label"]]
        if joint:
            shutil.copyfile(Path(joint[len(joint) // 2]["folder"]) / "pareto.png",
                            Path(ns.results).parent / f"{name}-pareto.png")
    command = (f"python bench/plans.py --models {ns.models} --nfe {ns.nfe} --samples {ns.samples} --seeds {ns.seeds} "
               f"--proxy-samples {ns.proxy_samples} --population {ns.population} --generations {ns.generations} "
               f"--workers {ns.workers} --repeats {ns.repeats} --latency-batch {ns.latency_batch}")
    conditions = {"command": command,
                  "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  "minutes": round((time.perf_counter() - started) / 60, 1), "nfe": ns.nfe, "samples": ns.samples,
                  "seeds": ns.seeds, "proxy_samples": ns.proxy_samples, "proxy_seed": evaluator.proxy_seed,
                  "config": dataclasses.asdict(config), "repeats": ns.repeats, "latency_batch": ns.latency_batch}
    (out / "plans.json").write_text(json.dumps({"conditions": conditions, "models": records}, indent=2))
    write_section(Path(ns.results), conditions, records)
    return 0


def write_section(path: Path, conditions: dict, records: dict) -> str:
    """Render the measured records into the section between the plan markers of ``path``."""
    c = conditions
    text = "\n".join([
        BEGIN, "", "## Sampling plans at low NFE", "",
        f"Measured by `{c['command']}` on {c['machine']}, in {c['minutes']:.0f} min.", "",
        f"FD: mean ± std over seeds {c['seeds']}, {c['samples']} samples per seed, in the `classifier-digits` "
        f"feature space against the held-out digits (as above). Searches score candidates by FD on "
        f"{c['proxy_samples']} samples from seed {c['proxy_seed']} (not a reported seed) and confirm the best 3 "
        f"at the full count. Search config: {c['config']}; the rows with skipped blocks run under a FLOPs "
        "budget of 0.95x the default schedule's at the same NFE, so skipping has to pay. Heun's NFE is the odd "
        f"one at or below each NFE budget ({c['nfe']}); Euler's is the budget. s/image: median of "
        f"{c['repeats']} runs of {c['latency_batch']} images after a warm-up.", "",
        *(_section(name, r["rows"], r["searches"], path.parent) for name, r in records.items()), END])
    replace_section(path, BEGIN, END, text)
    print(text)
    return text


def _section(name: str, rows: list[dict], searches: list[dict], folder: Path) -> str:
    reference = rows[0]
    lines = [f"### {name}", "", "| sampling | sampler | NFE | FD | s/image | speedup vs NFE "
             f"{reference['nfe']} | GFLOPs/image |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['method']} | {r['nfe']} | {r['fd']:.2f} ± {r['fd_std']:.2f} | "
                     f"{r['s_per_image'] * 1e3:.2f} ms | {reference['s_per_image'] / r['s_per_image']:.1f}x | "
                     f"{r['gflops']:.3f} |")
    lines += ["", "Search cost:", "", "| NFE budget | search | evaluations | minutes | block-steps skipped |",
              "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {s['nfe']} | {s['label']} | {s['evaluations']} | {s['minutes']:.1f} | {s['skipped']} |"
              if "failed" not in s else f"| {s['nfe']} | {s['label']} | - | - | no plan: {s['failed']} |"
              for s in searches]
    lines.append("")
    if (folder / f"{name}-pareto.png").exists():
        lines += [f"![{name}: the Pareto front of the search with skipped blocks at the middle NFE budget]({name}-pareto.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
