"""compile=True: the optimized graph compiled for the CPU by Inductor ahead of time, saved, loaded warm."""

import dataclasses
import shutil

import pytest
import torch

import graphopt
from graphopt import LoadError, UsageError
from graphopt.approx import ApproxOutcome, _apply
from graphopt.compiled import PACKAGE
from tests import zoo
from tests.calls import assert_same, grow

pytestmark = pytest.mark.slow  # one C++ compile: tens of seconds on 2 cores


@pytest.fixture(scope="module")
def compiled():
    model, args, kwargs = zoo.kwargs_model()  # keyword arguments, a float knob, a dict of outputs
    return (model, args, kwargs), graphopt.optimize(model, args, kwargs, compile=True)


def test_the_compiled_program_serves_every_batch_of_the_range(compiled):
    (model, args, kwargs), opt = compiled
    report = opt.report.compiled
    assert report["backend"].startswith("inductor") and report["compile_s"] > 0 and not report["warm"]
    assert report["max_abs_error"] < 1e-4 and "compile: inductor" in opt.report.table()
    with torch.no_grad():
        for batch in (1, 2, 5):
            a, k = grow(args, batch), grow(kwargs, batch)
            assert_same(opt(*a, **k), model(*a, **k))
    assert opt.report.recaptures == 0


def test_a_saved_compiled_model_loads_warm_and_the_package_is_checked(compiled, tmp_path, monkeypatch):
    (model, args, kwargs), opt = compiled
    path = opt.save(tmp_path / "saved")
    assert (path / PACKAGE).is_file()
    loaded = graphopt.load(path)
    assert loaded.report.compiled["warm"] and loaded.report.compiled["compile_s"] == 0
    assert "loaded warm from the save" in loaded.report.table()
    with torch.no_grad():
        assert_same(loaded(*grow(args, 3), **grow(kwargs, 3)), model(*grow(args, 3), **grow(kwargs, 3)))

    damaged = shutil.copytree(path, tmp_path / "damaged")
    data = bytearray((damaged / PACKAGE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / PACKAGE).write_bytes(bytes(data))
    with pytest.raises(LoadError, match=f"{PACKAGE} is corrupted"):
        graphopt.load(damaged)

    # a CPU without the package's vector instructions, or another architecture: the graph runs
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    isa = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path / PACKAGE), "model")
    if isa["AOTI_CPU_ISA"] not in ("", "INVALID_VEC_ISA"):
        plain = graphopt.load(path)
        assert plain._compiled is None and "instructions this CPU lacks" in plain.report.table()
    monkeypatch.setattr(graphopt.compiled.platform, "machine", lambda: "riscv64")
    other = graphopt.load(path)
    assert other._compiled is None and "compiled for linux/" in other.report.table()
    with torch.no_grad():
        assert_same(other(*args, **kwargs), model(*args, **kwargs))
    monkeypatch.undo()

    monkeypatch.setattr(torch, "__version__", "0.0.0")  # another torch: its C++ ABI may differ
    other = graphopt.load(path)
    assert other._compiled is None and "compiled by torch" in other.report.table()
    with torch.no_grad():
        assert_same(other(*args, **kwargs), model(*args, **kwargs))


def test_a_changed_graph_drops_the_program_compiled_from_the_old_one(compiled):
    (model, args, kwargs), _ = compiled
    opt = graphopt.optimize(model, args, kwargs)
    opt._compiled = object()  # stands for a compiled program; nothing may call it after the change
    opt._report = dataclasses.replace(opt._report, compiled={"backend": "x"})
    _apply(opt, ApproxOutcome(graph=opt.captured.graph_module))
    assert opt._compiled is None and opt.report.compiled is None
    with torch.no_grad():
        assert_same(opt(*args, **kwargs), model(*args, **kwargs))


def test_compile_is_the_cpu_target_only():
    model, args, kwargs = zoo.kwargs_model()
    with pytest.raises(UsageError, match="compile=True builds the CPU program"):
        graphopt.optimize(model, args, kwargs, target="cuda", compile=True)
