"""Fault injection on saved models: every damage is one clear LoadError, and the previous save survives.

Each case starts from a fresh copy of one good save and does to it what disks, transfers and people
do: flip bytes, truncate, delete, edit the metadata, or kill the process that is writing it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import LoadError
from graphopt.saved import META, PROGRAM
from tests import zoo

REPO = Path(__file__).resolve().parents[1]
FILES = ("model.pt2", "examples.safetensors", "report.json", "graphopt.json")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model, args, kwargs = zoo.kwargs_model()
    opt = graphopt.optimize(model, args, kwargs)
    return opt.save(tmp_path_factory.mktemp("good") / "model"), (model, args, kwargs)


def _fresh(good, tmp_path, name="copy"):
    return Path(shutil.copytree(good[0], tmp_path / name))


def _caught(folder, match=None):
    with pytest.raises(LoadError, match=match) as err:
        graphopt.load(folder)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(folder) in message
    return message


def test_the_good_save_loads(good):
    model, args, kwargs = good[1]
    with torch.no_grad():
        torch.testing.assert_close(graphopt.load(good[0])(*args, **kwargs)["eps"], model(*args, **kwargs)["eps"])


@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_anywhere_in_any_file_is_caught(good, tmp_path, name):
    size = (good[0] / name).stat().st_size
    for offset in sorted({0, 1, size // 4, size // 2, 3 * size // 4, size - 2, size - 1}):
        folder = _fresh(good, tmp_path, f"flip-{offset}")
        data = bytearray((folder / name).read_bytes())
        data[offset] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
        message = _caught(folder)
        assert name in message, (offset, message)


@pytest.mark.parametrize("name", FILES)
def test_a_truncated_file_is_caught(good, tmp_path, name):
    for keep in (0.0, 0.5, 0.99):
        folder = _fresh(good, tmp_path, f"cut-{keep}")
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
        assert name in _caught(folder)


@pytest.mark.parametrize("name", FILES)
def test_a_deleted_file_is_caught(good, tmp_path, name):
    folder = _fresh(good, tmp_path)
    os.remove(folder / name)
    assert name in _caught(folder, match="missing")


@pytest.mark.parametrize("field, value", [
    ("params", [["renamed", "POSITIONAL_OR_KEYWORD"]]),
    ("in_spec", {"kind": "dict", "keys": [], "items": []}),
    ("out_spec", {"kind": "tensor", "index": 0}),
    ("extras", ["skip_scales"]),
    ("dynamic_batch", False),
    ("torch_version", "0.0.1"),
])
def test_an_edited_metadata_field_is_caught(good, tmp_path, field, value):
    folder = _fresh(good, tmp_path)
    meta = json.loads((folder / META).read_text())
    assert meta[field] != value
    (folder / META).write_text(json.dumps({**meta, field: value}, indent=2))
    _caught(folder, match="graphopt.json was edited or damaged")


def test_edited_hashes_cannot_vouch_for_a_changed_file(good, tmp_path):
    folder = _fresh(good, tmp_path)
    meta = json.loads((folder / META).read_text())
    meta["integrity"]["files"][PROGRAM] = "0" * 64  # the record changed, its own hash not updated
    (folder / META).write_text(json.dumps(meta))
    _caught(folder, match="graphopt.json was edited or damaged")


_WRITER = textwrap.dedent("""
    import sys
    import graphopt
    from tests import zoo

    model, args, kwargs = zoo.kwargs_model()
    opt = graphopt.optimize(model, args, kwargs)
    print("ready", flush=True)
    while True:
        opt.save(sys.argv[1], overwrite=True)
        print("saved", flush=True)
""")


def _writer(tmp_path, target):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, env=env,
                             stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.mark.slow
@pytest.mark.parametrize("sig, delay", [(signal.SIGKILL, 0.02), (signal.SIGKILL, 0.11), (signal.SIGTERM, 0.05),
                                        (signal.SIGINT, 0.08)], ids=["kill-early", "kill-late", "term", "int"])
def test_a_save_killed_mid_way_leaves_the_previous_save_whole(good, tmp_path, sig, delay):
    target = _fresh(good, tmp_path, "target")
    child = _writer(tmp_path, target)
    try:
        child.stdout.readline()  # one save completed; the writer is inside the next one
        time.sleep(delay)
        child.send_signal(sig)
        for _ in range(5):
            try:
                child.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                # a SIGINT that lands in a finalizer (torch's weakref callbacks run constantly) is printed
                # as "Exception ignored in" and the writer goes on: interrupt it again, as a user would
                assert sig == signal.SIGINT, "the writer survived a signal that ends a process"
                child.send_signal(sig)
        assert child.poll() is not None, "the writer survived five interrupts"
    finally:
        child.kill()
        child.wait()
    model, args, kwargs = good[1]
    loaded = graphopt.load(target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, **kwargs)["eps"], model(*args, **kwargs)["eps"])
    loaded.save(target, overwrite=True)  # the killed writer's temporary folder goes with the next save
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "writer.py") == ["target"]


def test_where_folders_cannot_be_exchanged_a_kill_between_the_renames_points_to_the_previous_save(
        good, tmp_path, monkeypatch):
    from graphopt import saved

    target = _fresh(good, tmp_path, "target")
    monkeypatch.setattr(saved, "_rename_exchange", lambda: None)  # as on a system without RENAME_EXCHANGE
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".target.old-"):
            raise KeyboardInterrupt  # stands for the kill: nothing after this runs
    monkeypatch.setattr(os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        graphopt.load(target).save(target, overwrite=True)
    monkeypatch.undo()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".target.old-")]
    message = _caught(target, match="interrupted")
    assert aside.name in message
    os.rename(aside, target)  # what the message says to do
    assert graphopt.load(target) is not None
