import math

import pytest
import torch

from graphopt.autotune import tuner
from graphopt.autotune.cache import AutotuneError, CacheWarning, Config, DeviceKey, TuningCache
from graphopt.autotune.tuner import NoGpuError, choose, configs_hash, hash_source, tune

H100 = DeviceKey("NVIDIA H100 80GB HBM3", (9, 0), 132, "12.4", "2.5.1", "3.1.0", "0.1.0")

# fake kernel: its time per BLOCK; BLOCK=512 "needs too much shared memory" and raises at launch
TIMES_MS = {32: 0.9, 64: 0.4, 128: 0.2, 256: 0.3}


def family():
    return [{"BLOCK": b, "num_warps": 4} for b in (64, 32, 512, 128, 256)]


def run_config(config):
    if config["BLOCK"] == 512:
        raise RuntimeError("OutOfResources: shared memory, required: 264192\nmore detail")
    return TIMES_MS[config["BLOCK"]]


class FakeTimer:
    """Deterministic: the 'time' is what the fake launch returns; every call is recorded."""

    def __init__(self, clock=None, step_s=0.0):
        self.calls = []
        self.clock, self.step_s = clock, step_s

    def __call__(self, fn, *, warmup, repeats):
        self.calls.append((warmup, repeats))
        if self.clock is not None:
            self.clock.now += self.step_s
        return fn()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def forbidden_timer(fn, *, warmup, repeats):
    raise AssertionError("the timer must not run on a cache hit")


def test_picks_the_fastest_and_a_raising_config_scores_infinity(tmp_path):
    timer = FakeTimer()
    result = tune("fake", "src0", (3, 1000), family, run_config, timer=timer, cache=TuningCache(H100, tmp_path),
                  warmup=2, repeats=7)
    assert result.source == "tuned" and result.config == {"BLOCK": 128, "num_warps": 4} and result.time_ms == 0.2
    assert result.shape_bucket == (4, 1024) and timer.calls == [(2, 7)] * 5
    failed = [t for t in result.timings if t.failed]
    assert [dict(t.config) for t in failed] == [{"BLOCK": 512, "num_warps": 4}]
    assert failed[0].time_ms == math.inf
    assert failed[0].error == "RuntimeError: OutOfResources: shared memory, required: 264192"  # first line only
    stored = TuningCache(H100, tmp_path).get("fake", "src0", (4, 1024))
    assert stored.best == result.config and len(stored.timings) == 5 and stored.configs_hash == configs_hash(family())


def test_every_config_failing_raises_and_stores_nothing(tmp_path):
    def broken(config):
        raise ValueError("compile error")

    with pytest.raises(AutotuneError, match="every config of kernel 'fake' failed.*compile error"):
        tune("fake", "src0", (8,), family, broken, timer=FakeTimer(), cache=TuningCache(H100, tmp_path))
    assert TuningCache(H100, tmp_path).entries() == ()


def test_a_cache_hit_skips_timing(tmp_path):
    store = TuningCache(H100, tmp_path)
    first = tune("fake", "src0", (4, 1024), family, run_config, timer=FakeTimer(), cache=store)
    again = tune("fake", "src0", (3, 1000), family, run_config, timer=forbidden_timer, cache=store)  # same bucket
    assert again.source == "cache" and again.config == first.config and again.timings == first.timings
    assert choose("fake", "src0", (4, 1024), family, cache=store).source == "cache"


def test_a_changed_source_or_family_retunes(tmp_path):
    store = TuningCache(H100, tmp_path)
    tune("fake", "src0", (8,), family, run_config, timer=FakeTimer(), cache=store)
    timer = FakeTimer()
    assert tune("fake", "src1", (8,), family, run_config, timer=timer, cache=store).source == "tuned"
    assert tune("fake", "src0", (8,), family()[:2], run_config, timer=timer, cache=store).source == "tuned"
    assert len(timer.calls) == 5 + 2
    assert choose("fake", "src0", (8,), family, cache=store).source == "default"  # stale: tuned over 2 configs


def test_force_retunes_a_cached_entry(tmp_path):
    store = TuningCache(H100, tmp_path)
    tune("fake", "src0", (8,), family, run_config, timer=FakeTimer(), cache=store)
    timer = FakeTimer()
    assert tune("fake", "src0", (8,), family, run_config, timer=timer, cache=store, force=True).source == "tuned"
    assert len(timer.calls) == 5


def test_budget_stops_timing_new_configs(tmp_path):
    clock = FakeClock()
    timer = FakeTimer(clock, step_s=1.0)  # every config takes one (fake) second
    store = TuningCache(H100, tmp_path)
    result = tune("fake", "src0", (8,), family, run_config, timer=timer, cache=store, budget_s=2.5, clock=clock)
    assert len(timer.calls) == 3
    assert [t.config["BLOCK"] for t in result.timings] == [64, 32, 512]
    assert [c["BLOCK"] for c in result.skipped] == [128, 256]
    assert result.config["BLOCK"] == 64  # the best of what was timed
    assert [c["BLOCK"] for c in store.get("fake", "src0", (8,)).skipped] == [128, 256]


def test_a_zero_budget_still_times_the_first_config():
    timer = FakeTimer()
    result = tune("fake", "src0", (8,), family, run_config, timer=timer, cache=None, budget_s=0)
    assert len(timer.calls) == 1 and result.config["BLOCK"] == 64 and len(result.skipped) == 4


def test_a_spent_budget_still_times_the_required_configs():
    timer = FakeTimer()
    result = tune("fake", "src0", (8,), family, run_config, timer=timer, cache=None, budget_s=0,
                  required=lambda c: c["BLOCK"] == 256)  # e.g. the eager ops a kernel has to beat
    assert [t.config["BLOCK"] for t in result.timings] == [64, 256] and len(result.skipped) == 3


def test_prune_limits_what_is_timed(tmp_path):
    def prune(configs, shape):
        assert shape == (3, 100)  # the cost model sees the concrete shape
        return [c for c in configs if c["BLOCK"] <= 64]

    timer = FakeTimer()
    result = tune("fake", "src0", (3, 100), family, run_config, prune=prune, timer=timer, cache=None)
    assert len(timer.calls) == 2 and result.config["BLOCK"] == 64  # the faster 128 was never a candidate
    with pytest.raises(AutotuneError, match="pruned every config"):
        tune("fake", "src0", (3, 100), family, run_config, prune=lambda cs, s: [], timer=timer, cache=None)


def test_choose_returns_the_default_without_tuning(tmp_path):
    store = TuningCache(H100, tmp_path)
    result = choose("fake", "src0", (8,), family, run_config, timer=forbidden_timer, cache=store)
    assert result.source == "default" and result.config == Config(BLOCK=64, num_warps=4) and result.time_ms is None
    assert not store.path.exists()  # choosing a default writes nothing
    pruned = choose("fake", "src0", (8,), family, prune=lambda cs, s: cs[3:], cache=store)
    assert pruned.config["BLOCK"] == 128  # the cost model's first survivor


def test_choose_tunes_when_asked(tmp_path):
    store = TuningCache(H100, tmp_path)
    timer = FakeTimer()
    assert choose("fake", "src0", (8,), family, run_config, autotune=True, timer=timer, cache=store).source == "tuned"
    assert choose("fake", "src0", (8,), family, timer=forbidden_timer, cache=store).config["BLOCK"] == 128
    with pytest.raises(ValueError, match="needs run_config"):
        choose("fake", "src1", (8,), family, autotune=True, cache=store)


def test_an_unwritable_cache_warns_and_the_run_still_succeeds(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(CacheWarning) as record:  # reading reports the path too; writing must not raise
        result = tune("fake", "src0", (8,), family, run_config, timer=FakeTimer(), cache=TuningCache(H100, blocker))
    assert any("could not store tuning result" in str(w.message) for w in record)
    assert result.config["BLOCK"] == 128


def test_a_timer_returning_nan_scores_infinity():
    result = tune("fake", "src0", (8,), [{"BLOCK": 64}, {"BLOCK": 128}], run_config, cache=None,
                  timer=lambda fn, *, warmup, repeats: math.nan if fn() > 0.3 else fn())
    assert result.config == {"BLOCK": 128} and result.timings[0].error == "timer returned nan"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_the_gpu_parts_raise_clearly():
    with pytest.raises(NoGpuError, match="needs a CUDA GPU"):
        tuner.cuda_event_timer(lambda: None, warmup=1, repeats=1)
    with pytest.raises(NoGpuError, match="needs a CUDA GPU"):  # not scored as infinity config by config
        tune("fake", "src0", (8,), family, run_config)
    with pytest.raises(NoGpuError):
        tuner.gpu_device_key()
    assert tuner.default_cache() is None
    # a launcher on a CPU (TRITON_INTERPRET=1) still gets its default config
    assert choose("fake", "src0", (8,), family).source == "default"


def test_hash_source_tells_kernels_apart():
    def kernel_a(x_ptr):
        return x_ptr

    def kernel_b(x_ptr):
        return x_ptr + 1

    assert hash_source(kernel_a) == hash_source(kernel_a) != hash_source(kernel_b)
    assert hash_source("ab", "c") != hash_source("a", "bc")
    assert len(hash_source(b"bytes")) == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_default_timer_and_device_key_work(tmp_path):
    key = tuner.gpu_device_key()
    assert key.sm_count > 0 and key.compute_capability == torch.cuda.get_device_capability()
    x = torch.randn(1 << 20, device="cuda")
    ms = tuner.cuda_event_timer(lambda: x.mul_(1.0), warmup=2, repeats=5)
    assert 0 < ms < 1000

    def run(config):
        if config["BLOCK"] == 512:
            torch.empty(1 << 62, device="cuda")  # fails like an over-sized launch would
        x.mul_(1.0)

    result = tune("gpu-smoke", "src0", (1 << 20,), family, run, cache=TuningCache(key, tmp_path), warmup=1, repeats=3)
    assert result.source == "tuned" and any(t.failed for t in result.timings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_the_graph_timer_raises_clearly():
    with pytest.raises(NoGpuError, match="needs a CUDA GPU"):
        tuner.cuda_graph_timer(lambda: None, warmup=1, repeats=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_graph_timer_times_replays_and_runs_first_calls_outside_the_capture():
    x = torch.randn(1 << 20, device="cuda")
    calls = []

    def fn():
        if not calls:
            assert x.sum().item() == x.sum().item()  # a host sync: cannot be captured
        calls.append(1)
        return x * 2.0

    ms = tuner.cuda_graph_timer(fn, warmup=0, repeats=5, launches=4)
    assert 0 < ms < 1000 and len(calls) == 1 + 4  # one call outside, four recorded, replays add none
    with pytest.raises(RuntimeError):  # what cannot run inside a graph fails the config
        tuner.cuda_graph_timer(lambda: x.sum().item(), warmup=1, repeats=1)
