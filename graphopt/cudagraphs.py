"""Replay a lowered graph as a CUDA graph: one launch from the CPU for the whole denoiser call.

Where it belongs: the last step of ``optimize(..., target="cuda", cuda_graphs=True)``. A denoiser at
small batch is launch-bound: a DiT-S/2 call at batch 1 is a few hundred kernels of a few microseconds
each, and the CPU time to launch them (Python, the Triton launcher, ATen's dispatcher) exceeds the GPU
time. A CUDA graph records the launches once per input layout and replays them with one call, as
torch.compile's "reduce-overhead" / "max-autotune" modes do.

Per distinct input layout (shapes, strides, dtypes, device) the runner copies the inputs into static
buffers, warms the function up on a side stream (Triton compiles and configs are chosen before
recording), records one call, and from then on copies inputs in, replays, and returns clones of the
static outputs (a sampler keeps the previous step's output while calling the next one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class CudaGraphRunner:
    """Calls ``fn(*tensors) -> tuple of tensors`` through a CUDA graph recorded per input layout."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], *, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._recorded: dict[tuple, _Recorded] = {}

    def __len__(self) -> int:
        return len(self._recorded)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
        rec = self._recorded.get(key)
        if rec is None:
            rec = self._recorded[key] = self._record(tensors)
        for static, t in zip(rec.inputs, tensors):
            static.copy_(t)
        rec.graph.replay()
        return tuple(o.clone() for o in rec.outputs)

    def _record(self, tensors: Sequence[torch.Tensor]) -> _Recorded:
        if not all(t.is_cuda for t in tensors):
            raise ValueError("CUDA graphs need every input on the GPU")
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
