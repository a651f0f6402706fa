import copy
import dataclasses
import json
import math
import multiprocessing
import pickle
from pathlib import Path

import pytest

from graphopt.autotune import cache as cache_mod
from graphopt.autotune.cache import CacheEntry, CacheWarning, Config, DeviceKey, Timing, TuningCache, cache_dir, shape_bucket
from graphopt.autotune.cache_admin import (CacheBundleError, clear, export_bundle, format_listing, import_bundle,
                                           list_caches)

H100 = DeviceKey("NVIDIA H100 80GB HBM3", (9, 0), 132, "12.4", "2.5.1", "3.1.0", "0.1.0")
A100 = DeviceKey("NVIDIA A100-SXM4-40GB", (8, 0), 108, "12.4", "2.5.1", "3.1.0", "0.1.0")
OTHER_VALUES = {"gpu_name": "NVIDIA H200", "compute_capability": (9, 1), "sm_count": 114, "cuda_version": "12.6",
                "torch_version": "2.6.0", "triton_version": "3.2.0", "graphopt_version": "0.2.0"}


def entry(kernel="rmsnorm", source="src0", bucket=(4, 1024), times=(0.5, 0.25, math.inf), tuned_at=1.0):
    timings = [Timing(Config(BLOCK=64 * (i + 1), num_warps=4), t, "" if math.isfinite(t) else "OutOfResources: smem")
               for i, t in enumerate(times)]
    return CacheEntry.from_timings(kernel, source, bucket, "fam0", timings, (), tuned_at)


def strict_json(path: Path):
    def reject(token):
        raise AssertionError(f"non-JSON token {token} in {path}")
    return json.loads(path.read_text(), parse_constant=reject)


def test_config_is_an_immutable_hashable_value():
    c = Config({"num_warps": 4}, BLOCK_M=64)
    assert c == {"BLOCK_M": 64, "num_warps": 4} and c == Config(BLOCK_M=64, num_warps=4)
    assert hash(c) == hash(Config(num_warps=4, BLOCK_M=64)) and list(c) == ["BLOCK_M", "num_warps"]
    assert (lambda **kw: kw)(**c) == {"BLOCK_M": 64, "num_warps": 4}
    with pytest.raises(AttributeError):
        c._items = ()
    assert copy.deepcopy(c) == c and pickle.loads(pickle.dumps(c)) == c  # a lowered module's chosen configs copy
    for bad in ({"BLOCK_M": 64.0}, {"BLOCK_M": True}, {"": 1}):
        with pytest.raises(TypeError):
            Config(bad)


def test_shape_bucket_rounds_each_dim_up_to_a_power_of_two():
    assert shape_bucket((1, 2, 3, 5, 8, 9, 1000)) == (1, 2, 4, 8, 8, 16, 1024)
    assert shape_bucket((0, None, object())) == (0, cache_mod.SYMBOLIC, cache_mod.SYMBOLIC)
    assert shape_bucket((3, 77)) == shape_bucket((4, 128))  # one entry serves the whole bucket
    with pytest.raises(ValueError):
        shape_bucket((-2,))


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "root"))
    assert cache_dir() == tmp_path / "root" / "autotune"
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "graphopt" / "autotune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "graphopt" / "autotune"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(DeviceKey)])
def test_every_device_field_changes_the_file(field, tmp_path):
    changed = dataclasses.replace(H100, **{field: OTHER_VALUES[field]})
    assert changed.file_name() != H100.file_name()
    TuningCache(H100, tmp_path).put(entry())
    assert TuningCache(changed, tmp_path).get("rmsnorm", "src0", (4, 1024)) is None
    assert TuningCache(H100, tmp_path).get("rmsnorm", "src0", (4, 1024)) is not None


def test_every_entry_field_changes_the_entry(tmp_path):
    store = TuningCache(H100, tmp_path)
    store.put(entry())
    assert store.get("rmsnorm", "src0", (4, 1024)) == entry()
    assert store.get("layernorm", "src0", (4, 1024)) is None
    assert store.get("rmsnorm", "src1", (4, 1024)) is None
    assert store.get("rmsnorm", "src0", (8, 1024)) is None


def test_file_name_is_readable_and_keys_round_trip():
    assert H100.file_name().startswith("nvidia-h100-80gb-hbm3-sm90-") and H100.file_name().endswith(".json")
    assert DeviceKey.from_json(json.loads(json.dumps(H100.to_json()))) == H100


def test_failed_config_is_stored_as_null_and_comes_back_as_infinity(tmp_path):
    store = TuningCache(H100, tmp_path)
    store.put(entry())
    doc = strict_json(store.path)
    assert doc["format"] == "graphopt-autotune-cache" and doc["version"] == 1 and doc["device"] == H100.to_json()
    (e,) = doc["entries"]
    assert [t["time_ms"] for t in e["timings"]] == [0.5, 0.25, None]
    assert e["best"] == {"BLOCK": 128, "num_warps": 4}
    got = store.get("rmsnorm", "src0", (4, 1024))
    assert got.timings[2].time_ms == math.inf and got.timings[2].failed and got.best_time_ms == 0.25


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_crash_mid_write_leaves_the_old_file_and_no_temp_files(crash_in, tmp_path, monkeypatch):
    store = TuningCache(H100, tmp_path)
    store.put(entry())
    before = store.path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(cache_mod.os, crash_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(entry(kernel="layernorm"))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert store.get("layernorm", "src0", (4, 1024)) is None


def _writer(directory: str, worker: int, count: int, barrier) -> None:
    store = TuningCache(H100, directory)
    barrier.wait()  # start together so the writes really interleave
    for i in range(count):
        store.put(entry(kernel=f"k{worker}", bucket=(i + 1,)))


def test_two_writers_at_once_lose_nothing(tmp_path):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(2)
    count = 40
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, count, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = TuningCache(H100, tmp_path)
    assert len(strict_json(store.path)["entries"]) == 2 * count
    keys = {(e.kernel, e.shape_bucket) for e in store.entries()}
    assert keys == {(f"k{w}", (i + 1,)) for w in range(2) for i in range(count)}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _valid_text():
    return json.dumps(cache_mod._file_doc(H100, [entry()]))


@pytest.mark.parametrize("content, reason", [
    (b"\x00\xff\xfe garbage \x80", "unreadable"),
    (_valid_text()[:60].encode(), "not valid JSON"),
    (_valid_text().replace("0.25", "Infinity").encode(), "non-JSON number Infinity"),
    (json.dumps({"format": "graphopt-autotune-cache", "version": 1, "device": H100.to_json(),
                 "entries": [{"kernel": "k"}]}).encode(), "entries\\[0\\]: entry lacks"),
])
def test_corrupted_file_is_reported_and_ignored(content, reason, tmp_path):
    store = TuningCache(H100, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    store.path.write_bytes(content)
    with pytest.warns(CacheWarning, match=f"{store.path.name}.*{reason}") as record:
        assert store.get("rmsnorm", "src0", (4, 1024)) is None
    assert len(str(record[0].message).splitlines()) == 1
    with pytest.warns(CacheWarning):  # the write reads (and reports) the bad file once more, then replaces it
        store.put(entry(kernel="fresh"))
    assert [e["kernel"] for e in strict_json(store.path)["entries"]] == ["fresh"]


@pytest.mark.parametrize("edit, reason", [
    (lambda doc: doc.update(version=999), "format version 999"),
    (lambda doc: doc.update(format="something-else"), "not a graphopt-autotune-cache"),
    (lambda doc: doc.update(device=A100.to_json()), "device key is NVIDIA A100"),
])
def test_version_or_key_mismatch_is_reported_and_ignored(edit, reason, tmp_path):
    store = TuningCache(H100, tmp_path)
    store.put(entry())
    doc = json.loads(store.path.read_text())
    edit(doc)
    store.path.write_text(json.dumps(doc))
    with pytest.warns(CacheWarning, match=reason):
        assert store.get("rmsnorm", "src0", (4, 1024)) is None
    with pytest.warns(CacheWarning):
        store.put(entry())
    assert store.get("rmsnorm", "src0", (4, 1024)) == entry()


def test_export_import_round_trip_merges(tmp_path):
    src, dst, bundle = tmp_path / "a", tmp_path / "b", tmp_path / "fleet.json"
    TuningCache(H100, src).put(entry())
    TuningCache(H100, src).put(entry(kernel="attn", times=(1.0, 2.0)))
    TuningCache(A100, src).put(entry(source="srcA"))
    TuningCache(H100, dst).put(entry(kernel="local-only"))
    TuningCache(H100, dst).put(entry(kernel="attn", times=(3.0, 0.1), tuned_at=5.0))  # newer than the bundle's

    assert export_bundle(bundle, src) == 3
    assert strict_json(bundle)["format"] == "graphopt-autotune-bundle"
    assert import_bundle(bundle, dst) == 2  # the older 'attn' does not replace the newer local one

    got = {dc.device: {e.key: e for e in dc.entries} for dc in list_caches(dst)}
    assert set(got) == {H100, A100}
    assert {k.kernel for k in got[H100]} == {"rmsnorm", "attn", "local-only"}
    assert TuningCache(H100, dst).get("rmsnorm", "src0", (4, 1024)) == entry()
    assert TuningCache(H100, dst).get("attn", "src0", (4, 1024)).best_time_ms == 0.1
    assert TuningCache(A100, dst).get("rmsnorm", "srcA", (4, 1024)) == entry(source="srcA")

    only_a100 = tmp_path / "a100.json"
    assert export_bundle(only_a100, src, devices=[A100]) == 1


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "graphopt-autotune-cache", "version": 1}), "not a graphopt-autotune-bundle"),
    (json.dumps({"format": "graphopt-autotune-bundle", "version": 7, "caches": []}), "bundle version 7"),
    (json.dumps({"format": "graphopt-autotune-bundle", "version": 1, "caches": {}}), "'caches' must be a list"),
    (json.dumps({"format": "graphopt-autotune-bundle", "version": 1, "caches": [
        {**cache_mod._file_doc(H100, [entry()]), "device": {"gpu_name": "x"}}]}), "caches\\[0\\]: device key"),
    (_valid_text().replace('"time_ms": 0.25', '"time_ms": "fast"'), "time_ms must be"),
])
def test_malformed_bundle_is_rejected_and_changes_nothing(content, reason, tmp_path):
    bundle, dst = tmp_path / "bad-bundle.json", tmp_path / "dst"
    if "time_ms" in reason:  # a valid bundle around one bad entry
        content = json.dumps({"format": "graphopt-autotune-bundle", "version": 1,
                              "caches": [cache_mod._file_doc(A100, [entry()]), json.loads(content)]})
    bundle.write_text(content)
    with pytest.raises(CacheBundleError, match=f"bad-bundle.json.*{reason}"):
        import_bundle(bundle, dst)
    assert not dst.exists() or not list(dst.glob("*.json"))


def test_missing_bundle_names_the_file(tmp_path):
    with pytest.raises(CacheBundleError, match="nowhere.json"):
        import_bundle(tmp_path / "nowhere.json", tmp_path)


def test_list_and_clear(tmp_path):
    TuningCache(H100, tmp_path).put(entry())
    TuningCache(A100, tmp_path).put(entry(kernel="attn"))
    (tmp_path / "notes.json").write_text("not ours")  # other files in the directory are left alone
    caches = list_caches(tmp_path)
    assert [dc.device for dc in caches] == sorted([H100, A100], key=lambda d: d.file_name())
    listing = format_listing(caches)
    assert "NVIDIA H100" in listing and "rmsnorm src=src0 shape=[4, 1024]" in listing and "1 failed" in listing
    assert clear(tmp_path, H100) == 1 and [dc.device for dc in list_caches(tmp_path)] == [A100]
    (tmp_path / f".{H100.file_name()}.abc123.tmp").write_text("left by a killed writer")
    assert clear(tmp_path) == 1
    assert list_caches(tmp_path) == [] and format_listing([]) == "(no tuning cache entries)"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["notes.json"]
