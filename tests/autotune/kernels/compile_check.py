"""Compile every kernel variant the launchers launch, for a GPU target, on a machine without a GPU.

The interpreter tests check the kernels' arithmetic, not that they compile: the interpreter accepts
code the GPU compiler rejects (a ``tl.dot`` tile under 16, a dynamic ``if`` the code generator cannot
type) and ignores resource limits. This script calls each launcher with small CPU tensors, records the
launches instead of running them, and compiles each distinct one through Triton's whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the target, reporting failures and shared memory.
It needs no GPU and no CUDA driver, only the ptxas that ships with Triton; not a pytest module, because
compiling every config of every kernel in three dtypes takes minutes on a cold cache::

    python -m tests.autotune.kernels.compile_check [--arch 90] [--dtypes fp32 bf16] [--default-only]

It also compiles every kernel that lowering generates for the reference generators (dit-digits,
unet-digits) in each dtype, with every config of its family (``--no-generated`` skips them).

Run it without ``TRITON_INTERPRET`` (the kernels must be decorated for the GPU).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

OPS = ("layernorm", "groupnorm", "rmsnorm", "attention", "linear_attention", "dynamic_dwconv")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block, opt-in


def calls(dtype: torch.dtype):
    """(op, launcher call taking a config): every flag combination the kernels specialise on."""
    from graphopt.autotune import kernels as k

    x, w, ada = torch.randn(2, 5, 72, dtype=dtype), torch.randn(72), torch.randn(2, 144, dtype=dtype)
    xg, wg = torch.randn(2, 8, 5, 7, dtype=dtype), torch.randn(8)
    q = torch.randn(2, 3, 40, 72, dtype=dtype)  # D = 72 (DiT-XL) pads to 128
    q288 = torch.randn(1, 2, 40, 288, dtype=dtype)  # LiT's few-head width
    level = torch.arange(40) // 7
    v, kern = torch.randn(2, 8, 16, 16, dtype=dtype), torch.randn(2, 8, 3, 3, dtype=dtype)
    yield "layernorm", lambda c: k.layernorm(x, w, w, scale=ada[:, :72], shift=ada[:, 72:], config=c)
    yield "layernorm", lambda c: k.layernorm(x, config=c)
    yield "groupnorm", lambda c: k.groupnorm(xg, 4, wg, wg, silu=True, config=c)
    yield "rmsnorm", lambda c: k.rmsnorm(x, w, config=c)
    yield "attention", lambda c: k.attention(q, q, q, config=c)
    yield "attention", lambda c: k.attention(q, q, q, level=level, config=c)
    yield "linear_attention", lambda c: k.linear_attention(q288, q288, q288, config=c)
    yield "dynamic_dwconv", lambda c: k.dynamic_dwconv(v, kern, config=c)


def generated_calls(dtype: torch.dtype):
    """(kernel name, call taking a config) for every distinct generated kernel of the reference models."""
    from graphopt.autotune.lower import FusedRegion, TuningOptions, call_sites, lower
    from graphopt.capture import capture
    from graphopt.models import load

    for name in ("dit-digits", "unet-digits"):
        ref = load(name)
        model = ref.model.to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in ref.example_inputs)
        captured = capture(model, inputs)
        lowered = lower(captured.graph_module, options=TuningOptions(cache=None)).graph_module
        sites: dict[str, tuple] = {}
        # the regions' real inputs; compiled kernels cannot run here, so downstream gets the eager values
        for module, args in call_sites(lowered, captured.example_inputs, run_kernels=False):
            if isinstance(module, FusedRegion):
                sites.setdefault(module.kernel_name, (module, args))
        for kernel, (module, args) in sites.items():
            yield kernel, module.configs, (lambda m, a: lambda c: m.launch(c, *a))(module, args)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, 80: A100)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--default-only", action="store_true", help="only each family's first config")
    parser.add_argument("--no-generated", action="store_true", help="skip the kernels lowering generates")
    ns = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be decorated for the GPU")

    from graphopt.autotune.kernels import _launch
    from graphopt.autotune.lower import is_aten

    _launch.is_compiled = lambda kernel: False  # let the launchers take CPU tensors: nothing is launched
    launches: list[tuple[JITFunction, tuple, dict]] = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))

    target, seen, failures, start = GPUTarget("cuda", ns.arch, 32), set(), 0, time.perf_counter()
    for dtype in (DTYPES[d] for d in ns.dtypes):
        work = [(op, importlib.import_module(f"graphopt.autotune.kernels.{op}").configs, call)
                for op, call in calls(dtype)]
        if not ns.no_generated:
            work += list(generated_calls(dtype))
        for _, configs, call in work:
            family = [c for c in configs() if not is_aten(c)]
            for config in family[:1] if ns.default_only else family:
                launches.clear()
                call(config)
                for fn, args, kwargs in launches:
                    sig, constexprs, options = signature(fn, args, kwargs)
                    key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                           repr(sorted(options.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        compiled = triton.compile(ASTSource(fn, sig, constexprs), target=target, options=options)
                    except Exception as e:  # noqa: BLE001 - report every failing variant, not the first
                        failures += 1
                        print(f"FAIL {fn.__name__} {dtype} {dict(config)}: {type(e).__name__}: {e}")
                        continue
                    shared = compiled.metadata.shared
                    note = " OVER THE SHARED-MEMORY LIMIT" if shared > SHARED_LIMIT.get(ns.arch, 1 << 30) else ""
                    print(f"ok   {fn.__name__} {str(dtype)[6:]} {dict(config)} shared={shared}{note}")
    print(f"{len(seen)} variants for sm_{ns.arch}, {failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
