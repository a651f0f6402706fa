import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    for var in ("GRAPHOPT_DEBUG", "GRAPHOPT_DUMP_GRAPHS", "GRAPHOPT_DISABLE_PASSES"):
        monkeypatch.delenv(var, raising=False)
