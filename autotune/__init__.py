"""Kernels and the autotuner (installed as ``graphopt.autotune``).

:mod:`.regions`, :mod:`.codegen` and :mod:`.lower` turn a captured graph into generated Triton kernels
(``optimize(..., target="cuda")``) called by the sites of :mod:`.sites`, checked by :mod:`.check` and
run through :mod:`.runtime`'s generated forwards; :mod:`.cache` stores every config's timing per GPU
(:mod:`.cache_admin`: list, clear, bundles); :mod:`.tuner` times configs and chooses one;
:mod:`.model_tuning` tunes every kernel of a lowered model.
"""

from .cache import (AutotuneError, CacheEntry, CacheWarning, Config, DeviceKey, EntryKey, Timing, TuningCache, cache_dir,
                    shape_bucket)
from .cache_admin import CacheBundleError, DeviceCache, clear, export_bundle, format_listing, import_bundle, list_caches
from .lower import KernelLibrary, LoweringReport, TuningOptions
from .model_tuning import KernelTuning, tune_model
from .tuner import (DEFAULT_CACHE, NoGpuError, Timer, TuneResult, choose, configs_hash, cuda_event_timer,
                    cuda_graph_timer, default_cache, gpu_device_key, hash_source, tune)

__all__ = [
    "AutotuneError", "CacheBundleError", "CacheEntry", "CacheWarning", "Config", "DEFAULT_CACHE", "DeviceCache",
    "DeviceKey", "EntryKey", "KernelLibrary", "KernelTuning", "LoweringReport", "NoGpuError", "Timer", "Timing",
    "TuneResult", "TuningCache", "TuningOptions", "cache_dir", "choose", "clear", "configs_hash", "cuda_event_timer",
    "cuda_graph_timer", "default_cache", "export_bundle", "format_listing", "gpu_device_key", "hash_source",
    "import_bundle",
    "list_caches", "shape_bucket", "tune", "tune_model",
]
