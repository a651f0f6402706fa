"""The CPU target: graphopt (exact passes, then Inductor ahead of time) against eager and torch.compile.

    python bench/cpu.py [--models dit-digits,unet-digits] [--batch 64] [--repeats 15]
    python bench/cpu.py --models diffusers-dit,diffusers-unet --batch 64    # third-party code

For each reference denoiser (or the GPU benchmark's denoisers at their CPU scale, diffusers' among
them, with random weights of seed 0), in one run on the same inputs: the latency of one denoiser call at
``--batch`` for the original model in eager mode, ``torch.compile`` of the original model (Inductor,
default mode, dynamic batch off; and again with Inductor's ``freezing``, the option graphopt's package
is compiled with), graphopt's optimized module (the exact pipeline, ``graphopt passes`` lists it; the graph
runs in eager ATen) and the same compiled for the CPU (``optimize(..., compile=True)``: AOTInductor on
the optimized graph), as medians of interleaved runs (each round times every variant once, so drift
hits them alike), with ratios to eager and to torch.compile. Also: the compile time of torch.compile
(its first call) and of graphopt's compile, the max error of each variant against eager, and the next
process's start: seconds from a fresh interpreter's imports to the first call's result, for graphopt
loading the saved compiled model and for torch.compile with Inductor's caches warm from this run.
Compile times are cold: Inductor gets a fresh on-disk cache (``--warm-cache`` keeps the usual one).
Writes the section between the CPU markers of bench/RESULTS.md (the third-party markers for any model
that is not a reference generator).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _fresh import COMPILE_MODEL, LOAD_SAVED, run_fresh  # bench/, beside this script
from _inputs import DENOISERS, cpu_model, first_tensor, tiled
from _sections import replace_section

import graphopt
from graphopt.models import generators
from graphopt.passes import DEFAULT_PIPELINE

HERE = Path(__file__).resolve().parent
SECTIONS = {"cpu": ("<!-- cpu:begin -->", "<!-- cpu:end -->"),
            "third-party": ("<!-- cpu-third-party:begin -->", "<!-- cpu-third-party:end -->")}


def measure(name: str, batch: int, repeats: int) -> dict:
    model, examples = cpu_model(name)
    inputs = tiled(examples, batch)
    with torch.no_grad():
        want = first_tensor(model(*inputs))

        start = time.perf_counter()
        compiled_model = torch.compile(model, dynamic=False)
        torch_out = first_tensor(compiled_model(*inputs))  # the first call compiles
        torch_compile_s = time.perf_counter() - start
        # the same with Inductor's freezing, which graphopt's package uses: the fair bar for its speed
        start = time.perf_counter()
        frozen_model = torch.compile(model, dynamic=False, options={"freezing": True})
        frozen_out = first_tensor(frozen_model(*inputs))
        frozen_compile_s = time.perf_counter() - start

        # a third-party model is captured at the measured batch: diffusers' UNet takes another path from
        # batch 64 on, so a capture at the examples' batch 2 holds for batches 1-63 only
        captured_at = inputs if name in DENOISERS else examples
        exact = graphopt.optimize(model, captured_at)
        fast = graphopt.optimize(model, captured_at, compile=True)
        compile_s = fast.report.compiled["compile_s"]
        with tempfile.TemporaryDirectory() as tmp:
            fast.save(Path(tmp) / "m")
            warm = graphopt.load(Path(tmp) / "m")
            assert warm.report.compiled["warm"]
            # the next process's start, as a user's next run has it: torch.compile's with Inductor's
            # caches warm from the compile above (same model and shapes), graphopt's from the save
            torch.save(inputs, Path(tmp) / "inputs.pt")
            starts = {"graphopt": run_fresh(LOAD_SAVED, Path(tmp) / "m", Path(tmp) / "inputs.pt", "cpu"),
                      "torch.compile": run_fresh(COMPILE_MODEL, name, Path(tmp) / "inputs.pt", HERE)}
        variants = {"eager": model, "torch.compile": compiled_model, "torch.compile, freezing": frozen_model,
                    "graphopt": exact, "graphopt + compile": fast, "graphopt loaded warm": warm}
        errors = {k: float((first_tensor(f(*inputs)) - want).abs().max()) for k, f in variants.items()}
        errors["torch.compile"] = float((torch_out - want).abs().max())
        errors["torch.compile, freezing"] = float((frozen_out - want).abs().max())
        times: dict[str, list[float]] = {k: [] for k in variants}
        for f in variants.values():  # warm-up
            f(*inputs)
        for _ in range(repeats):
            for k, f in variants.items():
                start = time.perf_counter()
                f(*inputs)
                times[k].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    row = {"model": name, "batch": batch, "ms": ms, "errors": errors, "torch_compile_s": round(torch_compile_s, 1),
           "frozen_compile_s": round(frozen_compile_s, 1), "graphopt_compile_s": round(compile_s, 1),
           "fresh_start": {"graphopt": dict(zip(("total_s", "import_s", "load_s", "first_call_s"), starts["graphopt"])),
                           "torch.compile": dict(zip(("total_s", "import_s", "compile_and_first_call_s"),
                                                     starts["torch.compile"]))}}
    print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
          + f"; compile: torch.compile {torch_compile_s:.0f}s (freezing {frozen_compile_s:.0f}s), graphopt "
          + f"{compile_s:.0f}s; next process: "
          + fresh_start_text(row), flush=True)
    return row


def fresh_start_text(row: dict) -> str:
    g, c = row["fresh_start"]["graphopt"], row["fresh_start"]["torch.compile"]
    return (f"graphopt {g['total_s']:.1f} s (import {g['import_s']:.1f} + load {g['load_s']:.2f} + first call "
            f"{g['first_call_s']:.1f}), torch.compile {c['total_s']:.1f} s (import {c['import_s']:.1f} + compile "
            f"from its warm cache and first call {c['compile_and_first_call_s']:.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dit-digits,unet-digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep Inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    ns = parser.parse_args(argv)
    names = [m for m in ns.models.split(",") if m]
    unknown = [m for m in names if m not in generators() and m not in DENOISERS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join([*generators(), *DENOISERS])}",
              file=sys.stderr)
        return 2
    third_party = any(m in DENOISERS for m in names)
    BEGIN, END = SECTIONS["third-party" if third_party else "cpu"]
    if not ns.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphopt-bench-inductor-")
    started = time.perf_counter()
    rows = [measure(m, ns.batch, ns.repeats) for m in names]
    minutes = (time.perf_counter() - started) / 60
    machine = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"{os.cpu_count()} cores")
    command = f"python bench/cpu.py --models {ns.models} --batch {ns.batch} --repeats {ns.repeats}"
    title = "on third-party denoisers" if third_party else "graphopt + Inductor against torch.compile"
    weights = ("the reference generators' shipped checkpoints, the others (the GPU benchmark's denoisers at their "
               "CPU scale: same depth, narrower, 8x8 latents) random of seed 0") if third_party else \
        "the shipped checkpoints"
    lines = [BEGIN, "", f"## The CPU target: {title}", "",
             f"Measured by `{command}` ({minutes:.0f} min) on {machine}. One denoiser call at batch {ns.batch}, "
             f"median of {ns.repeats} interleaved rounds; compile times "
             f"{'with a warm' if ns.warm_cache else 'cold, with a fresh'} Inductor cache; ratios are eager or torch.compile time over the "
             "variant's (higher is faster). torch.compile: the original model, default mode, static shapes; "
             "with freezing: the same with Inductor's `freezing` option (weights as constants), which "
             "graphopt's package uses, so the last ratio column is against the faster of the two (it compiles "
             "second, with some of Inductor's caches warm from the first). "
             f"graphopt: exact passes ({', '.join(DEFAULT_PIPELINE)}), the graph in eager ATen; + compile: the "
             "same graph "
             "compiled ahead of time by AOTInductor with freezing (dynamic batch from 1); loaded warm: that "
             f"package read back from a save, no compile. Weights: {weights}"
             f"{'; these are captured at the measured batch' if third_party else ''}. Exact passes: no "
             "quality cost (max error against eager in the last column).", "",
             "| model | variant | ms per call | vs eager | vs torch.compile | vs best torch.compile | compile "
             "| max abs err |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ms = r["ms"]
        best = min(ms["torch.compile"], ms["torch.compile, freezing"])
        compile_cell = {"torch.compile": f"{r['torch_compile_s']:.0f} s",
                        "torch.compile, freezing": f"{r['frozen_compile_s']:.0f} s",
                        "graphopt + compile": f"{r['graphopt_compile_s']:.0f} s"}
        for k, v in ms.items():
            lines.append(f"| {r['model']} | {k} | {v:.1f} | {ms['eager'] / v:.2f}x | {ms['torch.compile'] / v:.2f}x | "
                         f"{best / v:.2f}x | {compile_cell.get(k, '-')} | {r['errors'][k]:.1e} |")
    lines += ["", "The next process's start (a fresh Python process, to its first call's result; torch.compile with "
              "Inductor's on-disk caches warm from the compile above, graphopt loading the saved compiled model):", ""]
    lines += [f"- {r['model']}: {fresh_start_text(r)}" for r in rows]
    text = "\n".join(lines + ["", END])
    replace_section(Path(ns.results), BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
