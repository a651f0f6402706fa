"""Replay a lowered graph as a CUDA graph: one launch from the CPU for the whole denoiser call.

Where it belongs: the last step of ``optimize(..., target="cuda", cuda_graphs=True)``. A denoiser at
small batch is launch-bound: a DiT-S/2 call at batch 1 is a few hundred kernels of a few microseconds
each, and the CPU time to launch them (Python, the Triton launcher, ATen's dispatcher) exceeds the GPU
time. A CUDA graph records the launches once per input layout and replays them with one call, as
torch.compile's "reduce-overhead" / "max-autotune" modes do.

Per distinct input layout (shapes, strides, dtypes, device) the runner copies the inputs into static
buffers, warms the function up on a side stream (Triton compiles and configs are chosen before
recording), records one call, and from then on copies inputs in, replays, and returns clones of the
static outputs (a sampler keeps the previous step's output while calling the next one). A layout
whose recording fails (an op that cannot be captured: a host synchronisation, a copy from pageable
memory) runs its calls directly from then on, with one warning naming the layout and the reason
(``CudaGraphRunner.fallbacks``); the function's results are the same either way. So does every layout
after the first ``max_graphs`` (8): each graph keeps a memory pool of its own.

:class:`SamplerGraph` goes one step further than torch.compile, which records one denoiser call at a
time: it records a whole sampling loop, every step of a sampler or of a searched
:class:`~graphopt.plan.SamplingPlan`, as one graph, so a batch of images costs one launch. The noise
levels are Python floats in the samplers, so they are baked into the graph; a graphopt module inside
it launches its kernels directly while the loop is recorded (one graph, not graphs inside a graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .errors import UsageError, first_line


@dataclasses.dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class CudaGraphRunner:
    """Calls ``fn(*tensors) -> tuple of tensors`` through a CUDA graph recorded per input layout.

    ``stale()``, when given, is asked before each call whether what the graphs recorded has changed
    (a call site tuned since: the graphs replay the old configs); then every graph is dropped and each
    layout is recorded again on its next call.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], *, warmup: int = 2, max_graphs: int = 8,
                 stale: Callable[[], bool] | None = None):
        self.fn, self.warmup, self.max_graphs, self.stale = fn, warmup, max_graphs, stale
        self._recorded: dict[tuple, _Recorded | None] = {}
        self.fallbacks: dict[tuple, str] = {}
        """Layouts (shapes, strides, dtypes, devices) without a graph, with the reason: they run directly."""

    def __len__(self) -> int:
        return sum(rec is not None for rec in self._recorded.values())

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self._recorded and self.stale is not None and self.stale():
            self._recorded.clear()
            self.fallbacks.clear()
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
        if key not in self._recorded:
            self._recorded[key] = self._record_or_fall_back(key, tensors)
        rec = self._recorded[key]
        if rec is None:
            return tuple(self.fn(*tensors))
        for static, t in zip(rec.inputs, tensors):
            static.copy_(t)
        rec.graph.replay()
        return tuple(o.clone() for o in rec.outputs)

    def _record_or_fall_back(self, key: tuple, tensors: Sequence[torch.Tensor]) -> _Recorded | None:
        shapes = ", ".join(f"{str(dtype).removeprefix('torch.')}{list(shape)}" for shape, _, dtype, _ in key)
        if len(self) >= self.max_graphs:  # each graph keeps its own memory pool: bound how many stay alive
            reason = f"{self.max_graphs} input layouts are recorded already (max_graphs)"
        else:
            try:
                return self._record(tensors)
            except UsageError:
                raise
            except Exception as err:  # capture refused an op: this layout runs without a graph
                reason = f"recording failed: {first_line(err)}"
        self.fallbacks[key] = reason
        warnings.warn(f"no CUDA graph for inputs ({shapes}): {reason}; these calls launch their kernels "
                      "directly (same results, more launch overhead)", stacklevel=3)
        return None

    def _record(self, tensors: Sequence[torch.Tensor]) -> _Recorded:
        if not all(t.is_cuda for t in tensors):
            raise UsageError("CUDA graphs need every input on the GPU")
        static = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # compiles kernels, picks configs, fills the allocator's cache
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            outputs = tuple(self.fn(*static))
        return _Recorded(graph, static, outputs)


def resolve(cuda_graphs: bool | None, target: str) -> bool:
    """Whether a module for ``target`` replays CUDA graphs: ``None`` means on for "cuda" on a GPU;
    ``True`` anywhere else is a :class:`~graphopt.errors.UsageError`."""
    available = target == "cuda" and torch.cuda.is_available()
    if cuda_graphs and not available:
        raise UsageError("cuda_graphs=True needs target='cuda' and a CUDA GPU")
    return available and cuda_graphs is not False


class SamplerGraph:
    """A whole sampling loop as one CUDA graph: ``sampler.sample(model, noise, labels)`` recorded per
    input layout on its first call and replayed with one launch after it.

    ``sampler`` is any object with ``sample(model, noise, labels)`` (graphopt's samplers, a plan's
    ``plan.sampler()``), ``model`` the denoiser it calls (an optimized module with ``target="cuda"``,
    or any CUDA module). ``warmup`` loops run first (kernels compile, configs are chosen). Returns
    fresh tensors; a layout that cannot be recorded runs the loop directly, with a warning (see
    :class:`CudaGraphRunner`). The loop must be deterministic given its inputs: a sampler that draws
    fresh noise inside the loop draws it from the graph's own generator state.
    """

    def __init__(self, model: Any, sampler: Any, *, warmup: int = 1):
        if not callable(getattr(sampler, "sample", None)):
            raise UsageError(f"expected a sampler with sample(model, noise, labels), got {type(sampler).__name__}")
        self.model, self.sampler = model, sampler
        runtimes = getattr(model, "_runtimes", ())  # an optimized module's sites, tuned after recording
        self._runner = CudaGraphRunner(self._loop, warmup=warmup,
                                       stale=lambda: any(r.retuned() for r in runtimes))

    @property
    def fallbacks(self) -> dict[tuple, str]:
        """Layouts whose loop could not be recorded, with the reason (they run directly)."""
        return self._runner.fallbacks

    def _loop(self, noise: torch.Tensor, *labels: torch.Tensor) -> tuple[torch.Tensor]:
        with direct_launches(self.model):
            return (self.sampler.sample(self.model, noise, labels[0] if labels else None),)

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor) or not noise.is_cuda or (
                labels is not None and (not isinstance(labels, torch.Tensor) or not labels.is_cuda)):
            raise UsageError("a sampler graph runs on the GPU: noise (and labels) must be CUDA tensors")
        return self._runner([noise] if labels is None else [noise, labels])[0]


@contextlib.contextmanager
def direct_launches(model: Any) -> Iterator[None]:
    """While inside, an optimized module with per-call CUDA graphs launches its kernels directly (so a
    loop around it can be recorded as one graph); any other model is left as it is."""
    runners = getattr(model, "_graph_runners", None)
    if runners is None:
        yield
        return
    model._graph_runners = None
    try:
        yield
    finally:
        model._graph_runners = runners
