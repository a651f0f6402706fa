"""Generated forwards stored per machine: the next target="cuda" load serves from them (interpreted here)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import graphopt  # noqa: E402
from graphopt.autotune import stored  # noqa: E402
from graphopt.autotune.cache import cache_dir  # noqa: E402
from graphopt.autotune.runtime import Portable  # noqa: E402


class Block(nn.Module):
    """LayerNorm, a linear and GELU, a residual: a norm region, a matmul and a pointwise region."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.proj(self.norm(x)) * 2)


@pytest.fixture
def save(tmp_path):
    model = Block().eval()
    x = torch.randn(2, 4, 16)
    folder = graphopt.save(graphopt.optimize(model, (x,)), tmp_path / "block")
    return folder, model


def entries():
    root = stored.store_dir()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_a_gpu_load_stores_its_forwards_and_the_next_load_serves_calls_from_them(save):
    folder, model = save
    x3 = torch.randn(3, 4, 16)
    first = graphopt.load(folder, target="cuda")
    assert "graph" in first.report.load_s and "lowering" in first.report.load_s
    with torch.no_grad():
        want3 = first(x3)  # writes a forward for batch 3, and stores it with one for the saved examples
        want2 = first(torch.ones(2, 4, 16))
    (name,) = entries()
    entry = json.loads((stored.store_dir() / name / stored.ENTRY).read_text())
    assert [f["layout"][0][0] for f in entry["forwards"]] == [[2, 4, 16], [3, 4, 16]]
    assert {p.stat().st_mode & 0o777 for p in (stored.store_dir() / name).rglob("*")} <= {0o600, 0o700}

    again = graphopt.load(folder, target="cuda")
    assert set(again.report.load_s) == {"files", "forwards"}  # neither the program read nor lowered
    assert "calls in the stored layouts run the forwards an earlier load stored" in again.report.table()
    assert again.report.lowering == json.loads(json.dumps(first.report.lowering)) and again.report.target == "cuda"
    with torch.no_grad():
        assert torch.equal(again(x3), want3)
        assert torch.equal(again(torch.ones(2, 4, 16)), want2)
    assert again._served is not None and again._deferred is not None
    with torch.no_grad():  # a layout no stored forward takes: the program is read and lowered now
        got5 = again(torch.ones(5, 4, 16))
        torch.testing.assert_close(got5, model(torch.ones(5, 4, 16)), rtol=1e-5, atol=1e-5)
    assert again._served is None and again._deferred is None and len(again.lowered) == 1
    assert again.report.lowering["regions"] == first.report.lowering["regions"]
    with torch.no_grad():
        assert torch.equal(again(x3), want3)  # now through the lowered graph's own forward
    third = graphopt.load(folder, target="cuda")  # batch 5 joined the entry
    assert third._served is not None and len(third._served.forwards) == 3
    with torch.no_grad():
        assert torch.equal(third(torch.ones(5, 4, 16)), got5) and torch.equal(third(x3), want3)
    assert third._served is not None


def test_a_served_module_reads_its_graph_for_its_weights(save):
    folder, _ = save
    lowered = graphopt.load(folder, target="cuda")
    with torch.no_grad():
        lowered(torch.randn(2, 4, 16))
    served = graphopt.load(folder, target="cuda")
    assert served._served is not None
    assert sorted(served.state_dict()) == sorted(lowered.state_dict())
    assert served._served is None and len(served.lowered) == 1


def test_a_fresh_process_serves_a_stored_forward_without_torchs_program_reader(save, tmp_path):
    folder, _ = save
    with torch.no_grad():
        graphopt.load(folder, target="cuda")(torch.randn(2, 4, 16))
    script = textwrap.dedent(f"""
        import sys, torch, graphopt
        module = graphopt.load({str(folder)!r}, target="cuda")
        with torch.no_grad():
            y = module(torch.randn(2, 4, 16))
        assert module._served is not None and y.shape == (2, 4, 16), module.report.load_s
        print(sorted(m for m in ("torch._export.serde.serialize", "torch._dynamo", "sympy") if m in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_new_tuning_or_another_save_names_another_entry(save, tmp_path):
    folder, _ = save
    digest = json.loads((folder / "graphopt.json").read_text())["sha256"]
    name = stored.entry_name(digest)
    assert stored.entry_name(digest) == name and stored.entry_name("0" * 64) != name
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "some-gpu-sm90-0123456789ab.json").write_text("{}")  # a tuning was stored
    assert stored.entry_name(digest) != name


@pytest.mark.parametrize("damage", ["source", "outputs", "format", "writable"])
def test_an_entry_that_cannot_be_used_is_passed_over_with_a_warning(save, damage):
    folder, _ = save
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        want = graphopt.load(folder, target="cuda")(x)
    (name,) = entries()
    where = stored.store_dir() / name
    if damage == "source":
        (where / "forward_0.py").write_text("def forward_0(x):\n    return (x * 0,)\n")
        message = "do not reproduce"
    elif damage == "outputs":
        torch.manual_seed(1)
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(where / stored.OUTPUTS))
        safetensors.torch.save_file({k: torch.randn_like(v) for k, v in tensors.items()}, str(where / stored.OUTPUTS))
        message = "do not reproduce"
    elif damage == "format":
        entry = json.loads((where / stored.ENTRY).read_text())
        (where / stored.ENTRY).write_text(json.dumps({**entry, "format": 99}))
        message = "entry format 99"
    else:  # anyone could have replaced its sources
        (where / "forward_0.py").chmod(0o666)
        message = "not this user's alone"
    with pytest.warns(RuntimeWarning, match=f"cannot be used .*{message}.*loading the program instead"):
        module = graphopt.load(folder, target="cuda")
    assert module._served is None and "lowering" in module.report.load_s
    with torch.no_grad():
        assert torch.equal(module(x), want)  # and its forward replaces the entry
    healed = graphopt.load(folder, target="cuda")
    assert healed._served is not None
    with torch.no_grad():
        assert torch.equal(healed(x), want)


def test_without_verify_a_load_serves_without_running_anything(save):
    folder, _ = save
    with torch.no_grad():
        graphopt.load(folder, target="cuda")(torch.randn(2, 4, 16))
    (name,) = entries()
    (stored.store_dir() / name / stored.OUTPUTS).unlink()  # verify would need it
    module = graphopt.load(folder, target="cuda", verify=False)
    assert module._served is not None


def test_a_store_that_fails_warns_and_the_call_still_returns(save, monkeypatch, tmp_path):
    folder, model = save
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(blocker))
    module = graphopt.load(folder, target="cuda")
    x = torch.randn(2, 4, 16)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="could not store the generated forward"):
        y = module(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_a_name_no_save_holds_is_not_stored(tmp_path):
    portable = Portable("forward_0", "", {"m": nn.Linear(2, 2), "forward_0": None}, {}, ())
    with pytest.raises(stored.NotStored, match="m is a Linear"):
        stored.describe(portable, {}, {})
    program = tmp_path / "empty.pt2"
    import zipfile

    with zipfile.ZipFile(program, "w") as archive:
        archive.writestr("m/data/weights/model_weights_config.json", json.dumps({"config": {}}))
    with pytest.raises(stored.NotStored, match="weight w is not held in empty.pt2"):
        stored.locate_weights(program, {"w": torch.ones(2)})


def test_weights_are_located_byte_for_byte_in_the_program(save):
    folder, model = save
    program = folder / "model.pt2"
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}  # the names of the saved program
    located = stored.locate_weights(program, weights)
    assert set(located) == set(weights)
    read = stored._read_weights(program, located, torch.device("cpu"))
    for k, v in weights.items():
        assert torch.equal(read[k], v) and read[k].stride() == v.stride()
    with pytest.raises(stored.NotStored, match="are not its values"):
        stored.locate_weights(program, {"model.proj.bias": weights["model.proj.bias"] + 1})


def test_graphopts_own_kernels_are_stored_by_name_and_served(tmp_path):
    """LiT's linear attention, VAR's block-causal attention and ATConv's dynamic depthwise conv: kernels
    of graphopt's library, stored as module and name rather than as source."""
    from tests.autotune.test_runtime import Family

    x, kernels = torch.randn(2, 16, 24), torch.randn(2, 24, 3, 3)
    folder = graphopt.save(graphopt.optimize(Family().eval(), (x, kernels), dynamic_batch=False), tmp_path / "family")
    with torch.no_grad():
        want = graphopt.load(folder, target="cuda")(x, kernels)
    (name,) = entries()
    entry = json.loads((stored.store_dir() / name / stored.ENTRY).read_text())
    modules = {spec.get("module") for f in entry["forwards"] for spec in f["names"].values() if "kernel" in spec}
    assert {"graphopt.autotune.kernels.linear_attention", "graphopt.autotune.kernels.attention",
            "graphopt.autotune.kernels.dynamic_dwconv"} <= modules
    again = graphopt.load(folder, target="cuda")
    assert again._served is not None
    with torch.no_grad():
        got = again(x, kernels)
    assert torch.equal(got, want)


def test_an_entry_takes_a_new_layout_once_and_at_most_its_limit(tmp_path):
    layout = (((2, 3), (3, 1), torch.float32, torch.device("cpu")),)
    portable = Portable("forward_0", "def forward_0(x):\n    return (x,)\n", {}, {}, layout)
    assert not stored.extend("0" * 32, portable, tmp_path / "none.pt2")  # no such entry
    folder = stored.store_dir() / ("1" * 32)
    folder.mkdir(parents=True)
    known = {"name": "forward_0", "file": "forward_0.py", "layout": [[[2, 3], [3, 1], "float32", "cpu"]], "names": {}}
    (folder / stored.ENTRY).write_text(json.dumps({"format": stored.FORMAT, "forwards": [known], "weights": {}}))
    assert not stored.extend("1" * 32, portable, tmp_path / "none.pt2")  # its layout is there already
    other = Portable("forward_0", portable.source, {}, {}, (((4, 3), (3, 1), torch.float32, torch.device("cpu")),))
    assert not stored.extend("1" * 32, other, tmp_path / "none.pt2", limit=1)  # full


def test_the_stored_form_of_a_forward_bound_to_launchers_launches_through_kernel_grid():
    """On a GPU the forward a runtime writes calls compiled launchers (bound to this process); the form
    it stores launches every kernel through kernel[grid] and computes the same outputs."""
    from graphopt.autotune.runtime import Runtime
    from tests.autotune.standin import FakeDevice, interpreted_kernels_through_triton_run
    from tests.autotune.test_runtime import lowered_runtime

    _, gm, tensors = lowered_runtime(Block(), torch.randn(2, 4, 16))
    written = []
    with interpreted_kernels_through_triton_run(FakeDevice()) as streams, torch.no_grad():
        runtime = Runtime(gm, direct_launch=streams)
        runtime.on_generated = written.append
        want = runtime(tensors)
    (forward,) = written
    assert forward.direct_launches > 0 and "_launcher(" in forward.source
    portable = forward.portable
    assert portable is not None and "_launcher(" not in portable.source and "current_stream" not in portable.source
    assert portable.source.count("](") == forward.launches  # each launch as kernel[grid](...)
    namespace = dict(portable.namespace)
    exec(compile(portable.source, "<stored>", "exec"), namespace)  # noqa: S102
    with torch.no_grad():
        got = namespace[portable.name](*tensors)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_graphopt_stored_forwards_0_neither_reads_nor_stores(save, monkeypatch):
    folder, _ = save
    with torch.no_grad():
        graphopt.load(folder, target="cuda")(torch.randn(2, 4, 16))
    (name,) = entries()
    monkeypatch.setenv("GRAPHOPT_STORED_FORWARDS", "0")
    module = graphopt.load(folder, target="cuda")
    assert module._served is None and "lowering" in module.report.load_s
    with torch.no_grad():
        module(torch.randn(3, 4, 16))  # a new layout: it would join the entry
    entry = json.loads((stored.store_dir() / name / stored.ENTRY).read_text())
    assert len(entry["forwards"]) == 1
