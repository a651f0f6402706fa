import os

# The suite runs on CPUs: Triton kernels run under Triton's interpreter. triton.jit reads this when it
# decorates a function, and torch imports triton early (torch.utils.flop_counter does), so it is set
# here, before anything imports torch. A GPU run sets TRITON_INTERPRET=0 to compile instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`-n auto`, the README's test command) each worker takes one core: one intra-op
# thread per worker, also for the subprocesses a test starts (README blocks, CLI runs), instead of
# every worker's torch spreading over all cores and the workers slowing each other down.
# A thread count the caller set is kept as it is.
ONE_THREAD_PER_WORKER = "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ
if ONE_THREAD_PER_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if ONE_THREAD_PER_WORKER:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    for var in ("GRAPHOPT_DEBUG", "GRAPHOPT_DUMP_GRAPHS", "GRAPHOPT_DISABLE_PASSES", "GRAPHOPT_DUMP_KERNELS",
                "GRAPHOPT_STORED_FORWARDS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _private_cache_root(tmp_path_factory, monkeypatch):
    """Every test gets a private cache root (tunings, stored forwards), so none can touch the real ~/.cache."""
    root = tmp_path_factory.mktemp("cache-root")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(root / "graphopt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))


@pytest.fixture(scope="session")
def optimized_zoo():
    """Every test-zoo model with its example call and its optimized module (exact passes), built once."""
    import graphopt
    from tests import zoo

    return {name: (factory(), graphopt.optimize(*factory())) for name, factory in zoo.ZOO.items()}
