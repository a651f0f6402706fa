"""ONNX export: torch.onnx's dynamo exporter, onnx.checker, then onnxruntime against torch.

The graph exported is the captured (and, for an OptimizedModule, optimized) flat-tensor graph, so
ONNX inputs and outputs are the model's tensor arguments and tensor outputs in order, named after
the forward parameters. The batch axis stays dynamic when it was captured dynamic, and parity is
checked at the example batch and at a second batch size. The file is written next to its target
under a temporary name and moved into place only after the checks pass. graphopt's own ops
(:mod:`graphopt.ops`) export through their translations in :func:`custom_translation_table`, as
standard ONNX ops that any onnxruntime runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import CapturedGraph, capture
from .errors import OnnxExportError, OnnxParityError, OutputPathError, UsageError, first_line, no_folder
from .logs import quiet
from .verify import Comparison, compare

# onnxruntime reorders reductions and fuses ops, so parity is looser than an exact pass's check.
ONNX_TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


@dataclasses.dataclass(frozen=True)
class OnnxReport:
    """What export_onnx wrote and measured."""

    path: str
    opset: int
    provider: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    export_time_s: float
    graph_optimized: bool = True
    """Whether onnxscript's graph optimizer ran on the file; it is left out when its result leaves the
    parity tolerance and the export without it holds (then :meth:`line` says so)."""

    def line(self) -> str:
        sizes = ",".join(map(str, self.batch_sizes))
        without = "" if self.graph_optimized else " (without onnxscript's graph optimizer: it changed the outputs)"
        return (f"ONNX parity ({self.provider}, batch {sizes}): max abs err {self.max_abs_error:.2e}, "
                f"max rel err {self.max_rel_error:.2e}{without} -> {self.path}")


def export_onnx(model: nn.Module, path: str | os.PathLike, args: Any = (), kwargs: dict[str, Any] | None = None,
                *, dynamic_batch: bool = True, opset: int | None = None, atol: float | None = None,
                rtol: float | None = None, overwrite: bool = True, plan: Any = None) -> OnnxReport:
    """Export an :class:`OptimizedModule` (or a plain nn.Module with example ``args``) to ONNX at ``path``.

    Inputs that passes added (``skip_scales``) are ONNX inputs too, after the model's own. With a
    :class:`~graphopt.plan.SamplingPlan`, it is written beside the file as ``<name>.plan.json``
    (checked against the module first): the levels and per-step skip scales to feed.

    Raises :class:`OutputPathError` before any work when ``path`` cannot be written,
    :class:`OnnxExportError` when export or the checker fails, :class:`OnnxParityError` when
    onnxruntime's outputs leave the tolerance; in every failure no file is left at ``path``.
    """
    from .emit import OptimizedModule, export_program

    target = Path(path)
    check_onnx_path(target, overwrite)
    if isinstance(model, OptimizedModule):
        captured = model.captured
    elif isinstance(model, nn.Module):
        if args == () and not kwargs:
            raise UsageError("export_onnx of a plain nn.Module needs example args")
        captured = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    else:
        raise UsageError(f"expected an nn.Module or OptimizedModule, got {type(model).__name__}")

    translations = custom_translation_table()
    untranslated = sorted({str(n.target).removesuffix(".default") for n in captured.graph_module.graph.nodes
                           if str(n.target).startswith("graphopt.") and n.target not in translations})
    if untranslated:
        raise OnnxExportError(f"the graph holds graphopt's own op(s) {', '.join(untranslated)}, which have no "
                              "ONNX translation yet; export the model before substituting them")
    if plan is not None and isinstance(model, OptimizedModule):
        plan.check(model)
    start = time.perf_counter()
    input_names = _unique(captured.call.input_names())
    # ONNX names are one namespace: an output called like an input (a denoiser's `sample`) gets `out_`
    output_names = _unique([f"out_{n}" if n in input_names else n for n in captured.call.output_names()])
    import onnx

    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp = workdir / target.name
        try:
            program = export_program(captured)
        except Exception as e:
            raise OnnxExportError(f"torch.onnx could not export the model ({type(e).__name__}: "
                                  f"{first_line(e)})") from e

        def write(optimize: bool) -> None:
            """Export to ``tmp`` (with onnxscript's graph optimizer when ``optimize``) and check the file."""
            try:
                with warnings.catch_warnings(), quiet():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(program, tuple(captured.example_inputs), dynamo=True, input_names=input_names,
                                      output_names=output_names, opset_version=opset, verbose=False,
                                      optimize=optimize, custom_translation_table=translations).save(str(tmp))
            except Exception as e:
                raise OnnxExportError(f"torch.onnx could not export the model ({type(e).__name__}: "
                                      f"{first_line(e)})") from e
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except Exception as e:
                hint = ("; export graphopt.optimize(model, args) instead: its noop pass removes ops that torch keeps "
                        "as identities and ONNX rejects (a squeeze of a dim that is not 1)"
                        if not isinstance(model, OptimizedModule) else "")
                raise OnnxExportError(f"onnx.checker rejected the exported model: {first_line(e)}{hint}") from e

        write(optimize=True)
        provider, cmp, sizes = _parity(tmp, captured, input_names, atol, rtol)
        graph_optimized = True
        if not cmp.within:
            # onnxscript's graph optimizer can change what the model computes (0.7 drops x + c for any
            # |c| < 1e-8 as an add of zero: an epsilon guarding a division): the export without it
            for item in workdir.iterdir():
                item.unlink()
            write(optimize=False)
            provider, plain, sizes = _parity(tmp, captured, input_names, atol, rtol)
            if not plain.within:
                raise OnnxParityError(f"onnxruntime ({provider}) disagrees with torch: {cmp.line()}; "
                                      f"without onnxscript's graph optimizer: {plain.line()}")
            cmp, graph_optimized = plain, False
        opset_used = _opset(tmp)
        if plan is not None:
            plan.save(workdir / plan_path(target).name)
        for item in workdir.iterdir():  # the model, any external-data file and the plan beside it
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return OnnxReport(str(target), opset_used, provider, tuple(input_names), tuple(output_names), sizes,
                      cmp.max_abs_error, cmp.max_rel_error, time.perf_counter() - start, graph_optimized)


def custom_translation_table() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """graphopt's own ops and their ONNX translations (standard ONNX ops, traced inline by torch.onnx).

    A graph holding a ``graphopt::`` op that is not a key here is refused before export.
    """
    from .ops import block_causal_attention_onnx, dynamic_dwconv_onnx, linear_attention_onnx

    return {torch.ops.graphopt.block_causal_attention.default: block_causal_attention_onnx,
            torch.ops.graphopt.dynamic_dwconv.default: dynamic_dwconv_onnx,
            torch.ops.graphopt.linear_attention.default: linear_attention_onnx}


def plan_path(onnx_path: str | os.PathLike) -> Path:
    """Where :func:`export_onnx` writes a plan: ``<name>.plan.json`` beside ``<name>.onnx``."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.plan.json")


def check_onnx_path(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise OutputPathError(f"cannot write ONNX to {target}: it is a directory")
    if target.exists() and not overwrite:
        raise OutputPathError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    if not target.parent.is_dir():
        raise no_folder(target, target.parent)
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {target}: no write permission in {target.parent}")


def _parity(path: Path, captured: CapturedGraph, names: list[str], atol: float | None,
            rtol: float | None) -> tuple[str, Comparison, tuple[int, ...]]:
    """Run onnxruntime at the example batch and (when dynamic) one more batch size; compare with torch."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:
        raise OnnxExportError(f"onnxruntime could not load the exported model: {first_line(e)}") from e
    provider = session.get_providers()[0]
    feeds = [(captured.example_inputs, captured.reference_outputs)]
    symbol = captured.batch_symbol()
    if symbol is not None:
        batch = int(captured.example_inputs[0].shape[0])
        lo, hi = captured.guards.ranges.get(symbol, (batch, None))
        other = batch + 1 if hi is None or batch + 1 <= hi else batch - 1
        if other >= lo and other != batch:
            symbols = captured.batch_symbols()
            grown = tuple(_resize_batch(t, g.shape, symbols, other)
                          for t, g in zip(captured.example_inputs, captured.guards.tensors))
            with torch.no_grad():
                feeds.append((grown, captured.run(grown)))
    results: list[Comparison] = []
    sizes = []
    for inputs, reference in feeds:
        try:
            outs = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})
        except Exception as e:
            raise OnnxExportError(f"onnxruntime failed to run the exported model: {first_line(e)}") from e
        a, r = ONNX_TOLERANCE.get(reference[0].dtype, (0.0, 0.0))
        results.append(compare([torch.from_numpy(o) for o in outs], reference,
                               atol=a if atol is None else atol, rtol=r if rtol is None else rtol))
        sizes.append(int(inputs[0].shape[0]) if inputs[0].dim() else 0)
    failed = [c for c in results if not c.within]
    worst = failed[0] if failed else max(results, key=lambda c: c.max_abs_error)
    return provider, worst, tuple(sizes)


def _resize_batch(t: torch.Tensor, shape: tuple, symbols: frozenset[str], size: int) -> torch.Tensor:
    if not shape or shape[0] not in symbols:
        return t
    reps = -(-size // t.shape[0])
    return torch.cat([t] * reps)[:size]


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out
