"""Per-call host overhead of a lowered model: the general path against the generated forward.

    python bench/runtime.py                       # on a CPU: Triton's interpreter, host overhead only
    python bench/runtime.py --models dit-s --batch 16 --dtype bf16   # on a GPU: also whole-call latency

A lowered model can be called two ways (:mod:`graphopt.autotune.runtime`): the general path (the
lowered ``fx.GraphModule``, each kernel call site an ``nn.Module`` that works out its layout, shape
bucket, config, output strides and launch arguments per call) and the generated forward (the same
graph written out as Python per input layout, all of that baked in). Both launch the same kernels
with the same configs and run the same ATen ops; what differs is the Python around them.

What is measured, in one run per model:

1. **Host overhead** (any machine): each Triton kernel's ``run`` (argument binding, its cache lookup
   and the launch itself, identical in both paths) is replaced by a function that returns at once, so
   a call costs graphopt's Python plus the ATen ops on the inputs' device (the generated forward here
   launches through ``kernel[grid]``, so that its launches are skipped too). Medians over rounds of
   calls, both paths interleaved; "saved per site" divides the difference by the number of kernel call
   sites. On a CPU the ATen ops are computed (small widths keep them cheap) and count in both paths.
2. **Whole-call latency** (CUDA only): the real kernels, ``torch.cuda.synchronize()`` after each
   round of calls, milliseconds per call; the generated forward twice, launching each kernel through
   its compiled launcher (the default on a GPU) and through ``kernel[grid]``.
3. **Launches** (any machine): every kernel launch of one call, alone, the two ways a generated
   forward can launch them: through ``kernel[grid]`` (Triton's ``JITFunction.run``: argument binding,
   specialisation key, cache lookup, launch hooks) and through the launchers they are bound to
   (:class:`graphopt.autotune.launches.LaunchBinder`), microseconds per call. On a GPU both launch the
   compiled kernels; on a CPU the installed Triton's ``JITFunction.run`` runs as written, with the
   current device, stream and target and the compiled kernels stood in for (their launchers return at
   once), so what is measured is the Python that direct launching removes.

On a CPU the models are the GPU benchmark's (same depth, so the same number of call sites) at a small
width and resolution; the kernels run in Triton's interpreter when lowering checks them and never in
the timed calls, and ATen runs on one thread (``--threads``): on a busy machine OpenMP's thread
barrier costs milliseconds per tiny op and would swamp what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

if __name__ == "__main__" and "--help" not in sys.argv and "-h" not in sys.argv:
    import torch  # noqa: E402 - decides whether Triton must be interpreted, before any kernel is decorated

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from _inputs import DENOISERS, DTYPES, denoiser, example_inputs, model_keys  # noqa: E402 - bench/, beside this script


@contextlib.contextmanager
def launches_skipped() -> Iterator[None]:
    """Every Triton kernel's ``run`` returns at once (compiled and interpreted kernels alike)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def skip(self: object, *args: object, **kwargs: object) -> None:
        return None

    with mock.patch.object(JITFunction, "run", skip), mock.patch.object(InterpretedFunction, "run", skip):
        yield


def interleaved(fns: dict[str, Callable[[], object]], calls: int, rounds: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Microseconds per call: the median over ``rounds`` of ``calls`` calls, the functions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def all_launches(gm: torch.fx.GraphModule, tensors: list[torch.Tensor], calls: int,
                 rounds: int) -> dict[str, object]:
    """Microseconds to launch every kernel a call of ``gm`` launches (as its generated forward does),
    through ``kernel[grid]`` and through the launchers they are bound to; nothing else of the call."""
    from triton.runtime.jit import JITFunction

    from graphopt.autotune.launches import KernelCall, LaunchBinder, Ref, triton_streams
    from graphopt.autotune.runtime import _Recorder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for the tests' stand-in GPU
    from tests.autotune.standin import FakeDevice, triton_on_a_stand_in_gpu

    class Keeping(LaunchBinder):
        """Also keeps each call, with its argument values by name."""

        def bind(self, call: KernelCall, args: list, compiled: object) -> None:
            super().bind(call, args, compiled)
            kept.append((call, list(args), {r.name: v for r, v in zip(call.args, args) if isinstance(r, Ref)}))

    cuda = torch.cuda.is_available()
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*tensors)
    compiled: dict[int, JITFunction] = {}  # on a CPU: each interpreted kernel as the compiled kernel it stands for

    def as_compiled(call: object) -> object:
        if cuda or not isinstance(call, KernelCall):
            return call
        kernel = compiled.setdefault(id(call.kernel), JITFunction(call.kernel.fn))
        return dataclasses.replace(call, kernel=kernel)

    kept: list[tuple[KernelCall, list, dict]] = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        # on a CPU: Triton's JITFunction.run as written, on a stand-in device whose launchers return at once
        streams = triton_streams() if cuda else stack.enter_context(
            triton_on_a_stand_in_gpu(FakeDevice(), lambda kernel: lambda *launch: None))
        binder = Keeping(streams)
        for site, planned, args in recorder.sites.values():
            if planned.plan is not None:
                plan = dataclasses.replace(planned.plan, calls=tuple(map(as_compiled, planned.plan.calls)))
                plan.run([args[i] for i in planned.inputs], binder)
        if not kept or None in binder.launches:
            raise SystemExit(f"{binder.launches.count(None)} of {len(kept)} launches could not be bound")
        stream = streams.stream(streams.device())
        jit = [(c.kernel[c.grid], values, dict(c.constexprs)) for c, values, _ in kept]
        direct = [(d.launcher, (*d.grid, stream, d.function, d.metadata, None, None, None,
                                *(named[a.name] if isinstance(a, Ref) else a for a in d.args)))
                  for d, (_, _, named) in zip(binder.launches, kept)]

        def through_jit() -> None:
            for run, values, constexprs in jit:
                run(*values, **constexprs)

        def through_launchers() -> None:
            for launcher, launch_args in direct:
                launcher(*launch_args)

        us = interleaved({"kernel[grid]": through_jit, "launcher": through_launchers}, calls, rounds,
                         torch.cuda.synchronize if cuda else lambda: None)
    return {"launches": len(kept), "kernels": len({id(c.kernel) for c, _, _ in kept}), "us": us}


def bench(key: str, args: argparse.Namespace) -> dict[str, object]:
    import graphopt
    from graphopt.autotune.runtime import Runtime
    from graphopt.autotune.sites import _Tuned

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", DTYPES[args.dtype]) if cuda else ("cpu", torch.float32)
    model, label = denoiser(key, "full" if cuda else "cpu")
    model = model.to(device=device, dtype=dtype)
    inputs = example_inputs(key, model, args.batch, device, dtype)
    opt = graphopt.optimize(model, inputs, target="cuda")
    _, tensors, _ = opt.captured.flatten_call(inputs, {})
    gm, runtime = opt.lowered[0], opt._runtimes[0]
    sites = sum(isinstance(m, _Tuned) for m in gm.modules())
    jit = Runtime(gm, direct_launch=False)  # its forward launches through kernel[grid], which can be skipped
    unplanned = Runtime(gm, direct_launch=False, reuse_buffers=False)  # a new buffer per allocation
    paths: dict[str, Callable[[], object]] = {"general": lambda: gm(*tensors), "generated": lambda: jit(tensors),
                                              "generated, no reuse": lambda: unplanned(tensors)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for fn in (*paths.values(), lambda: runtime(tensors)):  # forwards are written; kernels compile on a GPU
            fn()
        with launches_skipped():
            host = interleaved(paths, args.calls, args.rounds)
        whole, peak = None, None
        if cuda:  # the module's own forward launches through the compiled launchers
            whole = interleaved({"general": paths["general"], "generated": lambda: runtime(tensors),
                                 "generated, kernel[grid]": lambda: jit(tensors),
                                 "generated, no reuse": paths["generated, no reuse"]}, args.calls, args.rounds, sync)
            peak = {name: peak_bytes(fn) for name, fn in (("generated", lambda: jit(tensors)),
                                                          ("generated, no reuse", paths["generated, no reuse"]))}
    assert runtime.stats.generated == 1 and jit.stats.generated == 1, (runtime.stats, jit.stats)
    launch = all_launches(gm, tensors, args.calls, args.rounds)
    (forward,) = jit.forwards
    return {"label": label, "sites": sites, "host": host, "whole": whole, "launch": launch, "peak": peak,
            "buffers": forward.buffers}


def peak_bytes(fn: Callable[[], object]) -> int:
    """GPU memory one call allocates at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def conditions(args: argparse.Namespace) -> str:
    import triton

    where = (torch.cuda.get_device_name() if torch.cuda.is_available()
             else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Triton interpreter")
    dtype = args.dtype if torch.cuda.is_available() else f"fp32, {torch.get_num_threads()} ATen thread(s)"
    return (f"{where}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}; "
            f"batch {args.batch}, {dtype}; medians of {args.rounds} rounds x {args.calls} calls, paths interleaved")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dit-s,unet", help=f"comma-separated: {', '.join(DENOISERS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="on a GPU (a CPU runs fp32)")
    p.add_argument("--calls", type=int, default=50, help="calls per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="ATen threads on a CPU (default 1)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    keys = model_keys(args.models)

    print(conditions(args))
    print("host overhead per call: Triton's kernel launch (its run(): binding, cache lookup, launch) skipped in "
          "both paths; graphopt's Python and the ATen ops counted")
    rows = [("model", "sites", "general us", "generated us", "general / generated", "saved per site us",
             "whole call general ms", "whole call generated ms", "whole ratio", "generated, kernel[grid] ms")]
    reuse = [("model", "allocations (reused)", "no reuse us", "reuse us", "no reuse / reuse",
              "whole call ms no reuse / reuse", "peak MB no reuse / reuse")]
    launches = [("model", "launches (kernels)", "kernel[grid] us", "launchers us", "saved per launch us",
                 "kernel[grid] / launchers")]
    for key in keys:
        r = bench(key, args)
        host, whole, launch = r["host"], r["whole"], r["launch"]
        saved = (host["general"] - host["generated"]) / max(r["sites"], 1)
        rows.append((r["label"], str(r["sites"]), f"{host['general']:.0f}", f"{host['generated']:.0f}",
                     f"{host['general'] / host['generated']:.2f}x", f"{saved:.1f}",
                     f"{whole['general'] / 1e3:.3f}" if whole else "-", f"{whole['generated'] / 1e3:.3f}" if whole else "-",
                     f"{whole['general'] / whole['generated']:.2f}x" if whole else "- (no GPU)",
                     f"{whole['generated, kernel[grid]'] / 1e3:.3f}" if whole else "-"))
        buffers, peak = r["buffers"], r["peak"]
        reuse.append((r["label"], f"{buffers.allocations} ({buffers.reused})",
                      f"{host['generated, no reuse']:.0f}", f"{host['generated']:.0f}",
                      f"{host['generated, no reuse'] / host['generated']:.2f}x",
                      f"{whole['generated, no reuse'] / 1e3:.3f} / {whole['generated, kernel[grid]'] / 1e3:.3f}"
                      if whole else "- (no GPU)",
                      f"{peak['generated, no reuse'] / 2**20:.1f} / {peak['generated'] / 2**20:.1f}" if peak else "-"))
        us = launch["us"]
        n = launch["launches"]
        launches.append((r["label"], f"{n} ({launch['kernels']})", f"{us['kernel[grid]']:.0f}",
                         f"{us['launcher']:.0f}", f"{(us['kernel[grid]'] - us['launcher']) / n:.2f}",
                         f"{us['kernel[grid]'] / us['launcher']:.1f}x"))
    table(rows)
    print()
    gpu = "; whole call and peak memory on the GPU, through kernel[grid]" if torch.cuda.is_available() else ""
    print("buffer reuse in the generated forward (graphopt.autotune.buffers): dead buffers serve later allocations "
          f"of their size; host overhead as above, kernel[grid] launches skipped{gpu}")
    table(reuse)
    print()
    print("the kernel launches of one call alone, through kernel[grid] against the launchers they are bound to"
          + ("" if torch.cuda.is_available() else " (compiled kernels stood in for: their launchers return at once)"))
    table(launches)
    return 0


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
