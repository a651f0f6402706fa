"""The tuning cache: every config's measured time, one JSON file per GPU, shared safely between processes.

Where it belongs: under :mod:`graphopt.autotune.tuner`, which times kernel configs and stores the
results here so that no process times the same thing twice. This module knows nothing about GPUs or
timers; it stores values.

What a timing depends on, and so what the key says:

- the device and software stack, a :class:`DeviceKey` (GPU name, compute capability, SM count, CUDA,
  torch, triton and graphopt versions). It names the *file*: ``<slug>-<hash12>.json``, where the slug
  is readable (``nvidia-h100-80gb-hbm3-sm90``) and the hash covers every field, so an upgrade of any
  of them starts a fresh file instead of reusing stale timings;
- the kernel's name, the hash of its source and the bucketed problem shape name the *entry* inside
  the file; the entry also records the hash of the config family it was tuned over, so the tuner can
  tell when the family changed under an unchanged kernel.

File format (``version`` 1)::

    {"format": "graphopt-autotune-cache", "version": 1,
     "device": {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "sm_count": 132,
                "cuda_version": "12.4", "torch_version": "2.5.1", "triton_version": "3.1.0",
                "graphopt_version": "0.1.0"},
     "entries": [
       {"kernel": "attention_fwd", "source_hash": "3f2a...", "shape_bucket": [2, 8, 1024, 64],
        "configs_hash": "9c1e...", "best": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8},
        "timings": [{"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}, "time_ms": 0.212},
                    {"config": {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 4}, "time_ms": null,
                     "error": "OutOfResources: shared memory, required: 264192"}],
        "skipped": [], "tuned_at": 1718000000.0}]}

A failed config is stored with ``"time_ms": null`` (infinity in memory): JSON has no infinity and
Python's ``Infinity`` token is not JSON, so the writer refuses NaN/infinity outright
(``allow_nan=False``) and the reader rejects those tokens as corruption.

Listing every device's file, clearing, and bundles that copy one GPU's results to a fleet of
identical machines are the ``graphopt autotune`` command's verbs, in :mod:`.cache_admin`.

Concurrency and durability:

- Readers take no lock. Every write goes to a temporary file in the same directory, is fsync'ed and
  then ``os.replace``'d over the cache file; a rename within one file system is atomic, so a reader
  sees the old file or the new one, never half of one, and a crash mid-write leaves the old file.
- Writers serialise on an advisory ``fcntl.flock`` of ``<file>.lock`` around read-merge-write: the
  second writer re-reads the file the first one replaced and merges into it, so concurrent tuning
  runs never lose each other's entries. The lock file is never deleted: a process waiting on the old
  inode while another creates a new one would break mutual exclusion. (flock is per open file
  description, so it also serialises threads of one process; on NFS it depends on the server.)
- A file that does not parse, has the wrong format or version, or carries a device key other than its
  name says is reported with one :class:`CacheWarning` line naming the path and the reason, then
  treated as empty; the next write replaces it. The cache is an optimisation and never a reason to
  crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

try:  # POSIX only; Triton, and so tuning, is Linux-only anyway
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT = "graphopt-autotune-cache"
BUNDLE_FORMAT = "graphopt-autotune-bundle"
FORMAT_VERSION = 1

SYMBOLIC = -1
"""The bucket of a dimension whose size is not known (``None`` or a symbolic size such as ``torch.SymInt``)."""


class AutotuneError(GraphoptError):
    """Tuning could not produce a config (every config failed, a pruner left none, no GPU to time on)."""


class CacheWarning(UserWarning):
    """A cache file was ignored (corrupted, other format or version, wrong device key) or could not be written."""


# --------------------------------------------------------------------------------------------- values


class Config(Mapping[str, int]):
    """One kernel configuration: an immutable, hashable mapping of parameter name to int.

    ``Config({"BLOCK_M": 64, "num_warps": 4})`` or ``Config(BLOCK_M=64, num_warps=4)``. It compares
    equal to a dict with the same items and unpacks with ``**`` into a launcher. Keys are kept sorted
    so that equal configs have one JSON form and one hash.
    """

    __slots__ = ("_items",)
    _items: tuple[tuple[str, int], ...]

    def __init__(self, params: Mapping[str, int] | Iterable[tuple[str, int]] = (), /, **kwargs: int):
        merged = dict(params, **kwargs)
        for name, value in merged.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"config parameter names must be non-empty strings, got {name!r}")
            # bool is an Integral too, but True as a block size is a bug, not a value
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"config parameter {name!r} must be an int, got {value!r}")
        object.__setattr__(self, "_items", tuple(sorted((k, int(v)) for k, v in merged.items())))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Config is immutable")

    def __reduce__(self) -> tuple[type, tuple[dict[str, int]]]:
        # copy and pickle rebuild through __init__: the slot cannot be set from outside
        return Config, (dict(self._items),)

    def __getitem__(self, key: str) -> int:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Config):
            return self._items == other._items
        return Mapping.__eq__(self, other)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v}" for k, v in self._items) + ")"

    def to_json(self) -> dict[str, int]:
        return dict(self._items)


@dataclasses.dataclass(frozen=True)
class DeviceKey:
    """Everything about the machine a kernel timing depends on; names the cache file."""

    gpu_name: str
    compute_capability: tuple[int, int]
    sm_count: int
    cuda_version: str
    torch_version: str
    triton_version: str
    graphopt_version: str

    def __post_init__(self) -> None:
        # torch returns the capability as a tuple, JSON as a list; keep one form so keys compare equal
        object.__setattr__(self, "compute_capability", tuple(self.compute_capability))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        return data

    @staticmethod
    def from_json(data: object) -> DeviceKey:
        """Parse and validate; raises ``ValueError`` saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("device key is not an object")
        names = [f.name for f in dataclasses.fields(DeviceKey)]
        if sorted(data) != sorted(names):
            raise ValueError(f"device key fields are {sorted(data)}, expected {sorted(names)}")
        cc = data["compute_capability"]
        if not (isinstance(cc, list) and len(cc) == 2 and all(_is_int(c) for c in cc)):
            raise ValueError(f"compute_capability must be [major, minor], got {cc!r}")
        if not _is_int(data["sm_count"]):
            raise ValueError(f"sm_count must be an int, got {data['sm_count']!r}")
        for name in names:
            if name not in ("compute_capability", "sm_count") and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string, got {data[name]!r}")
        return DeviceKey(**{**data, "compute_capability": (cc[0], cc[1])})

    def digest(self) -> str:
        """12 hex digits of a SHA-256 over every field (canonical JSON)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def file_name(self) -> str:
        """``<gpu-name-slug>-sm<major><minor>-<digest>.json``: readable, and unique per key."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")[:48].rstrip("-") or "gpu"
        major, minor = self.compute_capability
        return f"{slug}-sm{major}{minor}-{self.digest()}.json"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return (f"{self.gpu_name} (sm_{major}{minor}, {self.sm_count} SMs, CUDA {self.cuda_version}, "
                f"torch {self.torch_version}, triton {self.triton_version}, graphopt {self.graphopt_version})")


@dataclasses.dataclass(frozen=True)
class Timing:
    """One config's measured time in milliseconds; ``math.inf`` with an ``error`` when it failed to run."""

    config: Config
    time_ms: float
    error: str = ""

    @property
    def failed(self) -> bool:
        return math.isinf(self.time_ms)


@dataclasses.dataclass(frozen=True)
class EntryKey:
    """What names an entry inside a device's file."""

    kernel: str
    source_hash: str
    shape_bucket: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """The tuning result for one (kernel, source hash, shape bucket) on one device.

    ``timings`` holds every config that was timed (failed ones at infinity), ``skipped`` the configs
    a time budget left untimed, ``best`` the chosen config (``None`` only if every timed config
    failed), ``configs_hash`` the hash of the config family it was chosen from and ``tuned_at`` the
    Unix time of the tuning run (the newer entry wins when bundles are merged).
    """

    kernel: str
    source_hash: str
    shape_bucket: tuple[int, ...]
    configs_hash: str
    timings: tuple[Timing, ...]
    best: Config | None
    skipped: tuple[Config, ...] = ()
    tuned_at: float = 0.0

    @property
    def key(self) -> EntryKey:
        return EntryKey(self.kernel, self.source_hash, self.shape_bucket)

    @property
    def best_time_ms(self) -> float:
        if self.best is None:
            return math.inf
        return next(t.time_ms for t in self.timings if t.config == self.best)

    @staticmethod
    def from_timings(kernel: str, source_hash: str, shape_bucket: Sequence[int], configs_hash: str,
                     timings: Iterable[Timing], skipped: Iterable[Config] = (), tuned_at: float = 0.0
                     ) -> CacheEntry:
        """Build an entry whose ``best`` is the fastest finite timing (the earliest one on a tie)."""
        timings = tuple(timings)
        finite = [t for t in timings if not t.failed]
        best = min(finite, key=lambda t: t.time_ms).config if finite else None
        return CacheEntry(kernel, source_hash, tuple(shape_bucket), configs_hash, timings, best,
                          tuple(skipped), tuned_at)

    def summary(self) -> str:
        """One line for listings."""
        failed = sum(t.failed for t in self.timings)
        best = "none" if self.best is None else f"{dict(self.best)} {self.best_time_ms:.4g} ms"
        extra = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (f"{self.kernel} src={self.source_hash[:12]} shape={list(self.shape_bucket)} best={best} "
                f"({len(self.timings)} timed, {failed} failed{extra})")

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel, "source_hash": self.source_hash, "shape_bucket": list(self.shape_bucket),
            "configs_hash": self.configs_hash, "best": None if self.best is None else self.best.to_json(),
            "timings": [_timing_to_json(t) for t in self.timings],
            "skipped": [c.to_json() for c in self.skipped], "tuned_at": self.tuned_at,
        }

    @staticmethod
    def from_json(data: object) -> CacheEntry:
        """Parse and validate; raises ``ValueError`` saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("entry is not an object")
        missing = {"kernel", "source_hash", "shape_bucket", "configs_hash", "best", "timings"} - set(data)
        if missing:
            raise ValueError(f"entry lacks {sorted(missing)}")
        for name in ("kernel", "source_hash", "configs_hash"):
            if not isinstance(data[name], str):
                raise ValueError(f"entry {name} must be a string, got {data[name]!r}")
        bucket = data["shape_bucket"]
        if not (isinstance(bucket, list) and all(_is_int(d) and d >= SYMBOLIC for d in bucket)):
            raise ValueError(f"shape_bucket must be a list of ints, got {bucket!r}")
        if not isinstance(data["timings"], list) or not isinstance(data.get("skipped", []), list):
            raise ValueError("timings and skipped must be lists")
        timings = tuple(_timing_from_json(t) for t in data["timings"])
        skipped = tuple(_config_from_json(c) for c in data.get("skipped", []))
        best = None if data["best"] is None else _config_from_json(data["best"])
        # best is stored rather than recomputed so a person can pin a config by editing the file,
        # but it must still name a config that ran
        if best is not None and not any(t.config == best and not t.failed for t in timings):
            raise ValueError(f"best config {dict(best)} is not among the entry's successful timings")
        tuned_at = data.get("tuned_at", 0.0)
        if not isinstance(tuned_at, (int, float)) or isinstance(tuned_at, bool):
            raise ValueError(f"tuned_at must be a number, got {tuned_at!r}")
        return CacheEntry(data["kernel"], data["source_hash"], tuple(bucket), data["configs_hash"], timings,
                          best, skipped, float(tuned_at))


def shape_bucket(shape: Iterable[int | None | object]) -> tuple[int, ...]:
    """Bucket each dimension to the next power of two, so that a few entries cover every shape.

    Rule, for every dimension including the batch: ``0 -> 0`` (empty tensors are their own case),
    ``n >= 1 -> 2**ceil(log2 n)`` (1, 2, 3..4, 5..8, ...), and a size that is not a concrete integer
    (``None`` or a symbolic size such as ``torch.SymInt``) -> :data:`SYMBOLIC` (-1). The batch is
    bucketed like any other dimension rather than specialised: a graph captured with a dynamic batch
    then needs only log2(max batch) entries, and code holding a symbolic batch can still ask for (and
    store) the ``-1`` bucket without forcing the size to a concrete value, which would add a guard.
    Timings are taken at the first concrete shape seen in a bucket and stand for the whole bucket.
    """
    out = []
    for d in shape:
        # numbers.Integral admits numpy ints; torch.SymInt is deliberately not an Integral
        if d is None or isinstance(d, bool) or not isinstance(d, numbers.Integral):
            out.append(SYMBOLIC)
            continue
        n = int(d)
        if n < 0:
            raise ValueError(f"negative dimension {n} in shape {tuple(shape)!r}")
        out.append(0 if n == 0 else 1 << (n - 1).bit_length())
    return tuple(out)


def cache_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the per-GPU files.

    ``directory`` if given; else ``$GRAPHOPT_CACHE_DIR/autotune`` (graphopt's cache root, so later
    caches can live beside this one); else ``$XDG_CACHE_HOME/graphopt/autotune`` when that is an
    absolute path (the XDG spec says to ignore a relative one); else ``~/.cache/graphopt/autotune``.
    """
    if directory is not None:
        return Path(directory).expanduser()
    return cache_root() / "autotune"


def cache_root() -> Path:
    """graphopt's cache root: ``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt`` when that is an
    absolute path, else ``~/.cache/graphopt``."""
    root = os.environ.get("GRAPHOPT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "graphopt"


# --------------------------------------------------------------------------------------------- one device


class TuningCache:
    """One device's tuning results, stored in ``cache_dir(directory) / device.file_name()``.

    The object holds only the key and the path; every ``get`` re-reads the file so that results
    another process stored meanwhile are seen, and every ``put`` merges under the lock.
    """

    def __init__(self, device: DeviceKey, directory: str | os.PathLike[str] | None = None):
        self.device = device
        self.directory = cache_dir(directory)
        self.path = self.directory / device.file_name()

    def __repr__(self) -> str:
        return f"TuningCache({self.device.describe()}, path={str(self.path)!r})"

    def get(self, kernel: str, source_hash: str, bucket: Sequence[int]) -> CacheEntry | None:
        """The stored entry, or ``None`` (also when the file is unreadable, after one warning)."""
        return self._read().get(EntryKey(kernel, source_hash, tuple(bucket)))

    def entries(self) -> tuple[CacheEntry, ...]:
        """Every entry, sorted by kernel, source hash and bucket."""
        return tuple(sorted(self._read().values(), key=_sort_key))

    def put(self, entry: CacheEntry) -> None:
        """Store ``entry``, replacing any entry with the same key (the new tuning run is authoritative)."""
        self.merge([entry], prefer_newer=False)

    def merge(self, entries: Iterable[CacheEntry], *, prefer_newer: bool = True) -> int:
        """Merge ``entries`` into the file under the lock; returns how many were written.

        With ``prefer_newer`` an incoming entry replaces a stored one with the same key only if it was
        tuned no earlier (``tuned_at``), so importing an old bundle does not undo a newer local run.
        """
        entries = list(entries)
        with self._locked():
            stored = self._read()
            written = 0
            for entry in entries:
                old = stored.get(entry.key)
                if prefer_newer and old is not None and old.tuned_at > entry.tuned_at:
                    continue
                stored[entry.key] = entry
                written += 1
            _write_json_atomic(self.path, _file_doc(self.device, stored.values()))
        return written

    def clear(self) -> bool:
        """Delete this device's file (and any temporary files a killed writer left); ``True`` if it existed."""
        if not self.directory.is_dir():
            return False
        with self._locked():
            for stale in self.directory.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            existed = self.path.exists()
            self.path.unlink(missing_ok=True)
        return existed

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        return _lock_path(self.path)

    def _read(self) -> dict[EntryKey, CacheEntry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            # OSError's str repeats the path the warning already names
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            _report(self.path, f"unreadable ({type(e).__name__}: {detail})")
            return {}
        try:
            device, entries = _parse_file_doc(_loads(text))
            if device != self.device:
                raise ValueError(f"its device key is {device.describe()}, expected {self.device.describe()}")
        except ValueError as e:
            _report(self.path, str(e))
            return {}
        return entries


# --------------------------------------------------------------------------------------------- helpers


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sort_key(e: CacheEntry) -> tuple[str, str, tuple[int, ...]]:
    return (e.kernel, e.source_hash, e.shape_bucket)


def _report(path: Path, reason: str) -> None:
    warnings.warn(f"ignoring tuning cache {path}: {reason}", CacheWarning, stacklevel=2)


def _reject_constant(token: str) -> float:
    raise ValueError(f"non-JSON number {token}")


def _loads(text: str) -> object:
    """``json.loads`` that rejects NaN/Infinity and reports every failure as ``ValueError``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None


def _config_from_json(data: object) -> Config:
    if not isinstance(data, dict):
        raise ValueError(f"config must be an object, got {data!r}")
    try:
        return Config(data)
    except TypeError as e:
        raise ValueError(str(e)) from None


def _timing_to_json(t: Timing) -> dict[str, Any]:
    out: dict[str, Any] = {"config": t.config.to_json(), "time_ms": None if t.failed else t.time_ms}
    if t.error:
        out["error"] = t.error
    return out


def _timing_from_json(data: object) -> Timing:
    if not isinstance(data, dict) or "config" not in data or "time_ms" not in data:
        raise ValueError(f"timing must be an object with config and time_ms, got {data!r}")
    t = data["time_ms"]
    if t is None:
        t = math.inf
    elif isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise ValueError(f"time_ms must be a non-negative number or null, got {t!r}")
    error = data.get("error", "")
    if not isinstance(error, str):
        raise ValueError(f"timing error must be a string, got {error!r}")
    return Timing(_config_from_json(data["config"]), float(t), error)


def _file_doc(device: DeviceKey, entries: Iterable[CacheEntry]) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": FORMAT_VERSION, "device": device.to_json(),
            "entries": [e.to_json() for e in sorted(entries, key=_sort_key)]}


def _parse_file_doc(doc: object) -> tuple[DeviceKey, dict[EntryKey, CacheEntry]]:
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a {CACHE_FORMAT} document")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {doc.get('version')!r}, this graphopt reads {FORMAT_VERSION}")
    device = DeviceKey.from_json(doc.get("device"))
    if not isinstance(doc.get("entries"), list):
        raise ValueError("'entries' must be a list")
    entries: dict[EntryKey, CacheEntry] = {}
    for i, item in enumerate(doc["entries"]):
        try:
            entry = CacheEntry.from_json(item)
        except ValueError as e:
            raise ValueError(f"entries[{i}]: {e}") from None
        entries[entry.key] = entry
    return device, entries


@contextlib.contextmanager
def _lock_path(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` (created if missing, never deleted)."""
    if fcntl is None:  # pragma: no cover - Windows
        raise AutotuneError("the tuning cache needs fcntl.flock (POSIX) to write safely")
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _umask() -> int:
    # /proc reads the umask without changing it; os.umask can only read by setting, which would
    # briefly give other threads' new files mode 0o777
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_json_atomic(path: Path, doc: object) -> None:
    """Write ``doc`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # without it a power loss can leave the renamed file empty
        # mkstemp creates owner-only files; the cache gets the umask's usual mode like any other file
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
