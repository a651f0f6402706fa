"""Generated forwards stored per machine: a saved model's next GPU load starts from them.

Where it belongs: between :func:`graphopt.load` (``target="cuda"``) and :mod:`.runtime`. Loading a
save onto the GPU reads its program (``torch.export.load``, about 2 s, most of it importing torch's
compiler stack), lowers it (region analysis, Triton source, each kernel checked against its ATen ops)
and, on the first call, writes a Python forward for the call's input layout. None of that changes
between two loads of the same save on the same machine, so the first such load stores what it made:

- the forwards (:class:`~.runtime.Portable`: every kernel launched through ``kernel[grid]``), for the
  first call's layout and the saved example inputs' layout, as Python source;
- what each name in them stands for: a weight (where its bytes lie in ``model.pt2``, found and
  checked byte for byte when stored), an ATen or graphopt op, a dtype, a device, a Triton kernel
  (graphopt's own, by module and name, or a generated one, whose source is stored beside);
- the forward's outputs on the example inputs, and the lowering report.

A forward that needs anything else (a Python module of the model, a constant no file holds) is not
stored. The entry's name is a SHA-256 over the save's own digest (graphopt.json's ``sha256``, which
covers every file and weight) and the machine: GPU, CUDA, torch, Triton, graphopt (and a digest of its
code), the tuning cache's content. Any change to either gives another name, so a stale entry is never
read; entries are written whole or not at all (a temporary folder renamed into place).

The next load finds the entry, reads the weights straight from ``model.pt2`` (after the save's hashes
matched, as always), executes the stored sources, and runs the forward for the example inputs against
the outputs stored with it. Calls in a stored layout are served from then on (on a GPU, the first call
in each layout binds its launches to the compiled kernels, :mod:`.rebind`); the program is read and
lowered as before the first time anything else needs it (another layout, the weights as parameters,
tuning), and the forward then written for a new layout joins the entry (:func:`extend`, up to eight). An
entry that cannot be used (unreadable, not reproducing its outputs, not this user's alone) is passed
over with a warning, the load goes the long way, and its first forward replaces the entry.

The cache is this user's, as Triton's kernel cache is: its sources are executed, so an entry is
written owner-only and one anyone else could have changed (another owner, writable by group or others,
a symlink) is not read. It lives under graphopt's cache root (``$GRAPHOPT_CACHE_DIR``, else
``~/.cache/graphopt``) in ``forwards/``; removing that folder is always safe (``graphopt autotune
--clear`` does), and ``GRAPHOPT_STORED_FORWARDS=0`` leaves it unused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .cache import cache_dir, cache_root
from .launches import Streams, contiguous_strides
from .runtime import GeneratedForward, Layout, Portable, launch_streams, layout_of

FORMAT = 1
ENTRY = "entry.json"
OUTPUTS = "outputs.safetensors"
GENERATED = "graphopt_generated."  # the module prefix of kernels loaded from generated source (sites.KernelLibrary)


class NotStored(Exception):
    """Why a forward or its weights cannot be stored (the reason is the message)."""


def enabled() -> bool:
    """Whether loads read and store forwards (``GRAPHOPT_STORED_FORWARDS=0`` turns both off)."""
    return os.environ.get("GRAPHOPT_STORED_FORWARDS", "1") != "0"


def store_dir() -> Path:
    """Where entries live: ``forwards/`` under graphopt's cache root."""
    return cache_root() / "forwards"


def entry_name(save_digest: str) -> str:
    """The entry for the save with graphopt.json digest ``save_digest`` on this machine."""
    canonical = json.dumps({"format": FORMAT, "save": save_digest, "machine": machine()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def machine() -> dict[str, Any]:
    """What a stored forward depends on besides the save."""
    import triton

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device = {"gpu": props.name, "capability": list(torch.cuda.get_device_capability()),
                  "sm_count": props.multi_processor_count, "cuda": torch.version.cuda}
    else:
        device = {"gpu": "Triton interpreter"}
    return {**device, "torch": torch.__version__, "triton": triton.__version__, "graphopt": _code_digest(),
            "tuning": _tuning_digest()}


@cache
def _code_digest() -> str:
    """graphopt's version and a digest of its own code: a development install changes without a release."""
    from graphopt import __version__

    digest = hashlib.sha256(__version__.encode())
    roots = {Path(folder) for p in ("graphopt", "graphopt.autotune", "graphopt.passes")
             for folder in (importlib.util.find_spec(p).submodule_search_locations or ())}  # type: ignore[union-attr]
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def _tuning_digest() -> str:
    """The tuning cache's content: a new tuning changes the configs a forward bakes in."""
    digest = hashlib.sha256()
    folder = cache_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- writing


def describe(portable: Portable, weights: dict[str, dict[str, Any]], sources: dict[str, str]) -> dict[str, Any]:
    """What each name of ``portable``'s namespace stands for, as JSON; the weights it needs are added
    to ``weights`` (by graph attribute) and generated kernel sources to ``sources``. Raises
    :class:`NotStored` for a name that cannot be rebuilt."""
    names: dict[str, Any] = {}
    for name, value in portable.namespace.items():
        if name in ("__builtins__", portable.name, "torch"):
            continue
        if name in portable.attrs and isinstance(value, torch.Tensor):
            names[name] = {"weight": portable.attrs[name]}
            weights.setdefault(portable.attrs[name], {})
        elif isinstance(value, torch.dtype):
            names[name] = {"dtype": str(value).removeprefix("torch.")}
        elif isinstance(value, torch.device):
            names[name] = {"device": str(value)}
        elif isinstance(value, torch._ops.OpOverload):
            names[name] = {"op": [value.namespace, value._opname, value._overloadname]}
        elif callable(getattr(value, "fn", None)) and hasattr(value, "run"):  # a Triton kernel
            names[name] = _kernel(value, sources)
        else:
            raise NotStored(f"{name} is a {type(value).__name__}, which a stored forward cannot rebuild")
    return names


def _kernel(kernel: Any, sources: dict[str, str]) -> dict[str, str]:
    fn = kernel.fn
    module = fn.__module__
    if module.startswith(GENERATED):
        stem = module.removeprefix(GENERATED)
        sources[stem] = Path(inspect.getsourcefile(fn) or "").read_text()
        return {"kernel": fn.__name__, "generated": stem}
    if getattr(importlib.import_module(module), fn.__name__, None) is not kernel:
        raise NotStored(f"kernel {fn.__name__} is not {module}.{fn.__name__}")
    return {"kernel": fn.__name__, "module": module}


def locate_weights(program: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Where each of ``tensors`` (by graph attribute, the program's state-dict names) lies in the
    archive ``program`` as raw bytes, checked byte for byte; :class:`NotStored` when one does not."""
    located: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(program) as archive:
        table: dict[str, str] = {}
        for config in archive.namelist():
            if config.endswith(("/model_weights_config.json", "/model_constants_config.json")):
                folder = config.rsplit("/", 1)[0]
                for fqn, spec in json.loads(archive.read(config)).get("config", {}).items():
                    if isinstance(spec, dict) and not spec.get("use_pickle", True) and "path_name" in spec:
                        table[fqn] = f"{folder}/{spec['path_name']}"
        for attr, tensor in tensors.items():
            entry = table.get(attr)
            if entry is None:
                raise NotStored(f"weight {attr} is not held in {program.name} as raw bytes")
            want = tensor.detach().cpu()
            raw = _raw(archive, entry, want.dtype)
            for strides, offset in ((want.stride(), want.storage_offset()), (contiguous_strides(want.shape), 0)):
                try:
                    got = raw.as_strided(want.shape, strides, offset)
                except RuntimeError:
                    continue
                if torch.equal(got, want):
                    located[attr] = {"entry": entry, "dtype": str(want.dtype).removeprefix("torch."),
                                     "shape": list(want.shape), "strides": list(strides), "offset": offset,
                                     "device_strides": list(tensor.stride())}
                    break
            else:
                raise NotStored(f"weight {attr}: the bytes of {entry} in {program.name} are not its values")
    return located


def _raw(archive: zipfile.ZipFile, entry: str, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``entry`` as a flat tensor of ``dtype``, read once into memory torch can own."""
    data = bytearray(archive.getinfo(entry).file_size)
    with archive.open(entry) as f:
        f.readinto(data)  # type: ignore[attr-defined]
    whole = len(data) // dtype.itemsize * dtype.itemsize
    if not whole:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8, count=whole).view(dtype)


def write(name: str, portables: Sequence[Portable], program: Path, outputs: Sequence[torch.Tensor],
          lowering: dict[str, Any] | None, *, replace: bool = False) -> Path:
    """Store ``portables`` (the first is for the example inputs, whose forward gave ``outputs``) as
    entry ``name``; returns its folder. An entry of that name already there is kept unless ``replace``
    (it could not be used). Raises :class:`NotStored` (nothing written) when they cannot be stored."""
    forwards, files, weights = _described(portables, program, first=0)

    def fill(tmp: Path) -> None:
        _write_files(tmp, files)
        safetensors.torch.save_file({f"output_{i}": t.detach().cpu().contiguous() for i, t in enumerate(outputs)},
                                    str(tmp / OUTPUTS))
        entry = {"format": FORMAT, "forwards": forwards, "weights": weights, "lowering": lowering,
                 "outputs": len(outputs)}
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))  # last: a folder without it is no entry

    return _commit(name, fill, replace=replace)


def extend(name: str, portable: Portable, program: Path, limit: int = 8) -> bool:
    """Add ``portable`` (a layout met after entry ``name`` was stored) to that entry, up to ``limit``
    forwards; whether it was added (not when its layout is there already, or the entry is full or gone).
    Raises :class:`NotStored` when it cannot be stored."""
    folder = store_dir() / name
    if not (folder / ENTRY).is_file():
        return False
    _check_own(folder)
    entry = json.loads((folder / ENTRY).read_text())
    if entry.get("format") != FORMAT or len(entry["forwards"]) >= limit or \
            _layout_json(portable.layout) in [f["layout"] for f in entry["forwards"]]:
        return False
    forwards, files, weights = _described([portable], program, first=len(entry["forwards"]))
    entry = {**entry, "forwards": entry["forwards"] + forwards, "weights": {**entry["weights"], **weights}}

    def fill(tmp: Path) -> None:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _write_files(tmp, files)
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))

    _commit(name, fill, replace=True)
    return True


def _described(portables: Sequence[Portable], program: Path, first: int
               ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, Any]]]:
    """The entry's records of ``portables`` (numbered from ``first``), the files they need by path, and
    where their weights lie in ``program``."""
    weights: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    forwards = [{"name": p.name, "file": f"forward_{first + i}.py", "layout": _layout_json(p.layout),
                 "names": describe(p, weights, sources)} for i, p in enumerate(portables)]
    values = {attr: value for p in portables for n, attr in p.attrs.items()
              if isinstance(value := p.namespace.get(n), torch.Tensor)}
    files = {f"kernels/{stem}.py": text for stem, text in sources.items()}
    files.update({f["file"]: p.source for f, p in zip(forwards, portables)})
    return forwards, files, locate_weights(program, {attr: values[attr] for attr in weights})


def _write_files(folder: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)


def _commit(name: str, fill: Callable[[Path], None], *, replace: bool) -> Path:
    """Fill a temporary folder, make it this user's alone and put it in place as entry ``name``, whole:
    ``replace`` swaps out an entry that is there (as a save replaces a save), otherwise one that another
    process stored first is kept."""
    from graphopt.saved import _swap_in

    root = store_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        fill(tmp)
        for path in (tmp, *tmp.rglob("*")):  # this user's alone to change: its sources are executed
            path.chmod(0o700 if path.is_dir() else 0o600)
        if replace:
            _swap_in(tmp, final)
        else:
            try:
                os.replace(tmp, final)
            except OSError:  # another process stored the same entry first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clear() -> int:
    """Delete every stored entry (and what a killed writer left); returns how many entries there were."""
    root = store_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        if folder.is_dir():
            removed += not folder.name.startswith(".") and (folder / ENTRY).is_file()
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def _layout_json(layout: Layout) -> list[list[Any]]:
    return [[list(shape), list(strides), str(dtype).removeprefix("torch."), str(device)]
            for shape, strides, dtype, device in layout]


# ------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class StoredForwards:
    """Calls served by stored forwards: ``served(tensors)`` gives the outputs, or ``None`` for inputs
    in a layout none was written for. ``lowering`` is the report of the lowering they came from.

    On a GPU the first call in each layout binds that forward's launches to the kernels Triton
    compiled (:func:`~.rebind.bind`), as the runtime's own forwards are; ``direct_launch`` as for
    :class:`~.runtime.Runtime`. ``bound`` holds the forwards so bound, by layout.
    """

    portables: dict[Layout, Portable]
    lowering: dict[str, Any] | None
    folder: Path
    program: Path
    direct_launch: bool | Streams = True
    bound: dict[Layout, GeneratedForward] = dataclasses.field(default_factory=dict)
    _unbound: set[Layout] = dataclasses.field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._unbound = set(self.portables)

    @property
    def forwards(self) -> dict[Layout, Any]:
        """The stored forwards (their ``kernel[grid]`` form) by layout."""
        return {layout: p.namespace[p.name] for layout, p in self.portables.items()}

    def accepts(self, tensors: Sequence[torch.Tensor]) -> bool:
        return layout_of(tensors) in self.portables

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        layout = layout_of(tensors)
        portable = self.portables.get(layout)
        if portable is None:
            return None
        if layout in self._unbound:
            self._unbound.discard(layout)
            if (streams := launch_streams(tensors, self.direct_launch)) is not None:
                from .rebind import bind

                out, forward = bind(portable, tensors, streams, dump_dir=os.environ.get("GRAPHOPT_DUMP_KERNELS"))
                if forward is not None:
                    self.bound[layout] = forward
                if out is not None:
                    return out
        forward = self.bound.get(layout)
        if forward is not None and (out := forward.fn(*tensors)) is not None:
            return out
        # bound for another current device or aligned inputs: kernel[grid] launches run anywhere
        return portable.namespace[portable.name](*tensors)


def read(name: str, program: Path, device: torch.device) -> StoredForwards | None:
    """Entry ``name``'s forwards, their weights read from ``program`` onto ``device``; ``None`` when there
    is no such entry. Raises on an entry that is there but unusable."""
    folder = store_dir() / name
    if not (folder / ENTRY).is_file():
        return None
    _check_own(folder)
    entry = json.loads((folder / ENTRY).read_text())
    if entry.get("format") != FORMAT:
        raise ValueError(f"entry format {entry.get('format')!r}, this graphopt reads {FORMAT}")
    weights = _read_weights(program, entry["weights"], device)
    portables: dict[Layout, Portable] = {}
    modules: dict[str, Any] = {}
    for forward in entry["forwards"]:
        namespace: dict[str, Any] = {"torch": torch}
        for n, spec in forward["names"].items():
            namespace[n] = _rebuild(spec, weights, folder, modules)
        path = folder / forward["file"]
        source = path.read_text()
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - this user's own cache
        layout = tuple((tuple(shape), tuple(strides), getattr(torch, dtype), torch.device(dev))
                       for shape, strides, dtype, dev in forward["layout"])
        portables[layout] = Portable(forward["name"], source, namespace, {}, layout)
    return StoredForwards(portables, entry.get("lowering"), folder, program)


def _check_own(folder: Path) -> None:
    """Refuse an entry someone else could have written: its sources are executed."""
    for path in (folder, *folder.rglob("*")):
        st = path.lstat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022 or path.is_symlink():
            raise PermissionError(f"{path} is not this user's alone (owner {st.st_uid}, mode {st.st_mode & 0o777:o}); "
                                  "a stored forward is executed, so it is not read")


def expected_outputs(stored: StoredForwards) -> tuple[torch.Tensor, ...]:
    """The outputs the example inputs' forward gave when it was stored."""
    tensors = safetensors.torch.load_file(str(stored.folder / OUTPUTS))
    return tuple(tensors[f"output_{i}"] for i in range(len(tensors)))


def _read_weights(program: Path, weights: dict[str, dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    with zipfile.ZipFile(program) as archive:
        for attr, spec in weights.items():
            dtype = getattr(torch, spec["dtype"])
            value = _raw(archive, spec["entry"], dtype).as_strided(spec["shape"], spec["strides"], spec["offset"])
            placed = torch.empty_strided(spec["shape"], spec["device_strides"], dtype=dtype, device=device)
            out[attr] = placed.copy_(value)
    return out


def _rebuild(spec: dict[str, Any], weights: dict[str, torch.Tensor], folder: Path, modules: dict[str, Any]) -> Any:
    if "weight" in spec:
        return weights[spec["weight"]]
    if "dtype" in spec:
        return getattr(torch, spec["dtype"])
    if "device" in spec:
        return torch.device(spec["device"])
    if "op" in spec:
        namespace, op, overload = spec["op"]
        if namespace == "graphopt":
            import graphopt.ops  # noqa: F401 - registers torch.ops.graphopt.*
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    if "generated" in spec:
        stem = spec["generated"]
        if stem not in modules:
            path = folder / "kernels" / f"{stem}.py"
            loader = importlib.util.spec_from_file_location(f"{GENERATED}{stem}", path)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            modules[stem] = module
        return getattr(modules[stem], spec["kernel"])
    if "module" in spec:
        return getattr(importlib.import_module(spec["module"]), spec["kernel"])
    raise ValueError(f"unknown name in a stored forward: {spec}")
