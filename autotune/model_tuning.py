"""Tune every kernel of a lowered model for the GPU in front of it: ``graphopt autotune MODEL``.

Where it belongs: after ``optimize(..., target="cuda")``. The model is run once per requested batch
size with hooks on its kernel call sites, which records the exact tensors each kernel meets; each
distinct (kernel, shape bucket) is then tuned on those tensors (:meth:`~.lower._Tuned.tune`), so a
kernel shared by every transformer block is timed once per shape. The results land in the per-GPU
cache, where every later ``optimize(..., target="cuda")`` on this GPU finds them.

The report gives, per kernel and shape, the best config, its time and its speedup over the heuristic
default config (the config an untuned run uses). Every call site also has the eager ATen ops it
replaces as a candidate, timed even when the budget skips others, so a kernel that does not beat them
on this GPU is not used; each candidate is checked against them before it can be chosen.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from graphopt.errors import UsageError

from .atconv import ATConvRegion
from .cache import Config, shape_bucket
from .configs import is_aten
from .gemm import GemmRegion
from .sites import FamilyRegion, FusedRegion, _Tuned
from .tuner import DEFAULT_CACHE, CacheArg, Timer, cuda_graph_timer


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """One tuned (kernel, shape): the winner, its time, the default config and its time (ms)."""

    kernel: str
    kind: str
    batch: int
    shape: tuple[int, ...]
    config: Config
    time_ms: float
    default_ms: float
    source: str
    configs_timed: int
    default: Config | None = None
    """The untuned default config (what ``default_ms`` timed)."""

    @property
    def speedup(self) -> float:
        return self.default_ms / self.time_ms if self.time_ms > 0 else math.nan


def batch_inputs(module: Any, batch: int) -> tuple[tuple, dict]:
    """The module's example call with every batched input resized to ``batch`` (samples repeated)."""
    captured = module.captured
    tensors = []
    for t, guard in zip(captured.example_inputs, captured.guards.tensors):
        if guard.shape and isinstance(guard.shape[0], str):
            t = t[torch.arange(batch, device=t.device) % t.shape[0]]
        tensors.append(t)
    return captured.call.rebuild_call(tensors)


def record_calls(module: Any, args: tuple, kwargs: dict) -> list[tuple[_Tuned, tuple[torch.Tensor, ...]]]:
    """Run ``module`` once and return each kernel call site with the tensors it was called with."""
    with torch.no_grad():
        module(*args, **kwargs)  # a batch outside the captured range re-captures (and lowers) here
        return module.kernel_calls(*args, **kwargs)


def tune_model(module: Any, batches: Sequence[int], *, timer: Timer = cuda_graph_timer,
               cache: CacheArg = DEFAULT_CACHE, budget_s: float | None = None, force: bool = False,
               progress: bool = True,
               on_result: Callable[[KernelTuning], None] | None = None) -> list[KernelTuning]:
    """Tune every kernel of an :class:`~graphopt.OptimizedModule` lowered with ``target="cuda"``.

    ``batches``: the batch sizes to tune for. ``budget_s``: wall-time budget for the whole run, shared
    evenly among the kernels still to tune (each always times at least its first config). ``force``
    re-times kernels that already have a cache entry.
    """
    if not module.kernel_modules():
        raise UsageError("this module has no kernels to tune: optimize it with target='cuda'")
    work: dict[tuple[str, tuple[int, ...]], tuple[_Tuned, tuple[torch.Tensor, ...], int]] = {}
    for batch in batches:
        args, kwargs = batch_inputs(module, batch)
        for site, inputs in record_calls(module, args, kwargs):
            key = (site.cache_name(*inputs), shape_bucket(site.tuning_shape(*inputs)))
            work.setdefault(key, (site, inputs, batch))

    bar = tqdm(total=len(work), desc="autotune", disable=not progress)
    results: list[KernelTuning] = []
    spent = 0.0
    for i, ((name, _), (site, inputs, batch)) in enumerate(work.items()):
        share = None if budget_s is None else max(budget_s - spent, 0.0) / (len(work) - i)
        t0 = time.perf_counter()
        result = site.tune(*inputs, timer=timer, cache=cache, budget_s=share, force=force)
        spent += time.perf_counter() - t0
        default = site.default_config(*inputs)
        default_ms = next((t.time_ms for t in result.timings if t.config == default), math.nan)
        row = KernelTuning(name, site_kind(site), batch, site.tuning_shape(*inputs), result.config,
                           float(result.time_ms or math.nan), default_ms, result.source,
                           sum(1 for t in result.timings if not t.failed), default)
        results.append(row)
        if on_result is not None:
            on_result(row)
        bar.set_postfix_str(name, refresh=False)
        bar.update()
    bar.close()
    return results


def site_kind(site: nn.Module) -> str:
    """A call site's kind as the lowering report names it: attention (ATConv's fused generation
    included), gemm, pointwise or norm."""
    if isinstance(site, (FamilyRegion, ATConvRegion)):
        return "attention"
    if isinstance(site, GemmRegion):
        return "gemm"
    assert isinstance(site, FusedRegion)
    return "pointwise" if site.generated.row is None else "norm"


def format_table(rows: Sequence[KernelTuning]) -> str:
    """kernel, kind, batch, shape, best config, time, default time, speedup, where the choice came from."""
    head = ("kernel", "kind", "batch", "shape", "best config", "time", "default", "speedup", "source")
    table = [head]
    for r in rows:
        cfg = "ATen (eager ops)" if is_aten(r.config) else " ".join(f"{k}={v}" for k, v in r.config.items())
        table.append((r.kernel, r.kind, str(r.batch), "x".join(map(str, r.shape)), cfg, _us(r.time_ms),
                      _us(r.default_ms), f"{r.speedup:.2f}x" if math.isfinite(r.speedup) else "-", r.source))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _us(ms: float) -> str:
    return f"{ms * 1000:.1f} us" if math.isfinite(ms) else "-"
