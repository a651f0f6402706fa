"""Kernels and the autotuner (installed as ``graphopt.autotune``).

:mod:`.regions`, :mod:`.codegen` and :mod:`.lower` turn a captured graph into generated Triton kernels
(``optimize(..., target="cuda")``) called by the sites of :mod:`.sites`, checked by :mod:`.check` and
run through :mod:`.runtime`'s generated forwards; :mod:`.cache` stores every config's timing per GPU
(:mod:`.cache_admin`: list, clear, bundles); :mod:`.tuner` times configs and chooses one;
:mod:`.model_tuning` tunes every kernel of a lowered model.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# Imported when first used: the lowering pulls in sympy and the kernel library, which a process that
# only loads a saved model's stored forwards (.stored) never needs.
_LAZY = {
    **dict.fromkeys(("AutotuneError", "CacheEntry", "CacheWarning", "Config", "DeviceKey", "EntryKey", "Timing",
                     "TuningCache", "cache_dir", "shape_bucket"), "cache"),
    **dict.fromkeys(("CacheBundleError", "DeviceCache", "clear", "export_bundle", "format_listing", "import_bundle",
                     "list_caches"), "cache_admin"),
    **dict.fromkeys(("KernelLibrary", "LoweringReport", "TuningOptions"), "lower"),
    **dict.fromkeys(("KernelTuning", "tune_model"), "model_tuning"),
    **dict.fromkeys(("DEFAULT_CACHE", "NoGpuError", "Timer", "TuneResult", "choose", "configs_hash",
                     "cuda_event_timer", "cuda_graph_timer", "default_cache", "gpu_device_key", "hash_source",
                     "tune"), "tuner"),
}

if TYPE_CHECKING:  # what static tools and editors see: every public name, as if imported here
    from .cache import (AutotuneError, CacheEntry, CacheWarning, Config, DeviceKey, EntryKey, Timing, TuningCache,
                        cache_dir, shape_bucket)
    from .cache_admin import (CacheBundleError, DeviceCache, clear, export_bundle, format_listing, import_bundle,
                              list_caches)
    from .lower import KernelLibrary, LoweringReport, TuningOptions
    from .model_tuning import KernelTuning, tune_model
    from .tuner import (DEFAULT_CACHE, NoGpuError, Timer, TuneResult, choose, configs_hash, cuda_event_timer,
                        cuda_graph_timer, default_cache, gpu_device_key, hash_source, tune)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule: graphopt.autotune.kernels, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AutotuneError", "CacheBundleError", "CacheEntry", "CacheWarning", "Config", "DEFAULT_CACHE", "DeviceCache",
    "DeviceKey", "EntryKey", "KernelLibrary", "KernelTuning", "LoweringReport", "NoGpuError", "Timer", "Timing",
    "TuneResult", "TuningCache", "TuningOptions", "cache_dir", "choose", "clear", "configs_hash", "cuda_event_timer",
    "cuda_graph_timer", "default_cache", "export_bundle", "format_listing", "gpu_device_key", "hash_source",
    "import_bundle",
    "list_caches", "shape_bucket", "tune", "tune_model",
]
