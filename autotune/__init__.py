"""Kernels and the autotuner (installed as ``graphopt.autotune``).

:mod:`.cache` stores every config's timing per GPU; :mod:`.tuner` times configs and chooses one.
"""

from .cache import (AutotuneError, CacheBundleError, CacheEntry, CacheWarning, Config, DeviceCache, DeviceKey,
                    EntryKey, Timing, TuningCache, cache_dir, clear, export_bundle, format_listing, import_bundle,
                    list_caches, shape_bucket)
from .tuner import (DEFAULT_CACHE, NoGpuError, Timer, TuneResult, choose, configs_hash, cuda_event_timer,
                    default_cache, gpu_device_key, hash_source, tune)

__all__ = [
    "AutotuneError", "CacheBundleError", "CacheEntry", "CacheWarning", "Config", "DEFAULT_CACHE", "DeviceCache",
    "DeviceKey", "EntryKey", "NoGpuError", "Timer", "Timing", "TuneResult", "TuningCache", "cache_dir", "choose",
    "clear", "configs_hash", "cuda_event_timer", "default_cache", "export_bundle", "format_listing",
    "gpu_device_key", "hash_source", "import_bundle", "list_caches", "shape_bucket", "tune",
]
