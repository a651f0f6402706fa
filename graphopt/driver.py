"""The optimize driver: ``graphopt.optimize(model, args)`` from a model to an :class:`~graphopt.emit.OptimizedModule`.

Where it belongs: the entry point of the flow, top to bottom: check the model
is in inference mode, capture (:mod:`graphopt.capture`), run the exact passes (:mod:`graphopt.pipeline`),
then the approximate ones (:mod:`graphopt.approx`), and emit; target="cuda" lowers the result
(:mod:`graphopt.lowering`), ``compile=True`` compiles it for the CPU (:mod:`graphopt.compiled`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from . import cudagraphs, structure
from .capture import _batch_size, capture, kept_state, training_modules
from .emit import OptimizedModule, _checked_batch_one
from .errors import UsageError
from .lowering import check_cuda_target
from .pipeline import Pass, run_pipeline
from .report import OptimizationReport

TARGETS = ("cpu", "cuda")


def optimize(model: nn.Module, args: Any = (), kwargs: dict[str, Any] | None = None,
             passes: Iterable[str | Any] | None = None, target: str = "cpu",
             dynamic_batch: bool = True, cuda_graphs: bool | None = None, approx: Any = None,
             eval_mode: bool = False, compile: bool = False) -> OptimizedModule:
    """Capture ``model`` on the example inputs, run ``passes`` (default: the exact pipeline) and emit.

    ``passes`` are names from :mod:`graphopt.passes` or :class:`Pass` objects. Each exact pass is
    verified against the original model's outputs; the report records FLOPs, errors and times.

    ``target="cuda"`` captures on the GPU (a copy of the model when it is elsewhere) and lowers the
    graph (see :mod:`graphopt.autotune.lower`): pointwise chains and norms with their epilogues run as
    generated Triton kernels (a lone pointwise op keeps its ATen op until tuning finds its kernel
    faster: nothing to fuse); graphopt's own attention-family ops on their hand-written kernels; softmax
    attention on PyTorch's SDPA until tuning finds the flash kernel faster; a linear whose output only a
    pointwise chain reads joins it as one call site (cuBLAS then the chain's kernel, or for a one-op
    chain its ATen ops, until tuning finds the fused Triton matmul template faster); other matmuls and
    convolutions stay on ATen. Each kernel is checked against the ATen ops it replaces on the example
    inputs, within the dtype's bound (in fp16/bf16, or no further than twice eager's own error from an
    fp32 run; see :func:`graphopt.verify.compare_precise`). Call sites use the configs ``graphopt
    autotune`` stored for this GPU, else their untuned defaults.
    Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on the CPU instead (slow;
    for testing). With ``target="cuda"`` on a GPU each call is replayed as a CUDA graph recorded per
    input layout (:mod:`graphopt.cudagraphs`), which removes the launch overhead that dominates at
    small batch; a layout whose recording fails launches directly, with a warning.
    ``cuda_graphs=False`` turns this off (default None: on for target "cuda" on a GPU); ``True``
    without a GPU is an error. :class:`graphopt.SamplerGraph` records a whole sampling loop instead.

    Approximate passes (``skip-tune``) run after the exact ones through the approximate layer
    (:mod:`graphopt.approx`) and need ``approx``, an :class:`~graphopt.approx.ApproxContext` with the
    sampler, quality evaluator and budget; each runs once, and its report row carries the quality
    it cost, measured.

    ``compile=True`` (target "cpu") hands the optimized graph to Inductor's CPU backend ahead of time
    (:mod:`graphopt.compiled`): C++ code for this CPU, checked against the original outputs, saved
    with the module so a loaded one starts warm; the report gives the compile time.

    ``model`` is never changed (its weights, buffers, training flags and device stay as they are). A
    model in training mode (dropout or batch statistics active) is refused, since its outputs are
    not those of inference: call ``model.eval()`` first, or pass ``eval_mode=True`` to optimize it
    as in eval mode while it stays in training mode.
    """
    from . import passes as registry

    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    pipeline, approximate = split_passes(registry.resolve(passes))
    if approximate and approx is None:
        raise UsageError(f"approximate pass(es) {', '.join(p.name for p in approximate)} need a sampler and a "
                         "quality evaluator: pass approx=graphopt.ApproxContext(...)")
    cuda_graphs = cudagraphs.resolve(cuda_graphs, target)
    if compile and target != "cpu":
        raise UsageError("compile=True builds the CPU program with Inductor; target='cuda' lowers onto Triton "
                         "kernels instead")
    check_inference_mode(model, eval_mode)
    if target == "cuda":
        check_cuda_target()
        if torch.cuda.is_available():
            if any(t.device.type != "cuda" for t in itertools.chain(model.parameters(), model.buffers())):
                model = copy.deepcopy(model).to("cuda")  # the user's model stays where it is
            args, kwargs = _to_device((args, kwargs or {}), "cuda")
    with kept_state(model, eval_mode=eval_mode):
        module = _optimize(model, args, kwargs, pipeline, approximate, target, dynamic_batch, cuda_graphs, approx,
                           eval_mode)
    if compile:
        module.compile()
    return module


def _optimize(model: nn.Module, args: Any, kwargs: dict[str, Any] | None, pipeline: tuple[Pass, ...],
              approximate: tuple[Any, ...], target: str, dynamic_batch: bool, cuda_graphs: bool, approx: Any,
              eval_mode: bool) -> OptimizedModule:
    from .analysis.cost import graph_cost
    from .analysis.graph import batch_symbol

    captured = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    batch = captured.example_inputs[0].shape[0] if captured.example_inputs[0].dim() else None

    def flops(gm: fx.GraphModule) -> float:  # at the example batch; a re-captured variant has its own symbol
        return float(graph_cost(gm, batch_symbol(gm)).at(batch or 1)[0])

    captured, reports = run_pipeline(captured, pipeline, flops=flops)
    captured = _checked_batch_one(model, captured)
    example_batch = _batch_size(structure.flatten((args, kwargs or {}))[1])
    if captured.dynamic_batch and (captured.guards.batch_range() or (1,))[0] > 1 and example_batch == 1:
        # the model treats batch 1 differently and the example is batch 1: the example's own batch comes first
        captured = capture(model, args, kwargs, dynamic_batch=False)
        captured, reports = run_pipeline(captured, pipeline, flops=flops)
    from .plan import fingerprint

    report = OptimizationReport(type(model).__name__, target, batch, captured.guards.batch_range(),
                                captured.capture_time_s, reports, fingerprint=fingerprint(model))
    module = OptimizedModule(captured, report, source=model, passes=pipeline, flops=flops, source_eval=eval_mode)
    if approximate:
        from .approx import run_approximate

        module = run_approximate(module, approximate, approx)
    if target == "cuda":
        # the canonical graph, after any approximate pass, with the report rows they added
        module._report = dataclasses.replace(module._report, lowering=module._lower_variant(module.captured),
                                             cuda_graphs=cuda_graphs)
        module._graph_runners = [] if cuda_graphs else None
    return module


def check_inference_mode(model: nn.Module, eval_mode: bool) -> None:
    """Refuse a model in training mode unless ``eval_mode`` asks to optimize it as in eval mode."""
    training = training_modules(model)
    if training and not eval_mode:
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise UsageError(f"{type(model).__name__} is in training mode ({shown}): its outputs are not those of "
                         "inference; call model.eval() first, or pass eval_mode=True (--eval) to optimize it as in "
                         "eval mode without changing it")


def split_passes(passes: Sequence[Any]) -> tuple[tuple[Pass, ...], tuple[Any, ...]]:
    """(exact pipeline, approximate passes): the approximate ones run last, after the exact passes
    they require (added when missing)."""
    from . import passes as registry
    from .approx import ApproxPass

    exact = [p for p in passes if not isinstance(p, ApproxPass)]
    approximate = [p for p in passes if isinstance(p, ApproxPass)]
    if approximate:
        first = min(i for i, p in enumerate(passes) if isinstance(p, ApproxPass))
        late = [p.name for p in passes[first:] if not isinstance(p, ApproxPass)]
        if late:
            raise UsageError(f"exact pass(es) {', '.join(late)} come after an approximate one: approximate passes "
                             "run once, after every exact pass")
        names = {p.name for p in exact}
        for p in approximate:
            for need in p.requires:
                if need not in names:
                    exact.append(registry.get(need))
                    names.add(need)
    return tuple(exact), tuple(approximate)


def _to_device(value: Any, device: str) -> Any:
    return structure.map_tensors(value, lambda t: t.to(device))
