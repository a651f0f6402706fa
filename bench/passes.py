"""What some exact passes are worth: the default pipeline against the same pipeline without them.

    python bench/passes.py [--without cse,merge-linears] [--models dit-digits,unet-digits] [--batches 1,64]
    python bench/passes.py --without merge-linears --models diffusers-dit,diffusers-unet --batches 1,16
    python bench/passes.py --without batch-branches --models diffusers-dit --batches 1,16

For each denoiser (a reference generator, or one of the GPU benchmark's at its CPU scale: the same
depth, narrower, on 8x8 latents; ``diffusers-dit`` has the separate q, k, v projections of third-party
attention), ``graphopt.optimize`` once with the default exact pipeline and once with
the passes named by ``--without`` left out, then one denoiser call of each at every batch size: the
median over ``--repeats`` interleaved rounds (each round times both, so drift hits them alike), the
ratio without / with (above 1: the passes make the call faster), and the largest difference between
the two modules' outputs. The graphs run in eager ATen (no compile), where a pass's saved ops show as
saved dispatch and kernel time. Prints the conditions with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import graphopt
from graphopt.models import generators
from graphopt.passes import DEFAULT_PIPELINE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _inputs import DENOISERS, cpu_model, first_tensor, tiled  # noqa: E402 - bench/, beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--without", default="cse,merge-linears", help="passes of the default pipeline to leave out")
    parser.add_argument("--models", default="dit-digits,unet-digits")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=101, help="interleaved rounds per batch (default 101)")
    ns = parser.parse_args(argv)
    left_out = [p for p in ns.without.split(",") if p]
    unknown = [p for p in left_out if p not in DEFAULT_PIPELINE]
    if unknown:
        print(f"not in the default pipeline ({','.join(DEFAULT_PIPELINE)}): {', '.join(unknown)}", file=sys.stderr)
        return 2
    reduced = [p for p in DEFAULT_PIPELINE if p not in left_out]
    names = [m for m in ns.models.split(",") if m]
    unknown = [m for m in names if m not in DENOISERS and m not in generators()]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join([*generators(), *DENOISERS])}",
              file=sys.stderr)
        return 2
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; default pipeline {','.join(DEFAULT_PIPELINE)} against {','.join(reduced)}; "
          f"medians of {ns.repeats} interleaved rounds, one call each\n")
    print("| model | batch | without ms | with ms | without / with | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        model, examples = cpu_model(name)
        modules = {"without": graphopt.optimize(model, examples, passes=reduced),
                   "with": graphopt.optimize(model, examples)}
        for batch in [int(b) for b in ns.batches.split(",")]:
            inputs = tiled(examples, batch)
            times: dict[str, list[float]] = {k: [] for k in modules}
            with torch.no_grad():
                outs = {k: first_tensor(m(*inputs)) for k, m in modules.items()}
                for _ in range(ns.repeats):
                    for k, m in modules.items():
                        start = time.perf_counter()
                        m(*inputs)
                        times[k].append(time.perf_counter() - start)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            diff = float((outs["with"] - outs["without"]).abs().max())
            print(f"| {name} | {batch} | {ms['without']:.2f} | {ms['with']:.2f} | {ms['without'] / ms['with']:.3f}x "
                  f"| {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
