"""The autotuner: time each config of a kernel family, keep the fastest, remember it per GPU.

Where it belongs: between a kernel's launcher and the tuning cache. Triton's ``@triton.autotune``
forgets everything at exit and does not run under ``TRITON_INTERPRET=1``, so launchers ask this module
instead::

    cfg = choose("rmsnorm", RMSNORM_SRC, (rows, cols), rmsnorm_configs,
                 lambda c: _launch(x, w, out, **c), autotune=True).config

Tuning is explicit data:

- a kernel family's configs are values returned by one ``configs()`` function, optionally pruned for
  the shape by a cost-model callback ``prune(configs, shape)``;
- each config is timed by a pluggable timer (default :func:`cuda_event_timer`: CUDA events after
  warm-up, the median of the repeats; lowered models' call sites use :func:`cuda_graph_timer`, which
  times them as they run inside the module's CUDA graph); a config whose launch raises (a compile
  error, too much shared memory, a runtime fault) scores infinity and the error text is kept, instead
  of aborting the run;
- the result is stored under everything the timing depends on: the :class:`DeviceKey` (which file),
  the kernel name, its source hash and the bucketed shape (which entry), and the hash of the config
  family (an entry tuned over another family is stale and is not used).

:func:`tune` always returns a measured choice, from the cache when it has one. :func:`choose` is what a
launcher calls when it meets a shape: the cached choice if there is one, a tuning run if ``autotune`` is
asked for, and otherwise the family's heuristic default (its first config after pruning) without
timing anything, which is also what runs on a CPU.

Per-config times are logged at DEBUG on the ``graphopt.autotune.tuner`` logger.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol

import torch

from graphopt.errors import first_line

from .cache import AutotuneError, CacheEntry, CacheWarning, Config, DeviceKey, Timing, TuningCache, shape_bucket

log = logging.getLogger(__name__)

Configs = Iterable[Mapping[str, int]] | Callable[[], Iterable[Mapping[str, int]]]
"""A family's configs: the ``configs()`` function itself (preferred) or what it returned."""

Prune = Callable[[Sequence[Config], tuple[int, ...]], Iterable[Mapping[str, int]]]
"""A cost-model callback: given the family and the concrete shape, the configs worth timing, best guess first."""


class NoGpuError(AutotuneError):
    """Something that needs a CUDA GPU (the default timer, the device key) was called without one."""


class Timer(Protocol):
    """Times ``fn`` (one kernel launch) and returns milliseconds; raising means the config failed."""

    def __call__(self, fn: Callable[[], object], *, warmup: int, repeats: int) -> float: ...


class _Default(enum.Enum):
    CACHE = "default"


DEFAULT_CACHE = _Default.CACHE
"""Use the current GPU's cache file in :func:`~graphopt.autotune.cache.cache_dir`; no cache on a CPU."""

CacheArg = TuningCache | None | Literal[_Default.CACHE]


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The config a launcher should use and where it came from.

    ``source`` is ``"cache"`` (a stored tuning result), ``"tuned"`` (timed just now) or ``"default"``
    (the family's heuristic default; nothing was timed and ``time_ms`` is ``None``). ``timings`` and
    ``skipped`` are the tuning run's (empty for the default): every timed config with its time
    (infinity for a failure) and the configs a time budget left untimed.
    """

    kernel: str
    source_hash: str
    shape_bucket: tuple[int, ...]
    config: Config
    time_ms: float | None
    source: Literal["cache", "tuned", "default"]
    timings: tuple[Timing, ...] = ()
    skipped: tuple[Config, ...] = ()

    @staticmethod
    def from_entry(entry: CacheEntry, source: Literal["cache", "tuned"]) -> TuneResult:
        assert entry.best is not None
        return TuneResult(entry.kernel, entry.source_hash, entry.shape_bucket, entry.best, entry.best_time_ms,
                          source, entry.timings, entry.skipped)


def cuda_event_timer(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 25,
                     flush_l2: bool = True) -> float:
    """Median milliseconds of ``repeats`` launches of ``fn``, each bracketed by CUDA events, after ``warmup`` launches.

    The warm-up compiles the kernel and fills caches so that neither is timed; with ``flush_l2`` a
    256 MiB buffer is zeroed before each launch (outside the events) so that every repeat starts with a
    cold L2, as a kernel inside a model does (Triton's ``do_bench`` does the same). The median rather
    than the mean keeps one preempted launch from deciding the choice.
    """
    if not torch.cuda.is_available():
        raise NoGpuError("the default autotune timer measures with CUDA events and needs a CUDA GPU "
                         "(torch.cuda.is_available() is False); pass timer= to tune without one")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    scratch = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if flush_l2 else None
    events = []
    for _ in range(repeats):
        if scratch is not None:
            scratch.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()  # also surfaces asynchronous launch failures here, inside the tuner's guard
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cuda_graph_timer(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 25, launches: int = 10) -> float:
    """Median milliseconds per launch of ``fn`` replayed inside a CUDA graph, as a call site runs in the
    CUDA graph a lowered module replays (the default on a GPU).

    So the time is the GPU's: no host overhead (a replayed graph has none), and no L2 flush (inside a
    model a site reads what the previous kernel just wrote; back-to-back launches read warm inputs as
    well). ``warmup`` calls (at least one) run outside the capture: they compile the kernel and do a
    tuning run's first-call work, such as the output check, which synchronises and so cannot be
    captured. Then ``launches`` calls are recorded as one graph and each of ``repeats`` replays is
    bracketed by CUDA events. A call that cannot be captured raises, and the tuner scores its config
    infinity: it could not run inside the module's graph either.
    """
    if not torch.cuda.is_available():
        raise NoGpuError("the default autotune timer measures with CUDA events and needs a CUDA GPU "
                         "(torch.cuda.is_available() is False); pass timer= to tune without one")
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / launches
    finally:
        graph.reset()  # its memory pool holds every launch's outputs


def tune(kernel_name: str, source_hash: str, shape: Sequence[int], configs: Configs,
         run_config: Callable[[Config], object], *, prune: Prune | None = None, timer: Timer = cuda_event_timer,
         cache: CacheArg = DEFAULT_CACHE, budget_s: float | None = None, warmup: int = 5, repeats: int = 25,
         force: bool = False, clock: Callable[[], float] = time.perf_counter,
         required: Callable[[Config], bool] | None = None) -> TuneResult:
    """Time every candidate config of ``kernel_name`` at ``shape`` and return the fastest.

    ``run_config(config)`` launches the kernel once with ``config``; it is what the timer times.
    A cache entry for the same kernel, source hash, shape bucket and config family is returned without
    timing anything, unless ``force`` (e.g. to finish an entry a budget cut short). ``budget_s`` bounds
    the wall time of the run, compilation included: once it is spent no new config is started and the
    rest are recorded as skipped (the first candidate is always timed, so a run always has a result,
    and so is every candidate ``required`` marks: a call site's ATen ops, so that a kernel is never
    chosen without having been timed against them).
    The result is stored in ``cache``; failing to write it warns and does not fail the run.

    Raises :class:`AutotuneError` if every timed config failed (nothing is stored: the failure may be
    transient, such as memory held by another process) and :class:`NoGpuError` from the default timer
    on a machine without CUDA.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    family = _family(kernel_name, configs)
    candidates = _prune(kernel_name, family, prune, shape)
    bucket, family_hash = shape_bucket(shape), configs_hash(family)
    store = _resolve_cache(cache)

    if not force and (hit := _cached(store, kernel_name, source_hash, bucket, family_hash)) is not None:
        return hit

    timings: list[Timing] = []
    start = clock()
    skipped_list: list[Config] = []
    for i, config in enumerate(candidates):
        spent = budget_s is not None and i > 0 and clock() - start >= budget_s
        if spent and not (required is not None and required(config)):
            skipped_list.append(config)
            continue
        timings.append(_time_config(kernel_name, config, run_config, timer, warmup, repeats))
    skipped = tuple(skipped_list)
    if skipped:
        log.debug("%s %s: budget of %.3g s spent, %d configs skipped", kernel_name, bucket, budget_s,
                  len(skipped))

    entry = CacheEntry.from_timings(kernel_name, source_hash, bucket, family_hash, timings, skipped, time.time())
    if entry.best is None:
        first = timings[0]
        raise AutotuneError(f"every config of kernel '{kernel_name}' failed at shape {tuple(shape)} "
                            f"({len(timings)} timed); first failure, {dict(first.config)}: {first.error}")
    if store is not None:
        try:
            store.put(entry)
        except OSError as e:
            warnings.warn(f"could not store tuning result in {store.path}: {type(e).__name__}: {e}", CacheWarning,
                          stacklevel=2)
    return TuneResult.from_entry(entry, "tuned")


def choose(kernel_name: str, source_hash: str, shape: Sequence[int], configs: Configs,
           run_config: Callable[[Config], object] | None = None, *, autotune: bool = False,
           prune: Prune | None = None, timer: Timer = cuda_event_timer, cache: CacheArg = DEFAULT_CACHE,
           budget_s: float | None = None, warmup: int = 5, repeats: int = 25,
           clock: Callable[[], float] = time.perf_counter,
           required: Callable[[Config], bool] | None = None) -> TuneResult:
    """The config a launcher should use now: cached, else tuned if ``autotune``, else the default.

    The default is the family's first config after ``prune`` (the cost model knows the shape, so its
    first survivor is a better guess and is certain to be valid for it); it is returned without timing
    and without writing the cache, so it works on a CPU too. Each call re-reads the cache file (so it
    sees other processes' results): call it once per shape bucket, when the launcher is built or first
    sees the shape, and keep the answer, not once per launch.
    """
    family = _family(kernel_name, configs)
    store = _resolve_cache(cache)
    if autotune:
        if run_config is None:
            raise ValueError(f"choose('{kernel_name}', autotune=True) needs run_config to time configs")
        return tune(kernel_name, source_hash, shape, family, run_config, prune=prune, timer=timer, cache=store,
                    budget_s=budget_s, warmup=warmup, repeats=repeats, clock=clock, required=required)
    bucket = shape_bucket(shape)
    if (hit := _cached(store, kernel_name, source_hash, bucket, configs_hash(family))) is not None:
        return hit
    default = _prune(kernel_name, family, prune, shape)[0]
    return TuneResult(kernel_name, source_hash, bucket, default, None, "default")


def gpu_device_key(device: int | str | torch.device | None = None) -> DeviceKey:
    """The :class:`DeviceKey` of a CUDA device (default: the current one); :class:`NoGpuError` without CUDA."""
    if not torch.cuda.is_available():
        raise NoGpuError("a tuning cache key needs a CUDA GPU and torch.cuda.is_available() is False")
    where = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if where.type != "cuda":
        raise ValueError(f"gpu_device_key needs a CUDA device, got {where}")
    index = torch.cuda.current_device() if where.index is None else where.index
    props = torch.cuda.get_device_properties(index)
    # ROCm builds report HIP here; the toolkit version matters to the timings either way
    toolkit = torch.version.cuda or (f"hip-{torch.version.hip}" if torch.version.hip else "unknown")
    return DeviceKey(gpu_name=props.name, compute_capability=tuple(torch.cuda.get_device_capability(index)),
                     sm_count=props.multi_processor_count, cuda_version=toolkit,
                     torch_version=torch.__version__, triton_version=_version("triton"),
                     graphopt_version=_version("graphopt"))


def default_cache() -> TuningCache | None:
    """The current GPU's cache in the default directory, or ``None`` on a machine without CUDA."""
    return TuningCache(gpu_device_key()) if torch.cuda.is_available() else None


def hash_source(*parts: str | bytes | Callable[..., object]) -> str:
    """16 hex digits identifying kernel source: strings, bytes, functions or Triton ``JITFunction``s.

    Hash every kernel and helper a launcher runs, so that editing any of them retires its timings.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bytes):
            data = part
        else:  # a Triton JITFunction keeps its source in .src; an interpreted one wraps the function as .fn
            src = getattr(part, "src", None)
            data = (src if isinstance(src, str) else inspect.getsource(getattr(part, "fn", part))).encode()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ("ab","c") != ("a","bc")
    return h.hexdigest()[:16]


def configs_hash(configs: Iterable[Mapping[str, int]]) -> str:
    """16 hex digits identifying a config family, in order (order decides the default and ties)."""
    canonical = json.dumps([Config(c).to_json() for c in configs], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- helpers


def _family(kernel_name: str, configs: Configs) -> tuple[Config, ...]:
    raw = configs() if callable(configs) else configs
    # dict.fromkeys drops duplicates and keeps order: timing one config twice would only waste time
    family = tuple(dict.fromkeys(c if isinstance(c, Config) else Config(c) for c in raw))
    if not family:
        raise AutotuneError(f"kernel '{kernel_name}' has no configs to choose from")
    return family


def _prune(kernel_name: str, family: tuple[Config, ...], prune: Prune | None,
           shape: Sequence[int]) -> tuple[Config, ...]:
    if prune is None:
        return family
    kept = tuple(dict.fromkeys(c if isinstance(c, Config) else Config(c) for c in prune(family, tuple(shape))))
    if not kept:
        raise AutotuneError(f"the cost model pruned every config of kernel '{kernel_name}' at shape {tuple(shape)}")
    return kept


def _cached(store: TuningCache | None, kernel_name: str, source_hash: str, bucket: tuple[int, ...],
            family_hash: str) -> TuneResult | None:
    entry = None if store is None else store.get(kernel_name, source_hash, bucket)
    # an entry tuned over another config family may lack the config that would win now: stale
    if entry is None or entry.configs_hash != family_hash or entry.best is None:
        return None
    return TuneResult.from_entry(entry, "cache")


def _resolve_cache(cache: CacheArg) -> TuningCache | None:
    return default_cache() if cache is DEFAULT_CACHE else cache


def _time_config(kernel_name: str, config: Config, run_config: Callable[[Config], object], timer: Timer,
                 warmup: int, repeats: int) -> Timing:
    try:
        ms = float(timer(functools.partial(run_config, config), warmup=warmup, repeats=repeats))
    except NoGpuError:
        raise  # no config can be timed on this machine: that is the caller's mistake, not the config's
    except Exception as e:  # noqa: BLE001 - any launch failure disqualifies the config, nothing more
        error = f"{type(e).__name__}: {first_line(e)}"
        log.debug("%s %s failed: %s", kernel_name, dict(config), error)
        return Timing(config, math.inf, error)
    if not (math.isfinite(ms) and ms >= 0):
        return Timing(config, math.inf, f"timer returned {ms!r}")
    log.debug("%s %s: %.4f ms", kernel_name, dict(config), ms)
    return Timing(config, ms)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
