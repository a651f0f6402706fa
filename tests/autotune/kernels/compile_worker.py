"""Compile recorded kernel launches for a GPU target with whatever Triton this interpreter has.

The half of :mod:`tests.autotune.kernels.compile_check` that needs nothing but Triton and the standard
library, so that it runs in a throwaway environment holding only another Triton release (the one an
older supported torch pins) next to the project's own. It reads a manifest of launches that
``compile_check`` recorded (each kernel's module source, signature, constexprs and launch options),
loads every ``@triton.jit`` function from its source and compiles each launch through Triton's whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin)::

    python tests/autotune/kernels/compile_worker.py MANIFEST.json --arch 90 --out RESULTS.json

Each result is ``{"index", "ok", "shared", "error"}`` in the manifest's order. Not imported by the test
suite; run as a file, since the environment it runs in may lack graphopt and torch.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def is_jit(node: ast.FunctionDef) -> bool:
    """Decorated with ``triton.jit`` (plain or called with options)."""
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def kernel_source(source: str) -> str:
    """The part of a kernel module that its ``@triton.jit`` functions need, runnable without torch.

    Keeps ``__future__`` imports, imports of ``triton``/``math``, module constants (literals or
    ``tl.constexpr(...)``) and the jit functions, in their order; drops launchers and everything they
    import (torch, graphopt). A jit function cannot call a launcher, so nothing it needs is lost.
    """
    lines = source.splitlines()
    keep: list[str] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            wanted = node.module == "__future__" or (node.level == 0 and (node.module or "").split(".")[0] in
                                                     ("triton", "math"))
        elif isinstance(node, ast.Import):
            wanted = all(alias.name.split(".")[0] in ("triton", "math") for alias in node.names)
        elif isinstance(node, ast.Assign):
            value = node.value
            wanted = isinstance(value, ast.Constant) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and value.func.attr == "constexpr")
        elif isinstance(node, ast.FunctionDef):
            wanted = is_jit(node)
        else:
            wanted = False
        if wanted:
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            keep.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n\n".join(keep) + "\n"


def load_modules(sources: dict[str, str], directory: Path) -> dict[str, ModuleType]:
    """Import each kernel source from a file (Triton reads a jit function's source with ``inspect``)."""
    modules = {}
    for i, (key, source) in enumerate(sorted(sources.items())):
        path = directory / f"kernels_{i}.py"
        path.write_text(kernel_source(source))
        spec = importlib.util.spec_from_file_location(f"compile_worker_kernels_{i}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[key] = module
    return modules


def compile_launches(manifest: dict[str, Any], arch: int) -> list[dict[str, Any]]:
    """Compile every launch of ``manifest`` for ``sm_{arch}``; one result per launch, failures included."""
    target = GPUTarget("cuda", arch, 32)
    results = []
    with tempfile.TemporaryDirectory(prefix="graphopt-compile-") as tmp:
        modules = load_modules(manifest["sources"], Path(tmp))
        for index, launch in enumerate(manifest["launches"]):
            fn = getattr(modules[launch["module"]], launch["kernel"])
            src = ASTSource(fn, launch["signature"], launch["constexprs"])
            try:
                compiled = triton.compile(src, target=target, options=launch["options"])
            except Exception as e:  # noqa: BLE001 - report every failing variant, not the first
                results.append({"index": index, "ok": False, "shared": None,
                                "error": f"{type(e).__name__}: {reason(e)}"})
                continue
            results.append({"index": index, "ok": True, "shared": compiled.metadata.shared, "error": None})
    return results


def reason(error: Exception) -> str:
    """The message of a compile error without Triton's source excerpt: its last non-empty line says why."""
    text = [line for line in str(error).splitlines() if line.strip()]
    return text[-1].strip() if text else ""


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(None if argv is None else list(argv))
    results = compile_launches(json.loads(ns.manifest.read_text()), ns.arch)
    ns.out.write_text(json.dumps({"triton": triton.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
