"""Compile every kernel variant the launchers launch, for a GPU target, on a machine without a GPU.

The interpreter tests check the kernels' arithmetic, not that they compile: the interpreter accepts
code the GPU compiler rejects (a ``tl.dot`` tile under 16, a dynamic ``if`` the code generator cannot
type, operands of two dtypes that a newer Triton's type promotion happens to reconcile) and ignores
resource limits. This script calls each launcher with small CPU tensors, records the launches instead
of running them, and compiles each distinct one through Triton's whole pipeline (TTIR -> TTGIR -> LLVM
-> PTX -> ptxas cubin) for the target, reporting failures and shared memory. It needs no GPU and no
CUDA driver, only the ptxas that ships with Triton; not a pytest module, because compiling every
config of every kernel in three dtypes takes minutes on a cold cache::

    python -m tests.autotune.kernels.compile_check [--arch 90] [--dtypes fp32 bf16] [--default-only]
    python -m tests.autotune.kernels.compile_check --triton 3.6.0 installed   # every pinned Triton

It also compiles every kernel that lowering generates for the reference generators (dit-digits,
unet-digits), the test zoo's text-conditioned UNet and batch-branches' per-block conditioning, each
optimized with the default exact pipeline as ``graphopt.optimize`` leaves it, in each dtype, with
every config of its family (``--no-generated`` skips them).

``--triton`` compiles the same launches with other Triton releases, e.g. the one an older supported
torch pins (``PINNED_TRITON``), each in a virtual environment under ``--venv-root`` that holds only
that Triton (created with pip on first use, then reused): the launches are recorded here, with this
torch, and :mod:`tests.autotune.kernels.compile_worker` compiles them there, from the kernels' sources.
A summary table then gives, per Triton version, kernel and dtype, how many variants compiled.

Run it without ``TRITON_INTERPRET`` (the kernels must be decorated for the GPU).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from triton.runtime.jit import JITFunction

import graphopt
from tests.autotune.kernels import compile_worker

OPS = ("layernorm", "groupnorm", "rmsnorm", "attention", "linear_attention", "dynamic_dwconv")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block, opt-in
# the Triton each supported torch pins (its wheel's requirement on Linux x86_64); "installed" is this one
PINNED_TRITON = {"2.11": "3.6.0", "2.13": "3.9.0"}
WORKER = Path(compile_worker.__file__)


def calls(dtype: torch.dtype):
    """(op, launcher call taking a config): every flag combination the kernels specialise on."""
    from graphopt.autotune import kernels as k

    dwconv = importlib.import_module("graphopt.autotune.kernels.dynamic_dwconv")
    x, w, ada = torch.randn(2, 5, 72, dtype=dtype), torch.randn(72), torch.randn(2, 144, dtype=dtype)
    xg, wg = torch.randn(2, 8, 5, 7, dtype=dtype), torch.randn(8)
    q = torch.randn(2, 3, 40, 72, dtype=dtype)  # D = 72 (DiT-XL) pads to 128
    q288 = torch.randn(1, 2, 40, 288, dtype=dtype)  # LiT's few-head width
    grid = torch.randn(1, 2, 64, 72, dtype=dtype)  # an 8 x 8 token grid for LiT's depthwise-conv branch
    dwc_w, dwc_b = torch.randn(144, 1, 5, 5, dtype=dtype), torch.randn(144, dtype=dtype)
    level = torch.arange(40) // 7
    v, kern = torch.randn(2, 8, 16, 16, dtype=dtype), torch.randn(2, 8, 3, 3, dtype=dtype)
    yield "layernorm", lambda c: k.layernorm(x, w, w, scale=ada[:, :72], shift=ada[:, 72:], config=c)
    yield "layernorm", lambda c: k.layernorm(x, config=c)
    yield "groupnorm", lambda c: k.groupnorm(xg, 4, wg, wg, silu=True, config=c)
    yield "rmsnorm", lambda c: k.rmsnorm(x, w, config=c)
    yield "attention", lambda c: k.attention(q, q, q, config=c)
    yield "attention", lambda c: k.attention(q, q, q, level=level, config=c)
    yield "linear_attention", lambda c: k.linear_attention(q288, q288, q288, config=c)
    yield "linear_attention", lambda c: k.linear_attention(grid, grid, grid, dwc_weight=dwc_w, dwc_bias=dwc_b, config=c)
    yield "linear_attention", lambda c: k.linear_attention(grid, grid, grid, dwc_weight=dwc_w, config=c)
    yield "dynamic_dwconv", lambda c: k.dynamic_dwconv(v, kern, config=c)
    # ATConv's kernel generation fused into the convolution: routed values read through a transpose
    generated = (v, torch.randn(2, 9, 8, dtype=dtype).transpose(1, 2), torch.randn(9, 9, dtype=dtype),
                 torch.randn(9, dtype=dtype), torch.rand(1, 8, 1, 1, dtype=dtype))
    yield "dynamic_dwconv", lambda c: dwconv.generated_dwconv_plan(*generated, config=c).run(generated)


def generated_calls(dtype: torch.dtype):
    """(kernel name, call taking a config) for every distinct generated kernel of the models above."""
    from graphopt.autotune.gemm import GemmRegion, template_configs
    from graphopt.autotune.kernels import _launch
    from graphopt.autotune.lower import FusedRegion, TuningOptions, call_sites, lower
    from graphopt.fxgraph import refresh_values
    from graphopt.models import load

    from tests import zoo

    models = [(ref.model, ref.example_inputs, {}) for ref in map(load, ("dit-digits", "unet-digits"))]
    models.append(zoo.text_unet())  # cross-attention keys and values merged across layers: 3-D column blocks
    models.append(zoo.per_block_conditioning())  # per-block conditioning batched: (blocks, batch, width) domains
    for model, examples, kwargs in models:
        model = copy.deepcopy(model).to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in examples)
        kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
        # the graph as optimize leaves it (the default exact pipeline changes what lowering generates),
        # its values recomputed as lowering does
        captured = graphopt.optimize(model, inputs, kwargs).captured
        refresh_values(captured.graph_module)
        # lowered as for a GPU (the interpreter's bf16 limits do not apply to what is compiled here)
        with mock.patch.object(_launch, "is_compiled", lambda kernel: True):
            lowered = lower(captured.graph_module, options=TuningOptions(cache=None)).graph_module
        sites: dict[str, tuple] = {}
        # the regions' real inputs; compiled kernels cannot run here, so downstream gets the eager values
        for module, args in call_sites(lowered, captured.example_inputs, run_kernels=False):
            if isinstance(module, (FusedRegion, GemmRegion)):
                sites.setdefault(module.kernel_name, (module, args))
        for kernel, (module, args) in sites.items():
            launch = (lambda m, a: lambda c: m.launch(c, *a))(module, args)
            if isinstance(module, GemmRegion):  # the matmul template, and cuBLAS + the epilogue kernel
                yield kernel, template_configs, launch
                yield module.epilogue.kernel_name, module.epilogue.configs, launch
            else:
                yield kernel, module.configs, launch


def signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, options) for one recorded launch."""
    # positional arguments first, the constexprs by keyword
    bound = dict(zip(fn.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    sig, constexprs = {}, {}
    for param in fn.params:
        name = param.name
        value = bound[name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = POINTER[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    return sig, constexprs, options


def record(dtypes: list[str], default_only: bool, generated: bool, match: str = "") -> dict[str, Any]:
    """The manifest of every distinct launch: kernel module sources and, per launch, what Triton compiles.

    Launchers run on CPU tensors with ``JITFunction.run`` replaced by a recorder, so nothing is launched.
    """
    from graphopt.autotune.kernels import _launch
    from graphopt.autotune.configs import is_aten

    launches: list[tuple[JITFunction, tuple, dict]] = []
    recorded: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    seen: set[tuple] = set()

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append((self, args, kwargs))

    # let the launchers take CPU tensors, and record their launches
    with mock.patch.object(_launch, "is_compiled", lambda kernel: False), mock.patch.object(JITFunction, "run", run):
        for name in dtypes:
            dtype = DTYPES[name]
            work = [(op, importlib.import_module(f"graphopt.autotune.kernels.{op}").configs, call)
                    for op, call in calls(dtype)]
            if generated:
                work += list(generated_calls(dtype))
            for op, configs, call in work:
                if match not in op:
                    continue
                family = [c for c in configs() if not is_aten(c)]
                for config in family[:1] if default_only else family:
                    launches.clear()
                    call(config)
                    for fn, args, kwargs in launches:
                        sig, constexprs, options = signature(fn, args, kwargs)
                        key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                               repr(sorted(options.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        source = Path(inspect.getsourcefile(fn.fn)).read_text()
                        module = f"{fn.fn.__module__}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
                        sources[module] = source
                        recorded.append({"op": op, "kernel": fn.__name__, "module": module, "dtype": name,
                                         "config": dict(config), "signature": sig, "constexprs": constexprs,
                                         "options": options})
    json.dumps(recorded)  # every constexpr must survive the trip to another interpreter
    return {"sources": sources, "launches": recorded}


def venv_python(version: str, root: Path) -> Path:
    """The interpreter of ``root/triton-VERSION``, a virtual environment holding only that Triton.

    Created with this interpreter's venv and pip on first use (Triton pinned exactly, no torch), reused
    while it still imports that version.
    """
    venv = root / f"triton-{version}"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import triton; print(triton.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == version:
        return python
    print(f"creating {venv} with triton=={version}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"triton=={version}"], check=True)
    return python


def compile_with(version: str, manifest: dict[str, Any], arch: int, venv_root: Path) -> tuple[str, list[dict]]:
    """(Triton version, per-launch results): in this process for "installed", else in that version's venv."""
    if version in ("installed", triton.__version__):
        return triton.__version__, compile_worker.compile_launches(manifest, arch)
    python = venv_python(version, venv_root)
    with tempfile.TemporaryDirectory(prefix="graphopt-compile-check-") as tmp:
        manifest_path, out = Path(tmp) / "manifest.json", Path(tmp) / "results.json"
        manifest_path.write_text(json.dumps(manifest))
        subprocess.run([str(python), str(WORKER), str(manifest_path), "--arch", str(arch), "--out", str(out)],
                       check=True)
        answer = json.loads(out.read_text())
    return answer["triton"], answer["results"]


def report(version: str, manifest: dict[str, Any], results: list[dict], arch: int,
           verbose: bool) -> dict[tuple[str, str], tuple[int, int]]:
    """Print failures (and with ``verbose`` every variant); return (kernel, dtype) -> (compiled, variants)."""
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    for launch, result in zip(manifest["launches"], results, strict=True):
        key = (launch["kernel"], launch["dtype"])
        ok, total = counts.get(key, (0, 0))
        counts[key] = (ok + result["ok"], total + 1)
        where = f"triton {version} {launch['kernel']} {launch['dtype']} {launch['config']}"
        if not result["ok"]:
            print(f"FAIL {where}: {result['error']}")
        elif verbose:
            over = " OVER THE SHARED-MEMORY LIMIT" if result["shared"] > SHARED_LIMIT.get(arch, 1 << 30) else ""
            print(f"ok   {where} shared={result['shared']}{over}")
    return counts


def summary(tables: dict[str, dict[tuple[str, str], tuple[int, int]]], dtypes: list[str]) -> str:
    """Per kernel and Triton version, compiled/variants in each dtype ("ok" when all compiled)."""
    def cell(counts: dict[tuple[str, str], tuple[int, int]], kernel: str, dtype: str) -> str:
        ok, total = counts.get((kernel, dtype), (0, 0))
        return "-" if total == 0 else "ok" if ok == total else f"FAIL {total - ok}/{total}"

    kernels = sorted({kernel for counts in tables.values() for kernel, _ in counts})
    header = ["kernel", "triton", *dtypes]
    rows = [[kernel, version, *(cell(counts, kernel, d) for d in dtypes)]
            for kernel in kernels for version, counts in tables.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, 80: A100)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--default-only", action="store_true", help="only each family's first config")
    parser.add_argument("--no-generated", action="store_true", help="skip the kernels lowering generates")
    parser.add_argument("--match", default="", metavar="TEXT",
                        help="only kernels whose name contains TEXT (e.g. gemm_ for the matmul templates)")
    parser.add_argument("--triton", nargs="+", default=["installed"], metavar="VERSION",
                        help="Triton releases to compile with: 'installed' (this one) or a version, e.g. "
                             f"{' '.join(sorted(set(PINNED_TRITON.values())))} (pinned by torch "
                             f"{', '.join(PINNED_TRITON)})")
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()) / "graphopt-triton",
                        help="where the other Triton releases' virtual environments live")
    parser.add_argument("--verbose", action="store_true", help="print every compiled variant, not only failures")
    ns = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be decorated for the GPU")

    start = time.perf_counter()
    manifest = record(ns.dtypes, ns.default_only, not ns.no_generated, ns.match)
    tables, failures = {}, 0
    for requested in ns.triton:
        version, results = compile_with(requested, manifest, ns.arch, ns.venv_root)
        tables[version] = report(version, manifest, results, ns.arch, ns.verbose)
        failed = sum(not r["ok"] for r in results)
        failures += failed
        print(f"triton {version}: {len(results)} variants for sm_{ns.arch}, {failed} failed", flush=True)
    print(summary(tables, ns.dtypes))
    print(f"{time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
