"""The CPU backend: the optimized graph compiled ahead of time by Inductor (AOTInductor).

graphopt writes no CPU code generator of its own. ``optimize(..., compile=True)`` (or
:meth:`OptimizedModule.compile`, ``graphopt optimize --compile``) re-exports the canonical optimized
graph with its dynamic batch range and hands it to ``torch._inductor.aoti_compile_and_package``:
Inductor's C++/OpenMP code for the CPU, in one package file. The compiled program is checked against
the original model's outputs on the example inputs (the dtype's bound, as every exact pass is; fp16/bf16
beyond it judged against an fp32 run, :func:`graphopt.verify.compare_precise`),
then serves every call that the main variant serves; calls that re-capture, and graphs with skipped
blocks, run their graphs uncompiled. It is for inference: it computes no gradients.

The package is saved beside ``model.pt2`` as ``model.aoti.pt2`` (hashed with the rest), so a model
loaded by the same torch version starts warm, without compiling again; another torch version, or a
CPU without the vector instructions the package was compiled for (AVX-512 code on an AVX2 machine
would stop at its first illegal instruction), runs the saved graph and the report says why. Compiling
takes tens of seconds to minutes (a C++ compiler is needed); the report gives the time.

A package is loaded with torch's C++ loader directly where this torch allows it:
``torch._inductor.aoti_load_package`` first compiles test programs to find this CPU's best vector ISA
(about 2 s per process, for a warning on a mismatch), while the check here reads the CPU's flags
(:func:`unsupported`) and refuses the package. Elsewhere (older torch releases) that function loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Sequence

import torch

from .errors import UsageError, VerificationError, first_line
from .logs import quiet

PACKAGE = "model.aoti.pt2"
BACKEND = "inductor (AOTInductor, CPU, freezing)"
INDUCTOR_OPTIONS: Mapping[str, Any] = MappingProxyType({"freezing": True})
"""Inductor's options for the package. Freezing: the weights are constants of an inference program (the
package holds them either way), so Inductor folds whatever depends on weights alone and lays out each
linear's weight for oneDNN once, at compile time, instead of on every call. Measured once on this
project's 2-core CPU, a call at batch 64 against the same package without it: 97.4 -> 66.2 ms for dit-digits,
64.4 -> 61.7 ms for unet-digits; max_autotune on top (Inductor's C++ GEMM templates) was slower on
dit-digits and is not used. ``python bench/cpu.py`` compares the result with torch.compile."""


@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """How the CPU program was made: backend, compile seconds (0 when loaded warm from a save), the
    error against the original model's outputs on the example inputs, the package size, and why a
    saved package was not used (``""`` when it was, or none was saved)."""

    backend: str
    compile_s: float
    max_abs_error: float
    max_rel_error: float
    package_bytes: int
    warm: bool = False
    note: str = ""
    tolerance: str = ""
    """The bound the program was verified against (:attr:`graphopt.verify.Comparison.tolerance`)."""

    def line(self) -> str:
        how = "loaded warm from the save" if self.warm else f"compiled in {self.compile_s:.1f}s"
        bound = f" ({self.tolerance})" if self.tolerance else ""
        return (f"compile: {self.backend}, {how}, {self.package_bytes / 1e6:.1f} MB package, max abs err "
                f"{self.max_abs_error:.2e}, max rel err {self.max_rel_error:.2e} vs the original outputs{bound}")


class CompiledProgram:
    """A loaded AOTInductor package: call it with the graph's flat tensor inputs."""

    def __init__(self, package: Path, run: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
                 owner: tempfile.TemporaryDirectory | None = None):
        self.package = package
        self._run = run
        self._owner = owner  # keeps a package compiled into a temporary folder alive with this object

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self._run(list(tensors)))  # the graph's flat inputs and outputs

    def copy_to(self, path: Path) -> None:
        shutil.copyfile(self.package, path)


def compile_captured(captured: Any) -> tuple[CompiledProgram, CompiledReport]:
    """Compile a captured (optimized) graph for the CPU and check it; raises :class:`VerificationError`
    when the compiled program leaves the tolerance, :class:`UsageError` when it cannot be built."""
    from .emit import export_program

    if any(t.device.type != "cpu" for t in captured.example_inputs):
        raise UsageError("compile=True builds the CPU program; optimize with target='cpu'")
    owner = tempfile.TemporaryDirectory(prefix="graphopt-aoti-")
    start = time.perf_counter()
    try:
        program = export_program(captured)
        with warnings.catch_warnings(), quiet("torch._inductor", "torch.export", "torch._export"), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            path = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(Path(owner.name) / PACKAGE),
                                                                 inductor_configs=dict(INDUCTOR_OPTIONS)))
    except Exception as e:
        owner.cleanup()
        raise UsageError(f"Inductor could not compile the optimized graph for the CPU ({type(e).__name__}: "
                         f"{first_line(e)}); a C++ compiler is needed, or optimize without compile") from e
    seconds = time.perf_counter() - start
    compiled = CompiledProgram(path, _load_runner(path), owner)
    return compiled, _checked(compiled, captured, seconds, warm=False)


def load_compiled(path: Path, captured: Any, graph: Callable[[], Any] | None = None
                  ) -> tuple[CompiledProgram, CompiledReport]:
    """A saved package, loaded and checked against the saved outputs. ``graph()`` gives the graph for an
    fp32 rerun of fp16/bf16 outputs (default: ``captured.graph_module``; a deferred graph reads it then)."""
    compiled = CompiledProgram(path, _load_runner(path))
    return compiled, _checked(compiled, captured, 0.0, warm=True, graph=graph)


def _load_runner(path: Path) -> Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]:
    """The package's run function: torch's C++ loader where :func:`unsupported` can check the CPU and the
    loader takes the arguments given here (torch 2.13's); else torch's own loader, which probes the CPU
    itself (and only warns on a mismatch)."""
    if _can_check():
        try:
            return _aoti_loader()(str(path), "model", False, 1, -1).boxed_run
        except (TypeError, AttributeError):  # another torch's loader signature
            pass
    with warnings.catch_warnings(), quiet("torch._inductor"):
        warnings.simplefilter("ignore")
        model = torch._inductor.aoti_load_package(str(path))

    def run(tensors: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        out = model(*tensors)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run


def _aoti_loader() -> Any:
    return getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)


def _can_check() -> bool:
    """Whether this torch lets graphopt read a package's metadata and the CPU's flags."""
    return hasattr(_aoti_loader(), "load_metadata_from_package") and hasattr(torch.cpu, "get_capabilities")


# The vector ISAs Inductor names in a CPU package's metadata, and the CPU flag each needs
# (torch.cpu.get_capabilities(), read by cpuinfo); Inductor's own x86 check reads the same flags.
_ISA_FLAGS = {"avx2": "avx2", "avx512": "avx512_f", "avx512_vnni": "avx512_vnni", "amx_tile": "amx_tile"}
_NO_ISA = {"", "invalid_vec_isa"}


def unsupported(path: Path) -> str:
    """Why this machine cannot run the CPU package at ``path`` ('' when it can): another platform or
    architecture, or vector instructions this CPU lacks. '' too where this torch gives no way to read them:
    then torch's own loader checks (:func:`_load_runner`)."""
    if not _can_check():
        return ""
    meta = _aoti_loader().load_metadata_from_package(str(path), "model")
    built = f"{meta.get('AOTI_PLATFORM', '?')}/{meta.get('AOTI_MACHINE', '?')}"
    if built != f"{sys.platform}/{platform.machine()}":
        return f"the saved program was compiled for {built}, this is {sys.platform}/{platform.machine()}"
    isa = [t for t in str(meta.get("AOTI_CPU_ISA", "")).lower().split() if t not in _NO_ISA]
    if not isa or platform.machine() not in ("x86_64", "AMD64"):
        return ""  # no vector ISA, or one set per architecture (Arm, POWER, s390x: same machine, checked above)
    caps = torch.cpu.get_capabilities()
    missing = [t for t in isa if not caps.get(_ISA_FLAGS.get(t, t), False)]
    if missing:
        return (f"the saved program uses {' '.join(missing).upper()} instructions this CPU lacks "
                f"(compiled for {' '.join(isa).upper()})")
    return ""


def _checked(compiled: CompiledProgram, captured: Any, seconds: float, warm: bool,
             graph: Callable[[], Any] | None = None) -> CompiledReport:
    from .verify import compare_precise, precise_run

    graph = graph or (lambda: captured.graph_module)
    with torch.no_grad():
        cmp = compare_precise(compiled(captured.example_inputs), captured.reference_outputs,
                              lambda: precise_run(graph(), captured.example_inputs))
    if not cmp.within:
        raise VerificationError(f"the program Inductor compiled differs from the original model: {cmp.line()}")
    return CompiledReport(BACKEND, round(seconds, 2), cmp.max_abs_error, cmp.max_rel_error,
                          compiled.package.stat().st_size, warm=warm, tolerance=cmp.tolerance)
