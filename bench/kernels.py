"""GPU benchmark of graphopt's kernels against eager PyTorch and torch.compile(mode="max-autotune").

    python bench/kernels.py                      # DiT-S/2, DiT-B/2 and a UNet at 32x32x4 latents, batch 1 and 16, bf16
    python bench/kernels.py --models dit-s --batches 16 --budget-s 120 --markdown bench/kernels-h100.md
    python bench/kernels.py --smoke              # tiny shapes on the CPU under TRITON_INTERPRET=1

Three tables, each printed with its conditions (GPU, dtype, versions):

1. **Regions.** Every distinct generated kernel of each model, at each batch, on the tensors it meets
   inside the model: graphopt's kernel (tuned with ``graphopt autotune``'s tuner) against the eager ATen
   ops it replaces and against ``torch.compile(mode="max-autotune")`` of the same ops. Pointwise and
   norm kernels are memory-bound, so each also gets its achieved bandwidth (bytes it must move: every
   input and output once) as a fraction of the GPU's peak (memory clock x bus width x 2).
2. **Attention family.** The flash kernel against ``F.scaled_dot_product_attention``; LiT's ReLU
   linear attention and ATConv's dynamic depthwise 3x3 against their eager torch references, at 1024
   and 4096 tokens.
3. **Denoisers.** Latency of the whole denoiser call: eager, torch.compile (with its compile time),
   graphopt (``optimize(target="cuda")`` plus tuning, with both times) without and with CUDA graphs
   (torch.compile's max-autotune mode records CUDA graphs too), and graphopt's max error against
   eager. torch.compile(mode="max-autotune") takes minutes per model: ``--no-compile`` skips it.

Kernel times are CUDA-event medians with a cold L2 (a 256 MiB buffer is zeroed before each launch);
denoiser latencies are medians with a warm L2, as in a sampling loop. Every ratio is measured in the
same run. Weights are random (normal, std 0.02): speed does not depend on them.

``--smoke`` runs the same code on tiny shapes on the CPU under Triton's interpreter, with wall-clock
timing and without torch.compile: it checks that the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dit-s,dit-b,unet", help="comma-separated: dit-s, dit-b, dit-xl, unet")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--budget-s", type=float, default=60.0, help="tuning budget per model and batch (s)")
    p.add_argument("--tokens", default="1024,4096", help="token counts for linear attention and ATConv")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its long compile times)")
    p.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:  # triton reads this when kernels are decorated, and torch imports triton early
    os.environ["TRITON_INTERPRET"] = "1"

import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from graphopt.autotune import cuda_event_timer
from graphopt.autotune.gemm import GemmRegion
from graphopt.autotune.lower import FusedRegion
from graphopt.autotune.model_tuning import batch_inputs, record_calls, tune_model

import graphopt
from graphopt.cudagraphs import direct_launches
from _inputs import DTYPES, denoiser, example_inputs, selection  # bench/, beside this script
from graphopt.verify import compare

def wall_timer(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, flush_l2: bool = False) -> float:
    """The smoke run's timer (CPU, interpreter): median wall milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timer(smoke: bool) -> Callable[..., float]:
    return wall_timer if smoke else cuda_event_timer


PEAK_BANDWIDTH = {  # datasheet bytes/s, for a torch whose device properties lack the memory clock
    "H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12, "L40S": 0.864e12,
}


def peak_bandwidth() -> float | None:
    """Bytes/s the GPU's memory can move: memory clock (kHz) x 1e3 x 2 (double data rate) x bus bytes,
    or the datasheet figure of a known GPU."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:
        return clock * 1e3 * 2 * width / 8
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in props.name), None)


def conditions(args: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    peak = peak_bandwidth()
    import triton

    return (f"device: {gpu}; peak memory bandwidth {peak / 1e9:.0f} GB/s; " if peak else f"device: {gpu}; ") + \
        (f"dtype {'fp32' if args.smoke else args.dtype}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
         f"{'SMOKE RUN (interpreter, numbers meaningless)' if args.smoke else 'cold-L2 CUDA-event medians'}")


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def us(ms: float) -> str:
    return f"{ms * 1e3:.1f}" if math.isfinite(ms) else "-"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "-"


def compiled(fn: Callable, args: tuple, skip: bool) -> tuple[Callable | None, float]:
    """torch.compile(fn, mode="max-autotune") and its compile time (the first call), or (None, nan)."""
    if skip:
        return None, math.nan
    torch._dynamo.reset()
    c = torch.compile(fn, mode="max-autotune", dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        c(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return c, time.perf_counter() - start


def time_call(t: Callable[..., float], fn: Callable, *args: object, **timer_kwargs: object) -> float:
    return t(lambda: fn(*args), **timer_kwargs)


def bytes_moved(inputs: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]) -> int:
    # a broadcast view counts what it holds (a (B, 1, C) shift: B*C elements), read once
    return sum(t.numel() * t.element_size() for t in (*inputs, *outputs))


def bench_regions(name: str, opt: graphopt.OptimizedModule, batch: int, args: argparse.Namespace) -> list[tuple]:
    t = timer(args.smoke)
    peak = peak_bandwidth()
    seen: set[str] = set()
    rows = []
    for site, inputs in record_calls(opt, *batch_inputs(opt, batch)):
        if site.kernel_name in seen:
            continue
        seen.add(site.kernel_name)
        with torch.no_grad():
            # the eager ops the kernel replaces: the region's ATen nodes, or the attention-family op
            eager: Callable = site.reference
            ops = (" ".join(site.generated.region.ops()) if isinstance(site, FusedRegion)
                   else " ".join(site.region.ops()) if isinstance(site, GemmRegion) else site.kernel_name)
            ours = site(*inputs)
            err = compare(ours, eager(*inputs))
            ms = time_call(t, site, *inputs)
            eager_ms = time_call(t, eager, *inputs)
            comp, _ = compiled(eager, inputs, args.no_compile or args.smoke)
            comp_ms = time_call(t, comp, *inputs) if comp is not None else math.nan
        moved = bytes_moved(inputs, ours)
        bw = moved / (ms * 1e-3)
        memory_bound = isinstance(site, FusedRegion)
        rows.append((name, str(batch), site.kernel_name, ops, "x".join(map(str, site.tuning_shape(*inputs))),
                     us(ms), us(eager_ms), us(comp_ms), ratio(eager_ms, ms), ratio(comp_ms, ms),
                     f"{bw / 1e9:.0f}" if memory_bound else "-",
                     f"{100 * bw / peak:.0f}%" if memory_bound and peak else "-", f"{err.max_rel_error:.1e}"))
    return rows


def bench_attention_family(args: argparse.Namespace) -> list[tuple]:
    from graphopt.autotune.kernels import (
        attention,
        dynamic_dwconv,
        dynamic_dwconv_reference,
        linear_attention,
        linear_attention_reference,
    )

    from graphopt.autotune.kernels.dynamic_dwconv import generated_dwconv_plan, generated_dwconv_reference

    def generated(*tensors: torch.Tensor) -> torch.Tensor:
        return generated_dwconv_plan(*tensors).run(tensors)[0]

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    t = timer(args.smoke)
    rows = []
    batch, heads, d = (1, 2, 16) if args.smoke else (16, 6, 64)
    for tokens in [int(n) for n in args.tokens.split(",")]:
        tokens = 64 if args.smoke else tokens
        qkv = tuple(torch.randn(batch, heads, tokens, d, device=device, dtype=dtype) for _ in range(3))
        side, channels = math.isqrt(tokens), heads * d
        conv = (torch.randn(batch, channels, side, side, device=device, dtype=dtype),
                torch.randn(batch, channels, 3, 3, device=device, dtype=dtype))
        heads_shape, conv_shape = f"B={batch} H={heads} D={d}", f"B={batch} C={channels} {side}x{side}"
        cases = [
            ("flash attention", attention, F.scaled_dot_product_attention, qkv, heads_shape,
             "F.scaled_dot_product_attention"),
            ("ReLU linear attention (LiT)", linear_attention, linear_attention_reference, qkv, heads_shape,
             "eager reference"),
            ("dynamic depthwise 3x3 (ATConv)", dynamic_dwconv, dynamic_dwconv_reference, conv, conv_shape,
             "eager reference"),
            ("ATConv kernel generation + depthwise 3x3", generated, generated_dwconv_reference, conv[:1] + (
                torch.randn(batch, 9, channels, device=device, dtype=dtype).transpose(1, 2),
                torch.randn(9, 9, device=device, dtype=dtype), torch.randn(9, device=device, dtype=dtype),
                torch.rand(1, channels, 1, 1, device=device, dtype=dtype)), conv_shape,
             "the pass's eager ops"),
        ]
        for label, ours, theirs, inputs, shape, what in cases:
            with torch.no_grad():
                err = compare((ours(*inputs),), (theirs(*inputs),))
                ms, ref_ms = time_call(t, ours, *inputs), time_call(t, theirs, *inputs)
            rows.append((label, str(tokens), shape, us(ms), f"{us(ref_ms)} ({what})", ratio(ref_ms, ms),
                         f"{err.max_rel_error:.1e}"))
        if args.smoke:
            break
    return rows


def bench_denoiser(key: str, batch: int, args: argparse.Namespace) -> tuple:
    model, label = denoiser(key, "smoke" if args.smoke else "full")
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    device = "cpu" if args.smoke else "cuda"
    model = model.to(device=device, dtype=dtype)
    inputs = example_inputs(key, model, batch, device, dtype)
    t = timer(args.smoke)

    with torch.no_grad():  # a sampling loop calls the denoiser with a warm L2: no flush
        eager_ms = time_call(t, model, *inputs, flush_l2=False)
        comp, compile_s = compiled(model, inputs, args.no_compile or args.smoke)
        comp_ms = time_call(t, comp, *inputs, flush_l2=False) if comp is not None else math.nan
        start = time.perf_counter()
        opt = graphopt.optimize(model, inputs, target="cuda")
        optimize_s = time.perf_counter() - start
        start = time.perf_counter()
        with direct_launches(opt):  # without its CUDA graphs: the kernels launched one by one
            if args.smoke:
                tune_model(opt, [batch], timer=wall_timer, cache=None, budget_s=args.budget_s, progress=False)
            else:
                tune_model(opt, [batch], budget_s=args.budget_s)
            tune_s = time.perf_counter() - start
            ours_ms = time_call(t, opt, *inputs, flush_l2=False)
            err = compare((opt(*inputs),), (model(*inputs),))
        graphs_ms = math.nan
        if not args.smoke:  # the same kernels and configs, replayed as one CUDA graph per call (the default)
            graphs_ms = time_call(t, opt, *inputs, flush_l2=False)
    return (label, str(batch), us(eager_ms), us(comp_ms), f"{compile_s:.1f}" if math.isfinite(compile_s) else "-",
            us(ours_ms), us(graphs_ms), f"{optimize_s:.1f} + {tune_s:.1f}", ratio(eager_ms, ours_ms),
            ratio(comp_ms, ours_ms), ratio(comp_ms, graphs_ms), f"{err.max_rel_error:.1e}"), opt


def main(args: argparse.Namespace) -> int:
    keys, batches = selection("kernels.py", args.models, args.batches, args.smoke)
    sections = [f"Conditions: {conditions(args)}"]
    print(sections[0], flush=True)

    model_rows, region_rows = [], []
    for key in keys:
        for batch in batches:
            row, opt = bench_denoiser(key, batch, args)
            model_rows.append(row)
            print("denoiser:", " | ".join(row), flush=True)
            region_rows += bench_regions(row[0], opt, batch, args)
            del opt
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    family_rows = bench_attention_family(args)

    sections.append("### Denoiser latency (ms per call)\n\n" + table(
        ("model", "batch", "eager ms", "torch.compile ms", "compile s", "graphopt ms", "graphopt + CUDA graphs ms",
         "optimize + tune s", "vs eager", "vs compile", "CUDA graphs vs compile", "max rel err"),
        [tuple(c if i not in (2, 3, 5, 6) else _ms(c) for i, c in enumerate(r)) for r in model_rows]))
    sections.append("### Generated kernels (us per launch, cold L2)\n\n" + table(
        ("model", "batch", "kernel", "ops", "shape", "graphopt us", "eager us", "compile us", "vs eager",
         "vs compile", "GB/s", "% peak", "max rel err"), region_rows))
    sections.append("### Attention family (us per launch, cold L2)\n\n" + table(
        ("kernel", "tokens", "shape", "graphopt us", "baseline us", "speedup", "max rel err"), family_rows))
    text = "\n\n".join(sections)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.markdown}")
    return 0


def _ms(us_text: str) -> str:
    return f"{float(us_text) / 1e3:.2f}" if us_text != "-" else "-"


if __name__ == "__main__":
    sys.exit(main(ARGS))
