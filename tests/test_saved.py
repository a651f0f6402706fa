import json
import os
import shutil

import pytest
import torch

import graphopt
from graphopt import InputError, LoadError, OutputPathError
from graphopt.saved import PROGRAM, check_save_target, is_save
from tests import zoo
from tests.calls import assert_same, grow


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_save_and_load_round_trip(optimized_zoo, tmp_path, name):
    (model, args, kwargs), opt = optimized_zoo[name]
    path = opt.save(tmp_path / "saved")
    assert sorted(p.name for p in path.iterdir()) == ["examples.safetensors", "graphopt.json", "model.pt2",
                                                      "report.json"]
    loaded = graphopt.load(path)
    with torch.no_grad():
        assert_same(loaded(*args, **kwargs), opt(*args, **kwargs))
        big_args, big_kwargs = grow(args, 4), grow(kwargs, 4)
        assert_same(loaded(*big_args, **big_kwargs), model(*big_args, **big_kwargs))
    assert [p.name for p in loaded.report.passes] == [p.name for p in opt.report.passes]
    assert set(loaded.report.load_s) == {"files", "graph"} and "load: " in loaded.report.table()
    assert opt.report.load_s is None and "load: " not in opt.report.table()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp directories left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's owner-only mode


class BatchBranch(torch.nn.Module):
    """Branches on the batch size: torch.export narrows the proven range to the branch taken."""

    def forward(self, x):
        return x * 2 if x.shape[0] > 3 else x * 3


def test_a_loaded_module_refuses_calls_outside_its_range_instead_of_guessing(optimized_zoo, tmp_path):
    opt = graphopt.optimize(BatchBranch().eval(), (torch.ones(2, 4),))
    loaded = graphopt.load(opt.save(tmp_path / "m"))
    assert torch.equal(loaded(torch.ones(3, 4)), torch.full((3, 4), 3.0))
    with pytest.raises(InputError, match=r"x dim 0 is 5, outside the captured range \[\d, 3\].*cannot re-capture"):
        loaded(torch.ones(5, 4))  # the saved graph multiplies by 3; the model would by 2
    (_, args, kwargs), opt = optimized_zoo["kwargs"]
    loaded = graphopt.load(opt.save(tmp_path / "k"))
    with pytest.raises(InputError, match="cannot re-capture"):  # another constant needs the Python model
        loaded(*args, cond=kwargs["cond"], scale=3.0)


def test_save_never_leaves_a_partial_directory(optimized_zoo, tmp_path, monkeypatch):
    _, opt = optimized_zoo["kwargs"]
    previous = opt.save(tmp_path / "previous")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    with pytest.raises(OutputPathError, match="already exists"):
        opt.save(previous)
    with pytest.raises(OutputPathError, match="does not exist"):
        opt.save(tmp_path / "missing" / "m")

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        opt.save(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        opt.save(previous, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    monkeypatch.undo()
    opt.save(previous, overwrite=True)
    assert graphopt.load(previous) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_overwrite_replaces_only_a_save_or_an_empty_folder(optimized_zoo, tmp_path, monkeypatch):
    _, opt = optimized_zoo["kwargs"]
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "precious.txt").write_text("precious")
    with pytest.raises(OutputPathError, match="is not a graphopt save .*precious.txt"):
        opt.save(user, overwrite=True)
    assert (user / "precious.txt").read_text() == "precious"
    # a save with a user's file added is not replaced either
    saved = opt.save(tmp_path / "saved")
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="notes.txt"):
        opt.save(saved, overwrite=True)
    os.remove(saved / "notes.txt")
    opt.save(saved, overwrite=True)
    assert is_save(saved) and not is_save(user)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert graphopt.load(opt.save(empty, overwrite=True)) is not None
    monkeypatch.chdir(saved)
    for here in (".", "..", ""):
        with pytest.raises(OutputPathError, match="current folder"):
            check_save_target(__import__("pathlib").Path(here), overwrite=True)
    assert is_save(saved)


# ------------------------------------------------------------------ load: what is caught


@pytest.fixture(scope="module")
def saved(optimized_zoo, tmp_path_factory):
    _, opt = optimized_zoo["dataclass"]
    return opt.save(tmp_path_factory.mktemp("saved") / "model")


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def test_load_reports_missing_and_foreign_directories(saved, tmp_path):
    with pytest.raises(LoadError, match="not a directory saved by graphopt"):
        graphopt.load(tmp_path / "nothing")
    with pytest.raises(LoadError, match="graphopt.json is missing"):
        graphopt.load(tmp_path)
    copy = _copy(saved, tmp_path)
    os.remove(copy / "examples.safetensors")
    with pytest.raises(LoadError, match="incomplete: examples.safetensors is missing"):
        graphopt.load(copy)


def _rewrite_meta(folder, **changes):
    meta = json.loads((folder / "graphopt.json").read_text())
    (folder / "graphopt.json").write_text(json.dumps({**meta, **changes}))


def test_load_reports_corrupted_and_edited_metadata(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "graphopt.json").write_text("{not json")
    with pytest.raises(LoadError, match="graphopt.json is corrupted"):
        graphopt.load(copy)
    shutil.copy(saved / "graphopt.json", copy / "graphopt.json")
    _rewrite_meta(copy, format_version=99)
    with pytest.raises(LoadError, match="format version 99"):
        graphopt.load(copy)
    shutil.copy(saved / "graphopt.json", copy / "graphopt.json")
    meta = json.loads((saved / "graphopt.json").read_text())  # an edited input spec: caught by the hash
    _rewrite_meta(copy, params=[["renamed", kind] for _, kind in meta["params"]])
    with pytest.raises(LoadError, match="graphopt.json was edited or damaged"):
        graphopt.load(copy)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_weight_no_example_uses_is_caught_and_named(tmp_path):
    model, (x, t, y), _ = zoo.dit()  # example labels 3 and 10: row 5 of the class embedding is never read
    path = graphopt.optimize(model, (x, t, y)).save(tmp_path / "dit")
    row = model.y_embed.weight[5].detach().numpy().tobytes()
    data = (path / PROGRAM).read_bytes()
    assert data.count(row) == 1
    _flip(path / PROGRAM, data.index(row) + 2)
    with pytest.raises(LoadError, match=r"model.pt2 is corrupted: weight '.*y_embed.weight' differs") as err:
        graphopt.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(LoadError, match="y_embed.weight"):  # the output re-check is not what catches it
        graphopt.load(path, verify=False)


def test_a_truncated_program_is_one_clear_error_without_torch_tracebacks(saved, tmp_path, capfd):
    copy = _copy(saved, tmp_path)
    data = (copy / PROGRAM).read_bytes()
    (copy / PROGRAM).write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(LoadError, match="model.pt2 is corrupted: truncated or unreadable"):
        graphopt.load(copy)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    (copy / PROGRAM).write_bytes(data)
    examples = (copy / "examples.safetensors").read_bytes()
    (copy / "examples.safetensors").write_bytes(examples[:100])
    with pytest.raises(LoadError, match="examples.safetensors is corrupted"):
        graphopt.load(copy)


def test_the_output_recheck_catches_a_program_consistent_with_its_hashes(saved, tmp_path, monkeypatch):
    """The second line of defence: a save whose files hash right but whose outputs do not reproduce
    (here the recorded outputs are altered and the hashes recomputed, as a buggy writer would)."""
    import safetensors.torch

    from graphopt import saved as saved_module

    copy = _copy(saved, tmp_path)
    tensors = safetensors.torch.load_file(str(copy / "examples.safetensors"))
    tensors["output_0"] = tensors["output_0"] + 1
    safetensors.torch.save_file(tensors, str(copy / "examples.safetensors"))
    meta = json.loads((copy / "graphopt.json").read_text())
    meta["integrity"]["files"]["examples.safetensors"] = saved_module._file_hash(copy / "examples.safetensors")
    meta["sha256"] = saved_module._meta_hash(meta)
    (copy / "graphopt.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="does not reproduce its saved outputs"):
        graphopt.load(copy)
    assert graphopt.load(copy, verify=False) is not None


def test_a_save_from_before_the_integrity_record_is_refused_with_what_to_do(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    _rewrite_meta(copy, format_version=1)
    with pytest.raises(LoadError, match="format version 1.*re-run optimize and save"):
        graphopt.load(copy)


class WithConfig(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def test_a_loaded_module_carries_a_dict_config_and_says_why_when_it_cannot(tmp_path):
    x = torch.randn(2, 4)
    opt = graphopt.optimize(WithConfig({"width": 4, "kinds": ("a", "b")}).eval(), (x,))
    loaded = graphopt.load(opt.save(tmp_path / "dict"))
    assert loaded.config == {"width": 4, "kinds": ["a", "b"]} and type(loaded.config) is dict
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    loaded.config["width"] = 8  # a copy: the saved config stays as it was
    assert loaded.config["width"] == 4
    opt = graphopt.optimize(WithConfig({"fn": print}).eval(), (x,))
    loaded = graphopt.load(opt.save(tmp_path / "object"))
    assert loaded.source_info.config is None
    with pytest.raises(AttributeError, match="WithConfig.config holds a value JSON cannot store"):
        loaded.config
