"""Evaluation backends on a tiny real job (dit-digits, 16 proxy samples): the local process pool
scores like this process, in candidate order, and a failing or dying worker raises instead of
hanging."""

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from graphopt.autodiffusion.space import SearchSpace, make_space
from graphopt.autodiffusion.workers import InProcess, LocalPool, SearchJob, open_backend
from graphopt.errors import GraphoptError, UsageError

# Measured on a 2-core CPU: the proxy FD (about 150 here) from this process at 2 threads and from pool
# workers at 1 thread agreed to the last bit. Another CPU may pick other kernels for 1 and 2 threads,
# so allow float32 rounding carried through sampling and FD, far below the gaps between candidates.
REL = 1e-6


def within(seconds: float, fn):
    """``fn()``, failing the test instead of hanging when it takes longer than ``seconds``."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds} s: the call hangs")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(scope="module")
def job():
    import graphopt.models
    from graphopt.planned import PlannedDenoiser
    from graphopt.quality import QualityEvaluator

    model, sampler, example_inputs = graphopt.models.load("dit-digits")
    evaluator = QualityEvaluator.for_digits(sampler.shape[-1], proxy_samples=16, confirm_samples=16,
                                            confirm_seeds=(0,))
    base = sampler.with_steps(3, "euler")
    blocks = len(PlannedDenoiser.build(model, example_inputs).blocks)
    space = make_space(base.family, 3, blocks, ("steps", "skips"), default_levels=base.levels, max_skip_ratio=0.3)
    return SearchJob(tuple(example_inputs), base, space, evaluator, model=model, batch=16)


@pytest.fixture(scope="module")
def candidates(job):
    rng = np.random.default_rng(0)
    return [job.space.uniform()] + [job.space.random(rng, job.space.max_skip_ratio) for _ in range(3)]


@pytest.mark.slow
def test_local_pool_scores_like_this_process_in_candidate_order(job, candidates):
    here = InProcess(job)
    ticks = []
    expected = here.map(candidates, done=lambda: ticks.append(1))
    assert len(ticks) == len(candidates)
    assert len(set(expected)) == len(candidates)  # distinct scores: the order below is observable
    assert any(c.skipped_count() for c in candidates)
    pool = LocalPool(job, 2)
    try:
        ticks.clear()
        scores = within(120, lambda: pool.map(candidates, done=lambda: ticks.append(1)))
        assert len(ticks) == len(candidates)
        assert scores == pytest.approx(expected, rel=REL)
        # both workers score the reversed list; results still come back in the order given
        backwards = within(120, lambda: pool.map(candidates[::-1]))
        assert backwards == scores[::-1]
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_raises(job, candidates):
    broken = dataclasses.replace(job, model=None, model_spec="no-such-model")
    pool = LocalPool(broken, 2)
    try:
        with pytest.raises(GraphoptError, match="search worker failed: UsageError: model 'no-such-model' is not a reference model"):
            within(120, lambda: pool.map(candidates))
    finally:
        within(60, pool.close)


class DyingEvaluator:
    """Kills the first worker process that reaches its second candidate, mid-task; the other
    workers score on (a constant: the pool's bookkeeping is under test, not the images)."""

    metric = "FD"

    def __init__(self, marker: str):
        self.marker, self.calls = marker, 0

    def proxy(self, generate) -> float:
        self.calls += 1
        if self.calls == 2:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(3)
        return 1.0


@pytest.mark.slow
def test_a_worker_dying_mid_task_raises_instead_of_hanging(job, tmp_path):
    dying = dataclasses.replace(job, evaluator=DyingEvaluator(str(tmp_path / "died")))
    candidates = [job.space.uniform()] * 8
    pool = LocalPool(dying, 2)
    try:
        with pytest.raises(GraphoptError, match=r"1 of 2 search worker processes died \(exit codes 3\)"):
            within(120, lambda: pool.map(candidates))
    finally:
        within(60, pool.close)
    assert (tmp_path / "died").exists()


class Unpicklable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fn = lambda x: x


def test_a_model_that_cannot_reach_the_workers_is_a_usage_error():
    space = SearchSpace(steps=1, grid=(1.0,), default=(0,), blocks=0)
    job = SearchJob((torch.zeros(1),), None, space, None, model=Unpicklable())
    with pytest.raises(UsageError, match="cannot start the worker processes.*workers=1"):
        within(60, lambda: LocalPool(job, 2))


def test_open_backend_without_ray_needs_ray_installed(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    space = SearchSpace(steps=1, grid=(1.0,), default=(0,), blocks=0)
    job = SearchJob((torch.zeros(1),), None, space, None, model=nn.Identity())
    with pytest.raises(UsageError, match=r"pip install 'graphopt\[ray\]'"):
        open_backend(job, 2, "auto")


SCRIPT = '''
from graphopt.autodiffusion.workers import unguarded_main_call

def helper():
    return unguarded_main_call()

print("top", unguarded_main_call() is not None)
print("top-via-function", helper() is not None)
if __name__ == "__main__":
    print("guarded", unguarded_main_call() is not None)
    print("guarded-via-function", helper() is not None)
'''


def test_a_call_from_an_unguarded_script_top_level_is_detected(tmp_path):
    """Spawned workers re-run a script's unguarded top level; only such calls are flagged."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:4] == ["top True", "top-via-function True", "guarded False",
                                   "guarded-via-function False"]
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    assert "True" not in out  # python -c: spawned workers import nothing of it


def test_open_backend_evaluates_in_this_process_for_an_unguarded_script(job, monkeypatch):
    import graphopt.autodiffusion.workers as workers

    monkeypatch.setattr(workers, "unguarded_main_call", lambda: "script.py")
    with pytest.warns(UserWarning, match="evaluates in this process"):
        backend = workers.open_backend(job, 2, None)
    try:
        assert isinstance(backend, InProcess)
    finally:
        backend.close()
