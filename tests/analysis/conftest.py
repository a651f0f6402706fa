"""Shared fixtures: each zoo model is captured and analysed once per test session."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import graphopt
from graphopt.analysis import GraphAnalysis, analyse
from tests import zoo


@pytest.fixture(scope="session")
def analysed() -> Callable[[str], tuple[graphopt.CapturedGraph, GraphAnalysis]]:
    cache: dict[str, tuple[graphopt.CapturedGraph, GraphAnalysis]] = {}

    def get(name: str) -> tuple[graphopt.CapturedGraph, GraphAnalysis]:
        if name not in cache:
            model, args, kwargs = zoo.ZOO[name]()
            captured = graphopt.capture(model, args, kwargs)
            cache[name] = (captured, analyse(captured))
        return cache[name]

    return get
