"""The compile check's worker loads every hand-written kernel from its source alone, without torch or graphopt.

Compiling itself needs minutes and no interpreter (``python -m tests.autotune.kernels.compile_check``);
this checks the part that lets it run under another Triton release: the source each kernel is rebuilt
from.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.autotune.kernels.compile_check import OPS  # noqa: E402
from tests.autotune.kernels.compile_worker import is_jit, kernel_source, load_modules  # noqa: E402


@pytest.mark.parametrize("op", OPS)
def test_kernel_source_keeps_every_jit_function_and_no_torch(op, tmp_path: Path):
    source = inspect.getsource(importlib.import_module(f"graphopt.autotune.kernels.{op}"))
    jit = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and is_jit(node)}
    extracted = ast.parse(kernel_source(source)).body
    imported = {alias.name.split(".")[0] for node in extracted if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in extracted if isinstance(node, ast.ImportFrom)}
    assert jit and imported <= {"__future__", "triton", "math"}
    module = load_modules({op: source}, tmp_path)[op]
    assert all(hasattr(module, name) for name in jit)
