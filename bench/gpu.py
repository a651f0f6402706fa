"""graphopt on a GPU against eager and torch.compile: per denoiser call, per whole sampling loop, warm start.

    python bench/gpu.py                                  # DiT-S/2, DiT-XL/2, EDM UNet; batch 16, 1, 64; bf16; 480 s
    python bench/gpu.py --models dit-s --batches 16 --budget-s 120 --out /tmp/gpu.md
    python bench/gpu.py --smoke                          # tiny shapes on the CPU under TRITON_INTERPRET=1

In one process, with every ratio taken from the same run:

1. **Per call**, batch by batch in the order of ``--batches``, each batch for every model: eager;
   ``torch.compile`` in each ``--compile-modes`` mode (default and reduce-overhead; max-autotune when
   asked for, it takes minutes per model), each with its compile seconds; graphopt
   ``optimize(target="cuda")`` tuned for ``--tune-s`` seconds (the tunings are cached for the GPU), called
   directly (its generated forward launching each kernel through Triton's compiled launcher; again
   through ``kernel[grid]``, to show what that saves) and with CUDA graphs (the default), with its
   optimize and tune seconds and its largest error against eager.
   Ratios: eager / graphopt and best torch.compile mode / graphopt (the targets: at least 1.3x at batch
   1 and 16, 1.1x for DiT-XL/2 at batch 64).
2. **Warm start**, once the first batch is measured: the first model saved, then loaded in a fresh
   process with ``target="cuda"`` (tunings and Triton's compiled kernels cached on this machine): seconds
   from ``import graphopt`` to the first call's result (target: under 2 s), split into the import, the
   load (its phases from the loaded module's report: files and hashes, reading and checking the graph,
   lowering; and, in another fresh process, what reading the saved program with ``torch.export.load``
   alone costs) and the first call.
3. **Whole sampler**, once every batch is measured, for each model at ``--sampler-batch``: an ``--sampler-steps``-step
   Euler loop (flow times for the DiTs, EDM sigmas for the UNet): eager, torch.compile reduce-overhead,
   graphopt with per-call CUDA graphs, and graphopt's :class:`graphopt.SamplerGraph` (the whole loop as one
   graph).

Times are medians of CUDA-event-bracketed calls, back to back with a warm L2 as in a sampling loop
(the events include the host's launch time wherever the GPU waits for it). Phases run in that order
(so what is asked for first is measured first; the models stay on the GPU throughout) until
``--budget-s`` is spent, or until what is left is less than the model's previous batch took (torch.compile
cannot be interrupted, so a phase that starts finishes); what
was skipped is listed, and so is a phase that failed (its traceback printed; the run goes on and exits 1).
Writes the tables, conditions included, to ``--out`` and the raw figures to the same name with ``.json``,
after every phase, so a run cut short keeps what it measured. Weights are random: speed does not depend on them.

``--smoke`` runs the same code on tiny shapes on the CPU under Triton's interpreter, with wall-clock
timing and without torch.compile or CUDA graphs: it checks that the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dit-s,dit-xl,unet",
                   help="comma-separated: dit-s, dit-b, dit-xl, unet, diffusers-unet (diffusers' UNet2DModel "
                        "128/256/256), diffusers-dit (its DiTTransformer2DModel at DiT-S/2's size); the last two need "
                        "diffusers")
    p.add_argument("--batches", default="16,1,64",
                   help="comma-separated batch sizes, measured in this order across the models (default 16,1,64)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--compile-modes", default="default,reduce-overhead",
                   help="torch.compile modes to compare with (default: default,reduce-overhead; add max-autotune "
                        "when the budget allows minutes per model)")
    p.add_argument("--tune-s", type=float, default=15.0, help="graphopt's tuning budget per model and batch (s)")
    p.add_argument("--sampler-steps", type=int, default=8, help="steps of the whole-sampler loop (default 8)")
    p.add_argument("--sampler-batch", type=int, default=16, help="images per whole-sampler loop (default 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall seconds for the whole run; phases that would start later are skipped (default 480)")
    p.add_argument("--out", default=None, help="markdown file for the tables (default bench/RESULTS-gpu.md; "
                                               "with --smoke, bench-out/gpu-smoke.md)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:  # triton reads this when kernels are decorated, and torch imports triton early
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _fresh import LOAD_PHASES, LOAD_SAVED, READ_PROGRAM, run_fresh  # noqa: E402 - bench/, beside this script
from _inputs import DTYPES, denoiser, example_inputs, selection  # noqa: E402

import graphopt  # noqa: E402
from graphopt.autotune.model_tuning import tune_model  # noqa: E402
from graphopt.autotune.configs import is_aten  # noqa: E402
from graphopt.autotune.gemm import is_template  # noqa: E402
from graphopt.cudagraphs import direct_launches  # noqa: E402
from graphopt.models.samplers import Sampler, edm_sigmas, flow_times  # noqa: E402
from graphopt.saved import PROGRAM  # noqa: E402
from graphopt.verify import compare  # noqa: E402

HERE = Path(__file__).parent


class Clock:
    """The run's budget: phases ask before they start."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.skipped: list[str] = []
        self.failed: list[str] = []

    def attempt(self, phase: str, fn: Callable[[], object], need_s: float = 0.0) -> None:
        """Runs a phase that is allowed to start (``need_s``: about what it will take, so that a phase
        the budget cannot hold is skipped rather than cut off); one that raises is listed as failed and
        the run goes on."""
        if not self.allows(phase, need_s):
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - one failed phase must not lose the others' figures
            traceback.print_exc()
            self.failed.append(f"{phase} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def allows(self, phase: str, need_s: float = 0.0) -> bool:
        left = self.left()
        if left > max(need_s, 0.0):
            return True
        self.skipped.append(phase)
        why = "budget spent" if left <= 0 else f"{left:.0f} s left, about {need_s:.0f} s needed"
        print(f"skipped ({why}): {phase}", flush=True)
        return False


def timed_ms(fn: Callable[[], object], repeats: int, smoke: bool) -> float:
    """Median milliseconds per call after a warm-up: CUDA events on a GPU, wall clock in the smoke run."""
    with torch.no_grad():
        for _ in range(3 if not smoke else 1):
            fn()
        if smoke:
            times = []
            for _ in range(max(repeats // 10, 2)):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def seconds(fn: Callable[[], object], smoke: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if not smoke:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def sampler_for(key: str, model: torch.nn.Module, steps: int) -> Sampler:
    c = model.config
    shape = (c.in_channels, c.resolution, c.resolution)
    if key.startswith("dit") or key == "diffusers-dit":
        return Sampler("flow", "euler", flow_times(steps), shape, null_class=1000)
    return Sampler("edm", "euler", edm_sigmas(steps), shape)


class ModelRun:
    """One model on the device: eager, its torch.compile objects and graphopt's modules, built once."""

    def __init__(self, key: str, args: argparse.Namespace):
        self.key, self.smoke = key, args.smoke
        model, self.label = denoiser(key, "smoke" if args.smoke else "full")
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
        self.model = model.to(self.device, self.dtype)
        self.compiled: dict[str, Callable] = {}
        self.module = self.graphed = None
        self.optimize_s = math.nan

    def inputs(self, batch: int) -> tuple:
        torch.manual_seed(batch)
        return example_inputs(self.key, self.model, batch, self.device, self.dtype)

    def graphopt_modules(self, inputs: tuple) -> None:
        """One optimized module: on a GPU it replays a CUDA graph per layout, and :meth:`direct` calls
        it without them (the same lowering, tunings and generated forwards)."""
        if self.module is not None:
            return
        start = time.perf_counter()
        self.module = graphopt.optimize(self.model, inputs, target="cuda")
        self.optimize_s = time.perf_counter() - start
        self.graphed = None if self.smoke else self.module

    def direct(self, fn: Callable[[], object]) -> object:
        """``fn()`` with the module's calls launching their kernels directly, no CUDA graphs."""
        with direct_launches(self.module):
            return fn()

    def compile_mode(self, mode: str, inputs: tuple) -> tuple[Callable, float]:
        """torch.compile(model, mode) and the seconds its first call at these inputs took (a new batch
        size recompiles: dynamic=False, as a deployment at fixed shapes would use it)."""
        if mode not in self.compiled:
            self.compiled[mode] = torch.compile(self.model, mode=mode, dynamic=False)
        return self.compiled[mode], seconds(lambda: self.compiled[mode](*inputs), self.smoke)


def per_call(run: ModelRun, batch: int, args: argparse.Namespace, clock: Clock) -> dict:
    inputs = run.inputs(batch)
    row: dict = {"model": run.label, "batch": batch, "compile": {}}
    row["eager_ms"] = timed_ms(lambda: run.model(*inputs), args.repeats, run.smoke)
    for mode in [m for m in args.compile_modes.split(",") if m] if not run.smoke else []:
        if not clock.allows(f"{run.label} batch {batch}: torch.compile {mode}"):
            continue
        fn, s = run.compile_mode(mode, inputs)
        row["compile"][mode] = {"ms": timed_ms(lambda: fn(*inputs), args.repeats, run.smoke), "compile_s": s}
    run.graphopt_modules(inputs)
    start = time.perf_counter()
    if run.smoke:  # the wall clock stands in for CUDA events
        tuned = tune_model(run.module, [batch], timer=lambda fn, **_: timed_ms(fn, 2, True), cache=None,
                           budget_s=args.tune_s, progress=False)
    else:  # without CUDA graphs: no graph is recorded for the configs tuning is about to replace
        tuned = run.direct(lambda: tune_model(run.module, [batch], budget_s=args.tune_s, progress=False))
    row["tune_s"], row["optimize_s"] = time.perf_counter() - start, run.optimize_s
    # GEMM-epilogue sites: the untuned default (cuBLAS + the epilogue kernel; eager for a one-op epilogue),
    # which candidate won, by how much
    row["gemm"] = [{"kernel": t.kernel, "shape": list(t.shape), "won": gemm_choice(t.config),
                    "default": gemm_choice(t.default or {}), "vs_default": t.speedup}
                   for t in tuned if t.kind == "gemm"]
    row["graphopt_ms"] = run.direct(lambda: timed_ms(lambda: run.module(*inputs), args.repeats, run.smoke))
    forwards = [f for r in run.module._runtimes for f in r.forwards if f.layout[0][0][0] == batch]
    row["launches"] = [sum(f.direct_launches for f in forwards), sum(f.launches for f in forwards)]
    row["jit_launch_ms"] = run.direct(lambda: without_direct_launches(
        run.module, lambda: timed_ms(lambda: run.module(*inputs), args.repeats, run.smoke)))
    row["graphs_ms"] = (timed_ms(lambda: run.graphed(*inputs), args.repeats, run.smoke)
                        if run.graphed is not None else math.nan)
    with torch.no_grad():
        want = run.model(*inputs)
        row["max_rel_err"] = compare((run.direct(lambda: run.module(*inputs)),), (want,)).max_rel_error
        if run.graphed is not None:
            row["max_rel_err"] = max(row["max_rel_err"], compare((run.graphed(*inputs),), (want,)).max_rel_error)
    best = min((c["ms"] for c in row["compile"].values()), default=math.nan)
    ours = min(row["graphopt_ms"], row["graphs_ms"]) if math.isfinite(row["graphs_ms"]) else row["graphopt_ms"]
    row["vs_eager"], row["vs_best_compile"] = row["eager_ms"] / ours, best / ours
    print(f"{run.label} batch {batch}: eager {row['eager_ms']:.3f} ms, "
          + "".join(f"compile {m} {c['ms']:.3f} ms ({c['compile_s']:.0f} s), " for m, c in row["compile"].items())
          + f"graphopt {row['graphopt_ms']:.3f} ms, + CUDA graphs {_n(row['graphs_ms'])} ms "
          f"(optimize {row['optimize_s']:.1f} s, tune {row['tune_s']:.1f} s): {row['vs_eager']:.2f}x eager, "
          f"{_n(row['vs_best_compile'], '.2f', 'x')} best torch.compile, max rel err {row['max_rel_err']:.1e}",
          flush=True)
    return row


def without_direct_launches(module: torch.nn.Module, fn: Callable[[], float]) -> float:
    """``fn()`` with ``module``'s generated forwards launching every kernel through ``kernel[grid]``
    (Triton's argument binding and cache lookup per launch) instead of its compiled launcher."""
    runtimes = module._runtimes
    for r in runtimes:
        r.direct_launch = False
        r.clear()
    try:
        return fn()
    finally:
        for r in runtimes:
            r.direct_launch = True
            r.clear()


def whole_sampler(run: ModelRun, args: argparse.Namespace, clock: Clock) -> dict:
    batch = 2 if run.smoke else args.sampler_batch
    inputs = run.inputs(batch)
    run.graphopt_modules(inputs)
    sampler = sampler_for(run.key, run.model, args.sampler_steps)
    noise = sampler.noise(batch, 0, run.device).to(run.dtype)
    labels = torch.randint(0, 1000, (batch,), device=run.device) if run.key.startswith("dit") else None
    loops: dict[str, Callable[[], object]] = {"eager": lambda: sampler.sample(run.model, noise, labels)}
    if not run.smoke and "reduce-overhead" in args.compile_modes.split(",") \
            and clock.allows(f"{run.label} sampler: torch.compile reduce-overhead"):
        fn, _ = run.compile_mode("reduce-overhead", inputs)
        loops["torch.compile reduce-overhead"] = lambda: sampler.sample(fn, noise, labels)
    loops["graphopt"] = lambda: run.direct(lambda: sampler.sample(run.module, noise, labels))
    if run.graphed is not None:
        loops["graphopt, per-call CUDA graphs"] = lambda: sampler.sample(run.graphed, noise, labels)
        whole = graphopt.SamplerGraph(run.graphed, sampler)
        loops["graphopt SamplerGraph (one graph)"] = lambda: whole(noise, labels)
    ms = {name: timed_ms(fn, max(args.repeats // 4, 3), run.smoke) for name, fn in loops.items()}
    row = {"model": run.label, "batch": batch, "steps": args.sampler_steps, "ms": ms}
    print(f"{run.label} {args.sampler_steps}-step loop at batch {batch}: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    return row


def warm_start(run: ModelRun) -> dict:
    """Seconds from a fresh interpreter's ``import graphopt`` to the first call of the saved module, and
    its parts: the import, ``graphopt.load`` (of which, measured in another fresh interpreter, reading the
    saved program with ``torch.export.load``), and the first call."""
    inputs = run.inputs(1)
    run.graphopt_modules(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        model, saved_inputs = Path(tmp) / "model", Path(tmp) / "inputs.pt"
        run.module.save(model)
        torch.save(inputs, saved_inputs)
        try:
            first = run_fresh(LOAD_SAVED, model, saved_inputs, "cuda")  # fills what a cold machine lacks (Triton)
            warm = run_fresh(LOAD_SAVED, model, saved_inputs, "cuda")
            (read_s,) = run_fresh(READ_PROGRAM, model / PROGRAM)
        except RuntimeError as err:
            return {"model": run.label, "error": str(err)}
    row = {"model": run.label, "first_s": first[0], "warm_s": warm[0], "import_s": warm[1], "load_s": warm[2],
           "read_program_s": read_s, "first_call_s": warm[3], "load_phases_s": dict(zip(LOAD_PHASES, warm[4:]))}
    print(f"{run.label} warm start: first load {first[0]:.2f} s, warm {warm[0]:.2f} s ({warm_parts(row)})", flush=True)
    return row


def warm_parts(row: dict) -> str:
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in row.get("load_phases_s", {}).items() if v)
    return (f"import {row['import_s']:.2f} s, load {row['load_s']:.2f} s ({phases}; reading the program alone "
            f"{row['read_program_s']:.2f} s), first call {row['first_call_s']:.2f} s")


def conditions(args: argparse.Namespace) -> str:
    import triton

    where = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if not args.smoke
             else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter: SMOKE RUN, numbers "
                  "meaningless")
    return (f"{where}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}; "
            f"{'fp32' if args.smoke else args.dtype}; medians of "
            + ("wall-clock-timed calls" if args.smoke else f"{args.repeats} CUDA-event-timed calls after warm-up"))


def gemm_choice(config: dict) -> str:
    return "eager" if is_aten(config) else "Triton template" if is_template(config) else "cuBLAS + epilogue kernel"


def _n(value: float, fmt: str = ".3f", suffix: str = "") -> str:
    return f"{value:{fmt}}{suffix}" if math.isfinite(value) else "-"


def render(conds: str, rows: list[dict], loops: list[dict], warm: list[dict], skipped: list[str],
           failed: list[str], minutes: float, args: argparse.Namespace) -> str:
    modes = [m for m in args.compile_modes.split(",") if m]
    head = ["model", "batch", "eager ms", *(f"compile {m} ms (s)" for m in modes), "graphopt ms",
            "graphopt, kernel[grid] launches ms", "graphopt + CUDA graphs ms", "optimize + tune s", "vs eager",
            "vs best compile", "max rel err"]
    lines = ["# graphopt on a GPU", "", f"`python bench/gpu.py {' '.join(sys.argv[1:])}`, {minutes:.1f} min. "
             f"Conditions: {conds}.", "", "## Per denoiser call", "", "| " + " | ".join(head) + " |",
             "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"])):
        comp = [f"{r['compile'][m]['ms']:.3f} ({r['compile'][m]['compile_s']:.0f})" if m in r["compile"] else "-"
                for m in modes]
        lines.append(f"| {r['model']} | {r['batch']} | {r['eager_ms']:.3f} | " + " | ".join(comp)
                     + f" | {r['graphopt_ms']:.3f} ({r['launches'][0]}/{r['launches'][1]} through launchers) | "
                     f"{r['jit_launch_ms']:.3f} | {_n(r['graphs_ms'])} | {r['optimize_s']:.1f} + {r['tune_s']:.1f}"
                     f" | {_n(r['vs_eager'], '.2f', 'x')} | {_n(r['vs_best_compile'], '.2f', 'x')} | "
                     f"{r['max_rel_err']:.1e} |")
    gemm = [(r, g) for r in rows for g in r.get("gemm", [])]
    if gemm:
        lines += ["", "## GEMM-epilogue sites: what tuning chose", "",
                  "Each linear + pointwise-epilogue call site, tuned on the benchmark's inputs: the winning "
                  "candidate and its time against the untuned default (cuBLAS, then the epilogue kernel; the eager "
                  "ops for a one-op epilogue).", "",
                  "| model | batch | kernel | M x N x K | untuned | chosen | vs untuned |",
                  "| --- | ---: | --- | --- | --- | --- | ---: |"]
        lines += [f"| {r['model']} | {r['batch']} | {g['kernel']} | {'x'.join(map(str, g['shape']))} | "
                  f"{g['default']} | {g['won']} | {_n(g['vs_default'], '.2f', 'x')} |" for r, g in gemm]
    if loops:
        names = list(dict.fromkeys(k for r in loops for k in r["ms"]))
        lines += ["", f"## Whole sampler: {args.sampler_steps}-step Euler loop, ms per loop", "",
                  "| model | batch | " + " | ".join(names) + " | SamplerGraph vs eager |",
                  "| --- | ---: |" + " ---: |" * (len(names) + 1)]
        for r in loops:
            ms = r["ms"]
            one = ms.get("graphopt SamplerGraph (one graph)")
            cells = " | ".join(f"{ms[n]:.2f}" if n in ms else "-" for n in names)
            lines.append(f"| {r['model']} | {r['batch']} | {cells} | " + (f"{ms['eager'] / one:.2f}x |" if one else "- |"))
    if warm:
        lines += ["", "## Warm start (fresh process: import, load with target='cuda', first call)", ""]
        lines += [f"- {w['model']}: " + (f"{w['warm_s']:.2f} s: {warm_parts(w)} (first load on this machine "
                                         f"{w['first_s']:.2f} s)" if "warm_s" in w else f"failed: {w['error']}")
                  for w in warm]
    if skipped:
        lines += ["", "Skipped when the budget was spent: " + "; ".join(skipped) + "."]
    if failed:
        lines += ["", "Failed (the traceback is in the run's output): " + "; ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    keys, batches = selection("gpu.py", args.models, args.batches, args.smoke)
    out = Path(args.out or (HERE.parent / "bench-out" / "gpu-smoke.md" if args.smoke else HERE / "RESULTS-gpu.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    conds = conditions(args)
    print(conds, flush=True)
    clock = Clock(args.budget_s)
    rows: list[dict] = []
    loops: list[dict] = []
    warm: list[dict] = []

    def save() -> str:  # after every phase: a run cut short keeps what it measured
        minutes = (time.perf_counter() - clock.start) / 60
        text = render(conds, rows, loops, warm, clock.skipped, clock.failed, minutes, args)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({
            "conditions": conds, "per_call": rows, "sampler": loops, "warm_start": warm, "skipped": clock.skipped,
            "failed": clock.failed}, indent=2))
        return text

    # Batch by batch across the models, in the order given, then the warm start, then the samplers: a
    # budget that runs out leaves the figures asked for first (every model at the first batch) measured.
    runs = {key: ModelRun(key, args) for key in keys}
    took: dict[str, float] = {}  # per model: its last batch's seconds, less the one-off optimize
    for batch in batches:
        for run in runs.values():
            phase, start = f"{run.label} batch {batch}", time.perf_counter()
            clock.attempt(phase, lambda: rows.append(per_call(run, batch, args, clock)), need_s=took.get(run.key, 0.0))
            if phase not in clock.skipped:
                spent = time.perf_counter() - start
                took[run.key] = spent - (run.optimize_s if run.key not in took and math.isfinite(run.optimize_s)
                                         else 0.0)
            save()
        if batch == batches[0]:
            first = runs[keys[0]]
            clock.attempt(f"{first.label} warm start", lambda: warm.append(warm_start(first)))
            save()
    for run in runs.values():
        clock.attempt(f"{run.label} whole sampler", lambda: loops.append(whole_sampler(run, args, clock)))
        save()
    text = save()
    print("\n" + text + f"\nwrote {out} and {out.with_suffix('.json')}")
    return 1 if clock.failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
