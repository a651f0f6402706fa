"""Buffer reuse in a generated forward.

Where it belongs: :mod:`.runtime`'s writer asks a :class:`BufferPlanner` for each allocation it
writes (a kernel call site's outputs and workspaces) and hands it each ``del`` it would write. A
storage the forward allocated is dead once no live name views it; the last name viewing it is then
not deleted but kept as a free buffer, and the next allocation of the same size in bytes, dtype and
device takes it over: ``buf = free`` where the layout is the same, else
``buf = free.as_strided(shape, strides, 0)``. Such a reuse costs a name binding instead of a trip
through PyTorch's caching allocator (``as_strided`` costs about what an allocation does); a DiT-S/2's
forward reuses 46 of its 64 allocations. A kept buffer that no later allocation takes over is
deleted where it was kept, so none is held longer than without reuse.

Which names view which storage is read off the generating run (:class:`~.runtime._Recorder`): every
node's tensors are keyed by their storage's device and address (:func:`storage_keys`), and a value
whose key is that of a live planned storage is one of its views (two live storages never share an
address; a dead one's address may come back from the allocator, so only live storages match). The
forward is specialised on its inputs' layout, so the views a node makes are those it made then.
Graph outputs are never deleted, so a storage an output views never comes free.

Only the forward's own allocations are planned. Matmuls keep ATen's functional calls: their ``out=``
forms (``addmm`` / ``mm`` into a planned buffer, on the input viewed as a matrix, which is what
``aten.linear`` computes) were tried and cost more host time than the allocation they save (two
``view`` calls per matmul: 4-9% more host time per call for a DiT-S/2 on a CPU, ``bench/runtime.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

StorageKey = tuple[torch.device, int]
"""A recorded tensor's storage: its device and base address on the generating run."""

Geometry = tuple[tuple[int, ...], tuple[int, ...]]
"""A tensor's shape and strides."""


def storage_key(t: torch.Tensor) -> StorageKey | None:
    """The storage ``t`` views, or ``None`` for a tensor holding no memory (nothing to alias)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, and tensor subclasses without one storage
        return None
    return None if storage.nbytes() == 0 else (t.device, storage.data_ptr())


def storage_keys(value: Any) -> tuple[StorageKey | None, ...]:
    """The storage of each tensor in ``value`` (a tensor, or a tuple/list of them), in flat order."""
    return tuple(storage_key(v) if isinstance(v, torch.Tensor) else None for v in pytree.tree_leaves(value))


def extent_bytes(shape: Sequence[int], strides: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of the storage ``torch.empty_strided(shape, strides, dtype=dtype)`` allocates."""
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, strides))) * dtype.itemsize


@dataclasses.dataclass
class _Storage:
    size: tuple[int, torch.dtype, torch.device]
    """Bytes, dtype, device: the allocations it can serve once free."""
    owner: str
    geometry: Geometry
    names: set[str]


@dataclasses.dataclass
class BufferStats:
    """What a forward's allocations came to."""

    allocations: int = 0
    """Allocations written (kernel call sites' outputs and workspaces)."""
    reused: int = 0
    """Those served by a dead buffer instead of a new one."""
    reused_bytes: int = 0


class BufferPlanner:
    """Allocations, views and deletions of one generated forward, with dead buffers reused.

    ``enabled=False`` writes every allocation as ``torch.empty_strided`` and every deletion as it comes.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stats = BufferStats()
        self._of_name: dict[str, list[_Storage]] = {}
        self._recorded: dict[StorageKey, _Storage] = {}
        self._free: dict[tuple[int, torch.dtype, torch.device], list[tuple[str, _Storage]]] = {}
        self._containers: set[str] = set()  # names of tuples/lists viewing planned storages
        self.taken: set[str] = set()
        """Names kept as free buffers that a later allocation took over (the others are deleted where
        they were kept: see :meth:`release`)."""

    def allocate(self, name: str, shape: Sequence[int], strides: Sequence[int], dtype: torch.dtype,
                 device: torch.device, expr: Callable[[Any], str], *, zero: bool = False,
                 recorded: StorageKey | None = None) -> list[str]:
        """The lines binding ``name`` to a buffer of this layout (zero-filled with ``zero``).

        ``expr`` writes a dtype or device as the source names it; ``recorded``: the storage the buffer
        had on the generating run, by which later values are found to view it.
        """
        shape, strides = tuple(shape), tuple(strides)
        fill = ".zero_()" if zero else ""
        size = (extent_bytes(shape, strides, dtype), dtype, device)
        self.stats.allocations += 1
        free = self._free.get(size) if self.enabled and size[0] else None
        if free:
            old, storage = free.pop()
            self.taken.add(old)
            self.stats.reused += 1
            self.stats.reused_bytes += size[0]
            same = old == storage.owner and storage.geometry == (shape, strides)
            view = old if same else f"{old}.as_strided({shape!r}, {strides!r}, 0)"
            lines = [f"{name} = {view}{fill}  # reuses {storage.owner}'s buffer", f"del {old}"]
        else:
            lines = [f"{name} = torch.empty_strided({shape!r}, {strides!r}, dtype={expr(dtype)}, "
                     f"device={expr(device)}){fill}"]
        if self.enabled and size[0]:
            storage = _Storage(size, name, (shape, strides), {name})
            self._of_name[name] = [storage]
            if recorded is not None:
                self._recorded[recorded] = storage
        return lines

    def alias(self, name: str, recorded: Sequence[StorageKey | None], tensor: bool) -> None:
        """``name`` was just bound to a value whose tensors had the storages ``recorded`` on the
        generating run: it views each live planned storage among them. ``tensor``: the value is one
        tensor (only such a name can hand its storage on)."""
        for key in recorded:
            storage = self._recorded.get(key) if key is not None else None
            if storage is not None and storage.names and name not in storage.names:
                storage.names.add(name)
                self._of_name.setdefault(name, []).append(storage)
        if not tensor and name in self._of_name:
            self._containers.add(name)

    def release(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """(deleted, kept) of ``names`` at their last use: a name that was the last view of a planned
        storage stays bound as a free buffer, when it is a tensor. A kept name that no later allocation
        takes over (not in :attr:`taken` once the forward is written) is to be deleted where it was kept,
        so that a buffer no allocation wants is not held to the end."""
        deleted, kept = [], []
        for name in names:
            for storage in self._of_name.pop(name, ()):
                storage.names.discard(name)
                if not storage.names and name not in kept and name not in self._containers:
                    self._free.setdefault(storage.size, []).append((name, storage))
                    kept.append(name)
            self._containers.discard(name)
            if name not in kept:
                deleted.append(name)
        return deleted, kept
