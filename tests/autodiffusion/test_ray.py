"""A seeded search on a local Ray cluster gives the same result as on the local process pool.

The head runs as a child ``ray start --head --block`` process with its own temp dir, so the test
stops exactly the cluster it started (``ray stop`` would stop every Ray cluster of the user).
Token authentication is switched off for both sides: Ray 2.5x enables it for a head when a token
file exists in ~/.ray, but not for a driver connecting by address, which then cannot connect.
"""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    log = temp / "head.log"
    with open(log, "w") as out:  # this interpreter: the head's workers must import the graphopt under test
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                                 "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                                 "--block"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        head.terminate()  # --block: the head takes its GCS, raylet and workers down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_search_equals_local_pool_search(ray_head):
    import graphopt.models
    from graphopt.autodiffusion import EvolutionConfig, search_run
    from graphopt.quality import QualityEvaluator

    model, sampler, example_inputs = graphopt.models.load("dit-digits")
    evaluator = QualityEvaluator.for_digits(sampler.shape[-1], proxy_samples=16, confirm_samples=16,
                                            confirm_seeds=(0,))
    config = EvolutionConfig(population=6, parents=2, mutations=2, crossovers=2, generations=2, steps_only=1,
                             increments=1)
    options = dict(nfe=3, evaluator=evaluator, config=config, seed=0, workers=2, progress=False, confirm=1,
                   batch=16, max_skip_ratio=0.3)
    local = search_run(model, sampler, example_inputs, **options)
    on_ray = search_run(model, sampler, example_inputs, ray=ray_head, **options)
    assert on_ray.plan.search["ray"] == ray_head and on_ray.plan.search["workers"] == 2
    assert not ray.is_initialized()  # the search connected for itself, and closed that connection
    assert on_ray.chosen.candidate.key == local.chosen.candidate.key
    assert list(on_ray.state.records) == list(local.state.records)
    assert len(local.state.records) > config.population
    for key, record in local.state.records.items():
        # both backends score with one thread per worker: measured equal to the last bit
        assert on_ray.state.records[key].quality == pytest.approx(record.quality, rel=1e-6)
