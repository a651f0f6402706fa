"""Attention replaced: FD before and after distillation, attention-site time, ONNX parity.

    python bench/attention.py [--variants dit-lit,dit-atconv,dit-atconv-hybrid,unet-lit]
                              [--new-minutes 6] [--all-minutes 4] [--samples 500] [--seeds 0,1,2]

For each variant (dit-digits with every attention replaced by LiT linear attention, by ATConv in all
blocks or hybrid; unet-digits' attention by LiT), in one run on the same seeds: the teacher's FD at
16 Heun steps, the student's FD right after the substitution, the distillation (new parameters for
``--new-minutes``, then every parameter for ``--all-minutes``; seeded, the model's own objective +
0.5 x the teacher term, batch 64) and the student's FD after it, with the minutes spent; then the
ONNX parity of the distilled student at two batch sizes. Separately, the time of one attention site
(DiT-S width 384, 6 heads, batch 1) at 256, 1024 and 4096 tokens on this CPU: softmax attention
(SDPA) against the LiT and ATConv substitutes graphopt's passes make of it, as ratios in one run
(median of ``--repeats``). Writes the section between the attention markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _sections import replace_section  # bench/, beside this script

import graphopt
from graphopt.approx import ApproxContext, ApproxOutcome, _apply
from graphopt.distill import DistillConfig, distill
from graphopt.models import load
from graphopt.models.dit import SelfAttention
from graphopt.passes.atconv import ATConvOptions, substitute_atconv
from graphopt.passes.linear_attention import LinearAttentionOptions, substitute_linear_attention
from graphopt.quality import QualityEvaluator

HERE = Path(__file__).parent
BEGIN, END = "<!-- attention:begin -->", "<!-- attention:end -->"
VARIANTS = {
    "dit-lit": ("dit-digits", "LiT linear attention, all blocks", lambda gm: substitute_linear_attention(
        gm, LinearAttentionOptions())),
    "dit-atconv": ("dit-digits", "ATConv, all blocks, position embedding dropped", lambda gm: substitute_atconv(
        gm, ATConvOptions(drop_pos_embed=True))),
    "dit-atconv-pos": ("dit-digits", "ATConv, all blocks, position embedding kept", lambda gm: substitute_atconv(
        gm, ATConvOptions())),
    "dit-atconv-hybrid": ("dit-digits", "ATConv, every second block", lambda gm: substitute_atconv(
        gm, ATConvOptions(hybrid=True))),
    "unet-lit": ("unet-digits", "LiT linear attention, all sites", lambda gm: substitute_linear_attention(
        gm, LinearAttentionOptions())),
}


def site_times(tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in tokens:
        torch.manual_seed(0)
        site = SelfAttention(384, 6).eval()  # dit-digits' attention at DiT-S width
        x = torch.randn(2, n, 384)
        opt = graphopt.optimize(site, (x,))
        graphs = {"softmax": opt.captured.graph_module,
                  "LiT": substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions())[0],
                  "ATConv": substitute_atconv(opt.captured.graph_module, ATConvOptions())[0]}
        one = x[:1]
        times = {name: [] for name in graphs}
        with torch.no_grad():
            for gm in graphs.values():
                gm(one)  # warm-up
            for _ in range(repeats):  # interleaved, so drift hits every variant alike
                for name, gm in graphs.items():
                    start = time.perf_counter()
                    gm(one)
                    times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append({"tokens": n, **ms})
        print(f"{n} tokens: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    return rows


def run_variant(key: str, ns: argparse.Namespace, contexts: dict) -> dict:
    model_name, label, substitute = VARIANTS[key]
    if model_name not in contexts:
        evaluator = QualityEvaluator.for_digits(confirm_samples=ns.samples,
                                                confirm_seeds=tuple(int(s) for s in ns.seeds.split(",")))
        contexts[model_name] = ApproxContext.for_reference(model_name, evaluator=evaluator, progress=False)
    ctx = contexts[model_name]
    ref = load(model_name)
    student = graphopt.optimize(ref.model, tuple(ref.example_inputs))
    gm, sites = substitute(student.captured.graph_module)
    _apply(student, ApproxOutcome(graph=gm))
    teacher_gen = ctx.generator(ctx.source)
    before = ctx.evaluator.measure(ctx.generator(student), ("teacher", teacher_gen))
    print(f"{key}: {sites} sites, FD before distillation {before.line()}", flush=True)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(schedule=ns.schedule, ema=ns.ema)
        if ns.new_minutes > 0:
            reports.append(distill(student, ctx.source, config=DistillConfig(
                steps=ns.new_steps or 100_000, max_minutes=ns.new_minutes, **common),
                context=ctx, checkpoint_dir=Path(tmp) / "new", progress=False))
        if ns.all_minutes > 0:
            reports.append(distill(student, ctx.source, config=DistillConfig(
                steps=0, all_steps=ns.all_steps or 100_000, max_minutes=ns.all_minutes, lr=2e-4, **common),
                context=ctx, checkpoint_dir=Path(tmp) / "all", progress=False))
        after = ctx.evaluator.measure(ctx.generator(student), ("teacher", teacher_gen))
        onnx = graphopt.export_onnx(student, Path(tmp) / f"{key}.onnx")
    minutes = sum(r.minutes for r in reports)
    steps = [r.steps for r in reports]
    print(f"{key}: after {minutes:.1f} min ({' + '.join(map(str, steps))} steps) {after.line()}; "
          f"ONNX max abs err {onnx.max_abs_error:.2e} at batches {onnx.batch_sizes}", flush=True)
    return {"key": key, "model": model_name, "label": label, "sites": sites, "teacher": _stats(before.baseline_values),
            "before": _stats(before.values), "after": _stats(after.values), "minutes": round(minutes, 1),
            "steps": steps, "kept": [r.kept_step for r in reports], "onnx_err": onnx.max_abs_error,
            "onnx_batches": list(onnx.batch_sizes)}


def _stats(values) -> list[float]:
    values = list(values)
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--new-minutes", type=float, default=6.0)
    parser.add_argument("--all-minutes", type=float, default=4.0)
    parser.add_argument("--new-steps", type=int, default=0,
                        help="steps on the new parameters (0: as many as --new-minutes allows); a cosine "
                             "schedule decays over this many")
    parser.add_argument("--all-steps", type=int, default=0, help="steps on every parameter (0: --all-minutes)")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="learning rate after warm-up")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="decay of the moving average of the trained weights that is scored and kept (0: off)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tokens", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--render", metavar="JSON[,JSON...]", default=None,
                        help="only rewrite the section from runs' --json files (a later file's rows replace an "
                             "earlier one's of the same variant)")
    ns = parser.parse_args(argv)
    if ns.render:
        runs = [json.loads(Path(f).read_text()) for f in ns.render.split(",")]
        rows: dict[str, dict] = {}
        for run in runs:
            rows.update({r["key"]: dict(r, command=run["conditions"]["command"]) for r in run["variants"]})
        timing = next((run["timing"] for run in reversed(runs) if run["timing"]), [])
        write_section(Path(ns.results), [run["conditions"] for run in runs], list(rows.values()), timing)
        return 0
    keys = [k for k in ns.variants.split(",") if k]
    unknown = set(keys) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    timing = site_times([int(t) for t in ns.tokens.split(",") if t], ns.repeats)
    contexts: dict = {}
    rows = [run_variant(k, ns, contexts) for k in keys]
    minutes = (time.perf_counter() - started) / 60
    conditions = {"command": f"python bench/attention.py --variants {ns.variants} --new-minutes {ns.new_minutes} "
                             f"--all-minutes {ns.all_minutes} "
                             + (f"--new-steps {ns.new_steps} " if ns.new_steps else "")
                             + (f"--all-steps {ns.all_steps} " if ns.all_steps else "")
                             + (f"--schedule {ns.schedule} " if ns.schedule != "constant" else "")
                             + (f"--ema {ns.ema} " if ns.ema else "")
                             + f"--samples {ns.samples} --seeds {ns.seeds} "
                             f"--tokens {shlex.quote(ns.tokens)} --repeats {ns.repeats}",
                  "samples": ns.samples, "seeds": ns.seeds,
                  "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  "minutes": round(minutes, 1)}
    if ns.json:
        Path(ns.json).write_text(json.dumps({"conditions": conditions, "variants": rows, "timing": timing}, indent=2))
    write_section(Path(ns.results), [conditions], [dict(r, command=conditions["command"]) for r in rows], timing)
    return 0


def write_section(path: Path, runs: list[dict], rows: list[dict], timing: list[dict]) -> None:
    c = runs[0]
    commands = " and ".join(f"`{r['command']}` ({r['minutes']:.0f} min)" for r in runs)
    lines = [BEGIN, "", "## Attention replaced: LiT and ATConv, distilled", "",
             f"Measured by {commands} on {c['machine']}. FD at 16 Heun steps "
             f"(NFE 31), {c['samples']} samples on each of seeds {c['seeds']} (mean ± std), in the "
             "`classifier-digits` feature space; the teacher is the reference model on the same seeds. "
             "Distillation: new parameters first, "
             "then every parameter (lr 2e-4), batch 64, the model's own objective + 0.5 x the teacher term; "
             "minutes on this CPU. Where a row says 'kept step', the run kept each phase's best state by the "
             "proxy FD (256 samples, seed 1000) scored every 100 steps and before training (step 0: the "
             "phase's starting state)." + (" Each row's run: " + "; ".join(
                 f"{r['key']}: `{r['command']}`" for r in rows) + "." if len(runs) > 1 else ""), "",
             "| model | substitution | sites | teacher FD | FD before distillation | FD after | vs teacher | "
             "distillation | ONNX parity |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        t, b, a = r["teacher"], r["before"], r["after"]
        lines.append(f"| {r['model']} | {r['label']} | {r['sites']} | {t[0]:.2f} ± {t[1]:.2f} | "
                     f"{b[0]:.2f} ± {b[1]:.2f} | {a[0]:.2f} ± {a[1]:.2f} | {100 * (a[0] / t[0] - 1):+.0f}% | "
                     f"{r['minutes']:.1f} min "
                     f"({' + '.join(map(str, r['steps']))} steps"
                     + (f"; kept step {' + '.join(map(str, r['kept']))}" if r.get("kept") else "")
                     + f") | max abs err {r['onnx_err']:.1e} at batches "
                     f"{', '.join(map(str, r['onnx_batches']))} |")
    lines += ["", "One attention site (width 384, 6 heads, batch 1) on this CPU, median of interleaved runs:", "",
              "| tokens | softmax (SDPA) | LiT | ATConv | LiT speedup | ATConv speedup |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in timing:
        lines.append(f"| {t['tokens']} | {t['softmax']:.2f} ms | {t['LiT']:.2f} ms | {t['ATConv']:.2f} ms | "
                     f"{t['softmax'] / t['LiT']:.2f}x | {t['softmax'] / t['ATConv']:.2f}x |")
    text = "\n".join(lines + ["", END])
    replace_section(path, BEGIN, END, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
