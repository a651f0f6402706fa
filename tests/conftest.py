import os

# The suite runs on CPUs: Triton kernels run under Triton's interpreter. triton.jit reads this when it
# decorates a function, and torch imports triton early (torch.utils.flop_counter does), so it is set
# here, before anything imports torch. A GPU run sets TRITON_INTERPRET=0 to compile instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    for var in ("GRAPHOPT_DEBUG", "GRAPHOPT_DUMP_GRAPHS", "GRAPHOPT_DISABLE_PASSES", "GRAPHOPT_DUMP_KERNELS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def optimized_zoo():
    """Every test-zoo model with its example call and its optimized module (exact passes), built once."""
    import graphopt
    from tests import zoo

    return {name: (factory(), graphopt.optimize(*factory())) for name, factory in zoo.ZOO.items()}
