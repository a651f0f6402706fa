"""compile=True: the optimized graph compiled for the CPU by Inductor ahead of time, saved, loaded warm."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt import InputError, LoadError, UsageError
from graphopt.approx import ApproxOutcome, _apply
from graphopt.compiled import PACKAGE
from graphopt.saved import META, PROGRAM, _meta_hash
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


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled[0], compiled[1].save(tmp_path_factory.mktemp("deferred") / "saved")


def test_a_loaded_compiled_model_serves_calls_before_reading_its_graph(saved):
    (model, args, kwargs), path = saved
    loaded = graphopt.load(path)
    assert loaded._deferred is not None  # model.pt2 is not read: the package serves the saved range
    assert set(loaded.report.load_s) == {"files", "package"}
    assert "the graph is read when first needed" in loaded.report.table()
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    with torch.no_grad():
        for batch in (1, 2, 5):
            a, k = grow(args, batch), grow(kwargs, batch)
            assert_same(loaded(*a, **k), model(*a, **k))
    assert loaded._deferred is not None

    # anything that needs the graph reads it first: its weights, here
    eager = graphopt.load(path)
    eager.graph_module  # noqa: B018 - reads it
    assert loaded.state_dict().keys() == eager.state_dict().keys() and loaded._deferred is None
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert_same(loaded(*grow(args, 3), **grow(kwargs, 3)), model(*grow(args, 3), **grow(kwargs, 3)))


def test_a_deferred_model_refuses_calls_outside_its_range_as_a_loaded_one_does(saved):
    (model, args, kwargs), path = saved
    loaded = graphopt.load(path)
    with pytest.raises(InputError, match="a loaded module cannot re-capture"):
        loaded(args[0].double(), **kwargs)


def test_a_deferred_model_saves_again_and_its_graph_is_checked_when_read(saved, tmp_path):
    (model, args, kwargs), path = saved
    again = graphopt.load(path).save(tmp_path / "again")
    assert json.loads((again / "report.json").read_text())["load_s"] is None  # how it was loaded is not saved
    with torch.no_grad():
        assert_same(graphopt.load(again)(*args, **kwargs), model(*args, **kwargs))

    # model.pt2 replaced after the load: reading the graph names it, and the module stays usable
    loaded = graphopt.load(again)
    other = graphopt.optimize(zoo.kwargs_model()[0], args, kwargs)
    torch.nn.init.zeros_(next(other.graph_module.parameters()).data)
    other.save(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / PROGRAM, again / PROGRAM)
    with pytest.raises(LoadError, match="differs from the saved one"):
        list(loaded.parameters())
    assert loaded._deferred is not None
    with torch.no_grad():
        assert_same(loaded(*args, **kwargs), model(*args, **kwargs))


def test_a_save_without_the_guards_loads_its_graph_at_once(saved, tmp_path):
    (model, args, kwargs), path = saved
    older = shutil.copytree(path, tmp_path / "older")  # as saves made before the guards were recorded
    meta = json.loads((older / META).read_text())
    del meta["guards"], meta["dtype"]
    meta["sha256"] = _meta_hash(meta)
    (older / META).write_text(json.dumps(meta))
    loaded = graphopt.load(older)
    assert loaded._deferred is None and loaded.report.compiled["warm"]
    with torch.no_grad():
        assert_same(loaded(*args, **kwargs), model(*args, **kwargs))


def test_a_fresh_process_loads_and_calls_a_compiled_model_without_torch_compiler_stack(saved, tmp_path):
    (model, args, kwargs), path = saved
    torch.save((args, kwargs), tmp_path / "call.pt")
    code = ("import sys, torch, graphopt\n"
            "m = graphopt.load(sys.argv[1])\n"
            "args, kwargs = torch.load(sys.argv[2])\n"
            "with torch.no_grad():\n    m(*args, **kwargs)\n"
            "print(sorted(n for n in ('torch._dynamo', 'torch._inductor', 'torch._export.serde') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "call.pt")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_torch_whose_package_loader_differs_loads_through_torch_s_own(saved, monkeypatch):
    (model, args, kwargs), path = saved

    class OlderLoader:  # another torch's C++ loader: other constructor arguments
        load_metadata_from_package = staticmethod(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package)

        def __init__(self, path, name):
            pass

    monkeypatch.setattr(graphopt.compiled, "_aoti_loader", lambda: OlderLoader)
    with torch.no_grad():
        assert_same(graphopt.load(path)(*args, **kwargs), model(*args, **kwargs))
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # a torch without it: no check of ours, torch's own
    loaded = graphopt.load(path)
    assert loaded.report.compiled["warm"]
    with torch.no_grad():
        assert_same(loaded(*args, **kwargs), model(*args, **kwargs))
