"""The tuning cache's admin verbs, as the ``graphopt autotune`` command offers them: list every device's
file, clear them, export them to one bundle and import a bundle.

Where it belongs: beside :mod:`.cache` (one device's file, what the tuner reads and writes), serving
the CLI and anyone managing a fleet. A bundle is
``{"format": "graphopt-autotune-bundle", "version": 1, "caches": [<file document>, ...]}``: one
tuning run on one GPU can be copied to a fleet of identical machines. Files in the cache directory
that a :class:`~.cache.DeviceKey` did not name are never listed or deleted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

from graphopt.errors import UsageError

from .cache import (BUNDLE_FORMAT, FORMAT_VERSION, AutotuneError, CacheEntry, DeviceKey, TuningCache, _file_doc,
                    _lock_path, _loads, _parse_file_doc, _report, _sort_key, _write_json_atomic, cache_dir)

# what DeviceKey.file_name produces; anything else in the directory is not ours to list or delete
_DEVICE_FILE = re.compile(r"[a-z0-9-]*-sm\d+-[0-9a-f]{12}\.json")


class CacheBundleError(AutotuneError, UsageError):
    """A bundle given to :func:`import_bundle` is missing, unreadable or malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class DeviceCache:
    """One device's file as :func:`list_caches` finds it."""

    device: DeviceKey
    path: Path
    entries: tuple[CacheEntry, ...]


def list_caches(directory: str | os.PathLike[str] | None = None) -> list[DeviceCache]:
    """Every valid device file in the cache directory (invalid ones are reported and skipped)."""
    root = cache_dir(directory)
    found = []
    for path in _device_files(root):
        try:
            device, entries = _parse_file_doc(_loads(path.read_text(encoding="utf-8")))
            # a file renamed or copied under another device's name must not serve that device
            if path.name != device.file_name():
                raise ValueError(f"its device key names the file {device.file_name()}")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            _report(path, str(e))
            continue
        found.append(DeviceCache(device, path, tuple(sorted(entries.values(), key=_sort_key))))
    return found


def format_listing(caches: Iterable[DeviceCache]) -> str:
    """A human-readable listing: one line per device, then one indented line per entry."""
    lines = []
    for dc in caches:
        lines.append(f"{dc.device.describe()}: {len(dc.entries)} entries ({dc.path})")
        lines.extend(f"  {e.summary()}" for e in dc.entries)
    return "\n".join(lines) if lines else "(no tuning cache entries)"


def clear(directory: str | os.PathLike[str] | None = None, device: DeviceKey | None = None) -> int:
    """Delete one device's file, or every device file in the directory; returns how many were deleted."""
    if device is not None:
        return int(TuningCache(device, directory).clear())
    root = cache_dir(directory)
    if not root.is_dir():
        return 0
    removed = 0
    names = {p.name for p in _device_files(root)}
    # temporary files a killed writer left, possibly for a file that was never completed
    names |= {m.group(1) for p in root.glob(".*.tmp")
              if (m := re.fullmatch(r"\.(.+\.json)\.[^.]+\.tmp", p.name)) and _DEVICE_FILE.fullmatch(m.group(1))}
    for name in sorted(names):
        path = root / name
        with _lock_path(path):
            for stale in root.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
            if path.exists():
                path.unlink()
                removed += 1
    return removed


def export_bundle(dest: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None,
                  devices: Iterable[DeviceKey] | None = None) -> int:
    """Write every device's cache (or only ``devices``') to one bundle file; returns the number of entries."""
    wanted = None if devices is None else set(devices)
    caches = [dc for dc in list_caches(directory) if wanted is None or dc.device in wanted]
    doc = {"format": BUNDLE_FORMAT, "version": FORMAT_VERSION,
           "caches": [_file_doc(dc.device, dc.entries) for dc in caches]}
    _write_json_atomic(Path(dest), doc)
    return sum(len(dc.entries) for dc in caches)


def import_bundle(src: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None) -> int:
    """Merge a bundle into the cache directory; returns the number of entries written.

    The whole bundle is validated before anything is written, so a malformed one changes nothing and
    raises :class:`CacheBundleError` naming the file and the problem. Entries merge with the local
    ones; for the same key the more recently tuned entry wins.
    """
    path = Path(src)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CacheBundleError(f"cannot read tuning bundle {path}: {type(e).__name__}: {e}") from e
    try:
        doc = _loads(text)
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"not a {BUNDLE_FORMAT} file")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"bundle version {doc.get('version')!r}, this graphopt reads {FORMAT_VERSION}")
        if not isinstance(doc.get("caches"), list):
            raise ValueError("'caches' must be a list")
        parsed = []
        for i, item in enumerate(doc["caches"]):
            try:
                parsed.append(_parse_file_doc(item))
            except ValueError as e:
                raise ValueError(f"caches[{i}]: {e}") from None
    except ValueError as e:
        raise CacheBundleError(f"malformed tuning bundle {path}: {e}") from None
    return sum(TuningCache(device, directory).merge(entries.values()) for device, entries in parsed)


def _device_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.json") if _DEVICE_FILE.fullmatch(p.name)) if root.is_dir() else []
