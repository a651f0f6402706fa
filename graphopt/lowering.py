"""The lowering check: a captured graph lowered onto Triton kernels and checked before it is handed out.

Where it belongs: called by :class:`~graphopt.emit.OptimizedModule` for each variant of a
target="cuda" module (at ``optimize`` time, on re-capture, when a saved model is loaded for CUDA).
:func:`graphopt.autotune.lower.lower` builds the call sites, :mod:`graphopt.autotune.check` runs
them against the ATen ops they replace; the module then calls the lowered graph through
:class:`graphopt.autotune.runtime.Runtime`.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch
from torch import fx

from .capture import CapturedGraph
from .errors import UsageError, VerificationError, first_line
from .fxgraph import refresh_values


def check_cuda_target() -> None:
    """target="cuda" needs a CUDA device, or Triton's interpreter asked for, and Triton installed."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("target='cuda' but torch sees no CUDA device (set TRITON_INTERPRET=1 to run the "
                         "generated kernels in Triton's interpreter on the CPU, for testing)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UsageError("target='cuda' generates Triton kernels and Triton is not installed: "
                         "pip install 'graphopt[triton]'") from None


def lower_captured(captured: CapturedGraph) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Lower a captured graph onto kernels and check it on the example inputs; (module, report JSON).

    Every kernel is compared with the ATen ops it replaces on the same inputs, then the whole graph
    with the original model's outputs, each held to the dtype's bound, or in fp16/bf16 beyond it to
    the rule of :func:`graphopt.verify.compare_precise` (an fp32 run of the ATen ops as referee);
    failing either raises :class:`VerificationError` naming the kernel and where it came from. The
    report states the bound applied.
    """
    from graphopt.autotune.lower import LoweringReport, check_regions, lower

    from .verify import compare_precise, precise_run

    start = time.perf_counter()
    try:  # kernels index their operands by the values' strides: a pass may have left them stale
        refresh_values(captured.graph_module)
    except Exception as e:  # noqa: BLE001 - an op without a fake kernel, say: the recorded values stay
        warnings.warn(f"graphopt: could not recompute the graph's layouts before lowering ({type(e).__name__}: "
                      f"{first_line(e)}); a kernel whose operands are laid out otherwise than recorded runs its "
                      "eager fallback", stacklevel=2)
    result = lower(captured.graph_module)
    outputs, errors = check_regions(result.graph_module, captured.example_inputs)
    for region in result.regions:
        if region.name in errors and not errors[region.name].within:
            where = f" ({', '.join(region.modules)})" if region.modules else ""
            raise VerificationError(f"kernel {region.kernel} for {' '.join(region.ops)}{where} differs from the ATen "
                                    f"ops it replaces: {errors[region.name].line()}")
    cmp = compare_precise(outputs, captured.reference_outputs,
                          lambda: precise_run(captured.graph_module, captured.example_inputs))
    if not cmp.within:
        raise VerificationError(f"the lowered graph differs from the original model: {cmp.line()}")
    nodes = sum(len(r.ops) for r in result.regions)
    on_aten = tuple(r.name for r in result.regions
                    if result.graph_module.get_submodule(f"graphopt_kernels.{r.name}").runs_aten())
    report = LoweringReport(result.regions, len(result.library), nodes, result.left_on_aten,
                            result.declined, cmp.max_abs_error, cmp.max_rel_error, time.perf_counter() - start,
                            str(result.library.directory) if result.library.dumped else None, result.unfused,
                            cmp.tolerance, on_aten)
    return result.graph_module, report.to_json()
