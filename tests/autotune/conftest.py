"""Every autotune test gets a private cache root, so none can touch the real ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache_root(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("cache-root")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(root / "graphopt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
