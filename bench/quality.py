"""FD against NFE for the reference generators; writes bench/RESULTS.md and a sample grid per model.

    python bench/quality.py [--samples 500] [--seeds 0,1]

For each of unet-digits (EDM) and dit-digits (flow matching) and each of Euler and Heun, FD to the
held-out digits at roughly 2, 4, 8, 16, 32 NFE (Heun's NFE is 2 * steps - 1, so its rows read
3, 5, 9, 17, 33), as mean ± standard deviation over the seeds at the stated sample count, next to
the real-vs-real floor and the Gaussian-noise ceiling. The conditions are printed with the table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from graphopt.bench import sample_images
from graphopt.images import grid, save_png
from graphopt.metrics import DigitFeatures, digit_bounds, fd_over_seeds
from graphopt.models import CHECKPOINT_DIR, load
from graphopt.models.data import load_digits

NFE_TARGETS = (2, 4, 8, 16, 32)
MODELS = ("unet-digits", "dit-digits")


def steps_for(method: str, nfe: int) -> int:
    return nfe if method == "euler" else nfe // 2 + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    ns = parser.parse_args(argv)
    seeds = tuple(int(s) for s in ns.seeds.split(","))
    extractor = DigitFeatures()
    bounds = digit_bounds(extractor)
    heldout = extractor(load_digits(16).heldout_images)
    rows, records = [], {}
    bar = tqdm(total=len(MODELS) * 2 * len(NFE_TARGETS), desc="FD table")
    start = time.perf_counter()
    for name in MODELS:
        ref = load(name)
        records[name] = ref.record
        for method in ("euler", "heun"):
            for target in NFE_TARGETS:
                sampler = ref.sampler.with_steps(steps_for(method, target), method)
                fd = fd_over_seeds(lambda n, s: sample_images(ref.model, sampler, n, s, ns.batch),
                                   heldout, extractor, ns.samples, seeds)
                rows.append((name, method, sampler.steps, sampler.nfe, fd))
                bar.set_postfix_str(f"{name} {method} NFE {sampler.nfe}: FD {fd.mean:.2f}", refresh=False)
                bar.update()
        sampler = ref.sampler.with_steps(16, "heun")
        labels = torch.arange(64) % 10 if sampler.family == "flow" else None
        save_png(grid(sample_images(ref.model, sampler, 64, 0, 64, labels), nrow=8),
                 Path(__file__).parent / f"{name}-grid.png")
    bar.close()
    elapsed = time.perf_counter() - start

    lines = [
        "# Reference generators: FD against NFE",
        "",
        f"Measured by `python bench/quality.py --samples {ns.samples} --seeds {ns.seeds}` on "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"in {elapsed / 60:.1f} min.",
        "",
        f"FD: Frechet distance in the 64-d feature space of `classifier-digits` (held-out accuracy "
        f"{extractor.accuracy:.2%}) between {ns.samples} samples per seed and the {bounds.heldout} held-out digits; "
        f"mean ± std over seeds {ns.seeds}. Floor (held-out half vs half): **{bounds.floor:.2f}**; "
        f"train vs held-out: {bounds.train_vs_heldout:.2f}; ceiling (Gaussian noise): **{bounds.ceiling:.1f}**.",
        "",
        "| model | sampler | steps | NFE | FD |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {meth} | {st} | {nfe} | {fd.mean:.2f} ± {fd.std:.2f} |" for m, meth, st, nfe, fd in rows]
    lines += ["", "Checkpoints (trained with `python -m graphopt.models.train FAMILY` on 2 CPU cores):", "",
              "| checkpoint | steps | batch | train time | size |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in (*MODELS, "classifier-digits"):
        rec = records.get(name) or load(name).record
        size = (CHECKPOINT_DIR / f"{name}.safetensors").stat().st_size / 1e6
        lines.append(f"| {name} | {rec['steps']} | {rec['train']['batch']} | {rec['train_time_s'] / 60:.1f} min | "
                     f"{size:.2f} MB |")
    text = "\n".join(lines) + "\n"
    Path(ns.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
