"""Saved models: the folder format, written atomically and proven intact when read back.

A save is a folder holding ``model.pt2`` (torch.export's format: the program and its weights,
loaded without unpickling code), ``examples.safetensors`` (example inputs and the original model's
outputs on them), ``report.json``, ``plan.json`` when a sampling plan goes with the model, and
``graphopt.json`` (the call structure, the input guards, the weights' dtype, the original model's
class and config where it is a dict of JSON values, and the integrity record), written last.

The integrity record holds a SHA-256 of every other file, of every weight tensor of the program,
of its graph, and of graphopt.json's own content. :func:`load` checks all of them before it trusts
anything, so a flipped byte, a truncated or deleted file or an edited input spec is one clear
:class:`~graphopt.errors.LoadError` naming what changed (the weight, the file, the metadata); then
it runs the program on the saved example inputs, a second line of defence. A compiled CPU program
(``model.aoti.pt2``) that this machine runs serves calls as soon as it has reproduced the saved
outputs, and so do the GPU forwards an earlier load stored on this machine
(:mod:`graphopt.autotune.stored`); the program in ``model.pt2`` is read, with the same checks, when
something first needs it.

A save is written under a temporary name and swapped in atomically (Linux's RENAME_EXCHANGE where
available), so a save that fails or is killed leaves the previous one intact; leftovers of a killed
save are removed by the next save to the same folder. ``overwrite`` replaces only a folder that is
a graphopt save or empty: never a folder holding anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import safetensors.torch
import torch

from . import cudagraphs, structure
from .capture import CallSpec, CapturedGraph, InputGuards, _annotate_modules, _guards
from .errors import LoadError, OutputPathError, SaveError, UsageError, first_line, no_folder
from .fxgraph import move_to
from .logs import quiet

FORMAT = "graphopt-optimized"
FORMAT_VERSION = 2  # 2: the integrity record (hashes of files, weights, graph and metadata)
META = "graphopt.json"
PROGRAM = "model.pt2"
EXAMPLES = "examples.safetensors"
REPORT = "report.json"
PLAN = "plan.json"
COMPILED = "model.aoti.pt2"  # graphopt.compiled.PACKAGE: Inductor's CPU program, when compiled
SAVE_FILES = frozenset({META, PROGRAM, EXAMPLES, REPORT, PLAN, COMPILED})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def save(module: Any, directory: str | os.PathLike, *, overwrite: bool = False, plan: Any = None) -> Path:
    """Save ``module`` (an :class:`~graphopt.emit.OptimizedModule`) to ``directory``; returns the path.

    A failure, or the process being killed, leaves neither a partial nor a clobbered folder: the
    previous save (if any) stays whole until the new one replaces it in one step. A
    :class:`~graphopt.plan.SamplingPlan` for the module goes beside it as ``plan.json``
    (``SamplingPlan.load(directory)`` reads it back).
    """
    from .emit import export_program

    target = Path(directory)
    check_save_target(target, overwrite)
    captured = module.captured
    call = captured.call
    if structure.has_objects(call.in_spec):
        raise SaveError("the captured arguments hold non-JSON objects "
                        f"({structure.describe(call.in_spec)}); pass such settings as numbers, strings or tensors")
    defaults_spec, default_tensors, default_objects = structure.flatten(call.defaults)
    if default_tensors or default_objects:
        raise SaveError("a forward() default is a tensor or an object; graphopt saves only plain defaults")
    if plan is not None:
        plan.check(module)
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "graphopt_version": _version(), "torch_version": torch.__version__,
        "params": [list(p) for p in call.params], "defaults": defaults_spec,
        "in_spec": call.in_spec, "out_spec": call.out_spec, "extras": list(call.extras),
        "dynamic_batch": captured.dynamic_batch,
    }
    if module.source_info is not None:  # the original's class and config, read back as the loaded module's
        meta["source"] = module.source_info.to_json()
    if module.routing is not None:  # a subnet's routing: which calls skip which blocks
        meta["routing"] = module.routing.to_json()
    _remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        if plan is not None:
            plan.save(tmp / PLAN)
        program = export_program(captured)
        torch.export.save(program, tmp / PROGRAM)
        # clones: an output may be a view of an input, and safetensors refuses tensors sharing memory
        tensors = {f"input_{i}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
                   for i, t in enumerate(captured.example_inputs)}
        tensors.update({f"output_{i}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
                        for i, t in enumerate(captured.reference_outputs)})
        safetensors.torch.save_file(tensors, str(tmp / EXAMPLES))
        report = dataclasses.replace(module.report, load_s=None)  # how the module was loaded is not saved
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=2, default=str))
        if module._compiled is not None:  # a loaded model starts warm: no compile again
            module._compiled.copy_to(tmp / COMPILED)
        meta["guards"] = _guards(program.module(), program).to_json()
        meta["dtype"] = str(module.dtype).removeprefix("torch.")
        meta["integrity"] = {
            "files": {p.name: _file_hash(p) for p in sorted(tmp.iterdir())},
            "tensors": _program_tensor_hashes(program),
            "graph": _graph_hash(program),
        }
        meta["sha256"] = _meta_hash(meta)
        # graphopt.json last: a folder without it is never mistaken for a complete save.
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _default_permissions(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_save_target(target: Path, overwrite: bool) -> None:
    """Refuse, before any work, a save folder that cannot or must not be written."""
    if target.name in ("", ".", "..") or _holds_cwd(target):
        raise OutputPathError(f"cannot save to {str(target) or '.'}: it is the current folder or one above it; "
                              "name a folder of its own for the save, e.g. out/model")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise OutputPathError(f"{target} already exists (pass overwrite=True / --overwrite to replace it)")
    if target.exists():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in SAVE_FILES)
        if foreign or (any(target.iterdir()) and not (target / META).is_file()):
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputPathError(f"{target} is not a graphopt save (it holds {shown or 'other files'}); "
                                  "--overwrite replaces only a previous save or an empty folder: choose another "
                                  "folder or empty this one")
    parent = target.parent
    if not parent.is_dir():
        raise no_folder(target, parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {target}: no write permission in {parent}")


def is_save(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like a graphopt save (its graphopt.json names the format)."""
    try:
        return json.loads((Path(directory) / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load(directory: str | os.PathLike, *, verify: bool = True, target: str = "cpu",
         cuda_graphs: bool | None = None) -> Any:
    """Load a folder written by :func:`save`. Never unpickles code.

    Every file, weight tensor, the graph and the metadata are checked against the hashes recorded
    at save time, so any change to them is a :class:`~graphopt.errors.LoadError` naming what
    changed. With ``verify`` the program then runs on the saved example inputs and must reproduce
    the saved outputs. ``target="cuda"`` moves it to the GPU and lowers it onto Triton kernels as
    ``optimize`` does (the saved program is the portable graph; kernels are generated for the
    machine that loads it), with CUDA graphs per input layout unless ``cuda_graphs=False``.

    A save holding a CPU program this machine runs (:mod:`graphopt.compiled`) loads that program,
    checks it against the saved outputs and leaves the graph in ``model.pt2`` unread
    (:class:`DeferredGraph`): reading it (about 2 s, most of it importing torch's compiler stack)
    happens, with the checks above, the first time something needs it. So does a ``target="cuda"``
    load that finds forwards an earlier load of this save stored on this machine
    (:mod:`graphopt.autotune.stored`, checked with ``verify`` against the outputs they gave then); a
    load that finds none stores its first call's forward for the next.
    """
    from .driver import TARGETS, _to_device
    from .emit import OptimizedModule, SourceInfo
    from .lowering import check_cuda_target
    from .report import OptimizationReport

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "cuda":
        check_cuda_target()
    cuda_graphs = cudagraphs.resolve(cuda_graphs, target)
    started = time.perf_counter()
    seconds: dict[str, float] = {}  # the report's load_s: where a load's time goes

    def lap(phase: str) -> None:  # the time since the previous phase ended
        seconds[phase] = time.perf_counter() - started - sum(seconds.values())

    path = Path(directory)
    if not path.is_dir():
        left = _interrupted(path)
        if left is not None:
            raise LoadError(f"{path} is missing, but a save into it was interrupted and left the previous one "
                            f"at {left}: rename that folder to {path.name}")
        raise LoadError(f"{path} is not a directory saved by graphopt")
    meta = _read_json(path / META)
    if meta.get("format") != FORMAT:
        raise LoadError(f"{path / META} is not a graphopt save (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{path} was saved in format version {meta.get('format_version')}, this graphopt "
                        f"reads version {FORMAT_VERSION}; re-run optimize and save")
    integrity = _check_integrity(path, meta)
    try:
        tensors = safetensors.torch.load_file(str(path / EXAMPLES))
    except Exception as e:
        raise LoadError(f"{path / EXAMPLES} is corrupted or truncated ({first_line(e)})") from e
    try:
        report = OptimizationReport.from_json(_read_json(path / REPORT))
        call = CallSpec(params=tuple((str(n), str(k)) for n, k in meta["params"]),
                        defaults=structure.unflatten(meta["defaults"], []),
                        in_spec=meta["in_spec"], out_spec=meta["out_spec"],
                        extras=tuple(str(n) for n in meta.get("extras", ())))
        n_in = structure.count_tensors(call.in_spec) + len(call.extras)
        n_out = structure.count_tensors(call.out_spec)
        inputs = tuple(tensors[f"input_{i}"] for i in range(n_in))
        outputs = tuple(tensors[f"output_{i}"] for i in range(n_out))
        info = SourceInfo.from_json(meta["source"]) if "source" in meta else None
        routing = _routing(meta["routing"]) if "routing" in meta else None
        guards = InputGuards.from_json(meta["guards"]) if "guards" in meta else None
        dtype = getattr(torch, meta["dtype"]) if "dtype" in meta else None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoadError(f"{path} has inconsistent metadata ({type(e).__name__}: {e})") from e
    on_gpu = target == "cuda" and torch.cuda.is_available()
    if on_gpu:  # a save made on another device (a CPU) takes its inputs on the GPU from now on
        inputs, outputs = _to_device(inputs, "cuda"), _to_device(outputs, "cuda")
        guards = None if guards is None else guards.on("cuda")
    dynamic_batch = bool(meta.get("dynamic_batch", True))

    def read_graph(deferred: bool = True) -> CapturedGraph:
        return _read_graph(path, integrity, call, inputs, outputs, dynamic_batch, verify, target,
                           served_under=guards if deferred else None)

    refused = _package_refused(path, meta) if target == "cpu" and (path / COMPILED).is_file() else None
    deferrable = guards is not None and dtype is not None and routing is None
    if deferrable and len(guards.tensors) != n_in:  # type: ignore[union-attr]
        raise LoadError(f"{path} has inconsistent metadata: {META} describes {n_in} inputs and guards "
                        f"for {len(guards.tensors)}")  # type: ignore[union-attr]
    lap("files")
    device = inputs[0].device if inputs else torch.device("cuda" if on_gpu else "cpu")
    served, entry, unusable = (_stored_forwards(path, meta, inputs, device, verify)
                               if target == "cuda" and deferrable and "sha256" in meta else (None, None, False))
    if deferrable and (refused == "" or served is not None):
        head = CapturedGraph(None, call, guards, inputs, outputs, 0.0, dynamic_batch=dynamic_batch)  # type: ignore
        module = OptimizedModule(None, report, info=info, deferred=DeferredGraph(head, dtype, device, read_graph))
    else:
        module = OptimizedModule(read_graph(deferred=False), report, info=info)
        lap("graph")
    module._routing = routing
    if served is not None:
        module._served = served
        module._report = dataclasses.replace(report, target="cuda", lowering=served.lowering, cuda_graphs=cuda_graphs)
        module._graph_runners = [] if cuda_graphs else None
        lap("forwards")
    elif target == "cuda":
        module._store_as = None if entry is None else (entry, path / PROGRAM, unusable)
        module._report = dataclasses.replace(report, target="cuda", lowering=module._lower_variant(module.captured),
                                             cuda_graphs=cuda_graphs)
        module._graph_runners = [] if cuda_graphs else None
        lap("lowering")
    elif refused:
        saved = dict(report.compiled or {}, note=f"{refused}: running the graph; compile() again")
        module._report = dataclasses.replace(report, compiled=saved)
    elif refused == "":
        _load_compiled(module, path)
        lap("package")
    module._report = dataclasses.replace(module._report, load_s={k: round(v, 4) for k, v in seconds.items()})
    return module


def _stored_forwards(path: Path, meta: dict[str, Any], inputs: tuple[torch.Tensor, ...], device: torch.device,
                     verify: bool) -> tuple[Any, str | None, bool]:
    """(the forwards stored on this machine for this save, or None; the name of their entry; whether an
    entry is there but unusable). With ``verify`` they must reproduce, on the saved example inputs, the
    outputs they gave when stored; an entry that cannot be used is passed over with a warning (the load
    then reads the program, and its first forward replaces the entry). (None, None, False) when
    ``GRAPHOPT_STORED_FORWARDS=0``."""
    from graphopt.autotune import stored

    from .verify import compare

    if not stored.enabled():
        return None, None, False
    name = stored.entry_name(str(meta["sha256"]))
    try:
        served = stored.read(name, path / PROGRAM, device)
        if served is not None and verify:
            with torch.no_grad():
                got = served(inputs)
            if got is None:
                raise ValueError("none of them takes the saved example inputs")
            cmp = compare(got, stored.expected_outputs(served))
            if not cmp.within:
                raise ValueError(f"they do not reproduce their outputs on the saved examples ({cmp.line()})")
    except Exception as e:  # noqa: BLE001 - a cache entry that cannot be used is passed over
        warnings.warn(f"graphopt: the forwards stored for {path} in {stored.store_dir() / name} cannot be used "
                      f"({first_line(e)}); loading the program instead", RuntimeWarning, stacklevel=3)
        return None, name, True
    return served, name, False


def _routing(data: Any) -> Any:
    from .variants import Routing  # imported here: it needs the graph analyses (and sympy), most loads do not

    return Routing.from_json(data)


@dataclasses.dataclass(frozen=True)
class DeferredGraph:
    """A loaded module's graph before it is read: what calls need of it, and how to read it.

    ``head`` holds the call structure, input guards and saved examples (its ``graph_module`` is None:
    it never runs); ``dtype`` and ``device`` are the weights'; ``read()`` loads ``model.pt2`` with every
    check :func:`load` makes and returns the whole :class:`~graphopt.capture.CapturedGraph`.
    """

    head: CapturedGraph
    dtype: torch.dtype
    device: torch.device
    read: Callable[[], CapturedGraph]


def _read_graph(path: Path, integrity: dict[str, Any], call: CallSpec, inputs: tuple[torch.Tensor, ...],
                outputs: tuple[torch.Tensor, ...], dynamic_batch: bool, verify: bool, target: str,
                served_under: InputGuards | None = None) -> CapturedGraph:
    """model.pt2 as a checked CapturedGraph: its inputs and outputs against graphopt.json's, and with
    ``verify`` its outputs on the saved inputs. Read right after :func:`load` matched the file's hash, its
    weights need no second pass; read later for a deferred module that served calls under the guards
    ``served_under``, the file may have changed since: its weights and graph are checked against the
    saved hashes again, and it must admit the inputs those guards did."""
    program = _load_program(path / PROGRAM)
    if served_under is not None:
        _check_program(path / PROGRAM, program, integrity)
    gm = program.module()
    on_gpu = target == "cuda" and torch.cuda.is_available()
    if on_gpu:
        gm = move_to(gm, torch.device("cuda"))
    _annotate_modules(gm)
    guards = _guards(gm, program).on("cuda") if on_gpu else _guards(gm, program)
    n_outputs = len(program.graph_signature.user_outputs)
    if len(guards.tensors) != len(inputs) or n_outputs != len(outputs):
        raise LoadError(f"{path} has inconsistent metadata: {META} describes {len(inputs)} inputs and "
                        f"{len(outputs)} outputs, {PROGRAM} has {len(guards.tensors)} and {n_outputs}")
    if served_under is not None and not served_under.same_as(guards):
        raise LoadError(f"{path} has inconsistent metadata: the input guards in {META} differ from {PROGRAM}'s")
    captured = CapturedGraph(gm, call, guards, inputs, outputs, 0.0, dynamic_batch=dynamic_batch)
    if verify:
        from .verify import compare

        try:
            with torch.no_grad():
                cmp = compare(captured.run(inputs), outputs)
        except Exception as e:
            raise LoadError(f"{path / PROGRAM} does not run on its saved example inputs ({first_line(e)})") from e
        if not cmp.within:
            raise LoadError(f"{path} does not reproduce its saved outputs ({cmp.line()}): corrupted weights?")
    return captured


def _package_refused(path: Path, meta: dict[str, Any]) -> str:
    """Why the saved CPU program cannot run here ('' when it can): its C++ ABI is the torch's that made
    it, its instructions the CPU's it was compiled for."""
    from .compiled import unsupported

    if meta.get("torch_version") != torch.__version__:
        return f"the saved program was compiled by torch {meta.get('torch_version')}, this is {torch.__version__}"
    try:
        return unsupported(path / COMPILED)
    except Exception as e:
        raise LoadError(f"{path / COMPILED} is not a readable compiled program ({first_line(e)})") from e


def _load_compiled(module: Any, path: Path) -> None:
    """The saved CPU program, checked against the saved outputs (a deferred graph is read only if an
    fp16/bf16 output needs an fp32 rerun to judge)."""
    from .compiled import load_compiled

    try:
        module._compiled, report = load_compiled(path / COMPILED, module._deferred.head if module._deferred
                                                 else module.captured, lambda: module.graph_module)
    except Exception as e:
        raise LoadError(f"{path / COMPILED} does not load or reproduce the saved outputs ({first_line(e)})") from e
    module._report = dataclasses.replace(module._report, compiled=dataclasses.asdict(report))


# ------------------------------------------------------------------ integrity


def _sha256(chunks: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256(iter(lambda: f.read(1 << 20), b""))


def _tensor_hash(t: torch.Tensor) -> str:
    """Of dtype, shape and bytes: a reinterpreted or reshaped tensor hashes differently too."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return _sha256([f"{t.dtype}{tuple(t.shape)}".encode(), memoryview(data)])


def _program_tensor_hashes(program: torch.export.ExportedProgram) -> dict[str, str]:
    named = {**program.state_dict, **program.constants}
    return {name: _tensor_hash(t) for name, t in sorted(named.items()) if isinstance(t, torch.Tensor)}


def _graph_hash(program: torch.export.ExportedProgram) -> str:
    return _sha256([str(program.graph).encode(), str(program.graph_signature).encode()])


def _meta_hash(meta: dict[str, Any]) -> str:
    return _sha256([json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode()])


def _check_integrity(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """graphopt.json's own hash, then every file it lists; returns the integrity record."""
    if meta.get("sha256") != _meta_hash(meta):
        raise LoadError(f"{path / META} was edited or damaged: its content no longer matches the hash saved in it; "
                        "save the model again")
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict):
        raise LoadError(f"{path / META} has no integrity record; save the model again")
    for name in (PROGRAM, EXAMPLES, REPORT):
        if name not in integrity["files"]:
            raise LoadError(f"{path / META} lists no hash for {name}; save the model again")
    for name, digest in integrity["files"].items():
        file = path / name
        if not file.is_file():
            raise LoadError(f"{path} is incomplete: {name} is missing")
        if _file_hash(file) != digest:
            reason = _program_damage(file, integrity) if name == PROGRAM else "its content differs from the saved one"
            raise LoadError(f"{file} is corrupted: {reason}")
    return integrity


def _load_program(file: Path) -> torch.export.ExportedProgram:
    try:
        return _quiet_export_load(file)
    except Exception as e:
        raise LoadError(f"{file} is corrupted or truncated ({type(e).__name__}: {first_line(e)})") from e


def _quiet_export_load(file: Path) -> torch.export.ExportedProgram:
    """torch.export.load without the tracebacks torch logs for a damaged archive."""
    with warnings.catch_warnings(), quiet(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.export.load(file)


def _check_program(file: Path, program: torch.export.ExportedProgram, integrity: dict[str, Any]) -> None:
    reason = _program_mismatch(program, integrity)
    if reason:
        raise LoadError(f"{file} is corrupted: {reason}")


def _program_mismatch(program: torch.export.ExportedProgram, integrity: dict[str, Any]) -> str:
    """What of the loaded program differs from the saved hashes ('' when nothing)."""
    saved = integrity.get("tensors", {})
    loaded = _program_tensor_hashes(program)
    for name in sorted(set(saved) | set(loaded)):
        if name not in loaded:
            return f"weight {name!r} is missing"
        if name not in saved:
            return f"weight {name!r} was not in the saved model"
        if loaded[name] != saved[name]:
            return f"weight {name!r} differs from the saved one"
    if _graph_hash(program) != integrity.get("graph"):
        return "its graph differs from the saved one"
    return ""


def _program_damage(file: Path, integrity: dict[str, Any]) -> str:
    """Why model.pt2's bytes differ from the saved hash: the weight or graph that changed, if it loads."""
    try:
        program = _quiet_export_load(file)
    except Exception as e:
        return f"truncated or unreadable ({type(e).__name__}: {first_line(e)})"
    return _program_mismatch(program, integrity) or "its bytes differ from the saved ones"


# ------------------------------------------------------------------ the folder swap


def _holds_cwd(target: Path) -> bool:
    """Whether ``target`` is the working folder or one above it (replacing it would pull the floor)."""
    try:
        resolved, cwd = target.resolve(), Path.cwd().resolve()
    except OSError:
        return False
    return resolved == cwd or resolved in cwd.parents


def _default_permissions(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a saved model gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        item.chmod(0o666 & ~umask)


def _rename_exchange() -> Any:
    """glibc's renameat2 with RENAME_EXCHANGE (Linux 3.15+), or None where it is not available."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _swap_in(tmp: Path, target: Path) -> None:
    """Make ``tmp`` the folder at ``target`` in one step; the previous save is removed afterwards.

    With RENAME_EXCHANGE the two folders trade places atomically, so at every instant ``target``
    is a whole save. Without it the old folder is renamed aside first; a kill between the two
    renames leaves it beside the target (``load`` names it)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    exchange = _rename_exchange()
    if exchange is not None and exchange(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target),
                                         _RENAME_EXCHANGE) == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous save
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{tmp.name.rpartition('-')[2]}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _leftovers(target: Path) -> list[tuple[Path, int]]:
    """Temporary and set-aside folders of earlier saves to ``target``, with the pid that made them."""
    found = []
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            m = _LEFTOVER.match(p.name)
            if m and m["name"] == target.name and p.is_dir():
                found.append((p, int(m["pid"])))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(target: Path) -> None:
    """Remove what saves killed mid-way left beside ``target`` (never another live process's work)."""
    for folder, pid in _leftovers(target):
        if not _alive(pid):
            if ".old-" in folder.name and not target.exists():
                continue  # the previous save itself: load() points the user to it
            shutil.rmtree(folder, ignore_errors=True)


def _interrupted(target: Path) -> Path | None:
    """The previous save that a save killed between its two renames left beside ``target``."""
    for folder, _ in _leftovers(target):
        if ".old-" in folder.name and (folder / META).is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path.parent} is not a complete graphopt save: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} is corrupted ({first_line(e)})") from e
    if not isinstance(data, dict):
        raise LoadError(f"{path} is corrupted (expected a JSON object)")
    return data


def _version() -> str:
    from . import __version__

    return __version__
