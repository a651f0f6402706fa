"""Running a lowered graph site by site: the check of every kernel against its region's ATen ops.

Where it belongs: after :func:`.lower.lower`, before the lowered module is handed out
(:func:`graphopt.lowering.lower_captured`), and wherever a tool needs the tensors each call site
meets (``graphopt autotune``, the compile check). Not on any call path of a lowered module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from graphopt.verify import Comparison

from .sites import _Tuned


class _Sites(fx.Interpreter):
    """Runs a lowered graph node by node, handing every kernel call site and its inputs to ``visit``,
    whose return value is what the rest of the graph sees."""

    def __init__(self, gm: fx.GraphModule, visit: Callable[[str, _Tuned, tuple], Any]):
        super().__init__(gm)
        self.visit = visit

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, _Tuned):
            return self.visit(target.rsplit(".", 1)[-1], module, args)
        return super().call_module(target, args, kwargs)


def call_sites(lowered: fx.GraphModule, inputs: Sequence[torch.Tensor], *,
               run_kernels: bool = True) -> list[tuple[_Tuned, tuple]]:
    """Every kernel call site of ``lowered`` with the tensors it is called with on ``inputs``.

    With ``run_kernels=False`` the sites' eager references stand in for the kernels (to collect the
    inputs of kernels that cannot run here, e.g. compiled for a GPU this machine lacks).
    """
    calls: list[tuple[_Tuned, tuple]] = []

    def visit(name: str, site: _Tuned, args: tuple) -> Any:
        calls.append((site, args))
        return site(*args) if run_kernels else site.reference(*args)

    with torch.no_grad():
        _Sites(lowered, visit).run(*inputs)
    return calls


def check_regions(lowered: fx.GraphModule,
                  inputs: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, Comparison]]:
    """Run ``lowered`` on ``inputs`` comparing every kernel with its region's eager ops on the same inputs.

    Returns the outputs and, per region, the comparison (errors, verdict, the bound applied): the
    dtype's bound, or in fp16/bf16 beyond it, the region's ATen ops run in fp32 as the referee
    (:func:`graphopt.verify.compare_precise`).
    """
    errors: dict[str, Comparison] = {}

    def visit(name: str, site: _Tuned, args: tuple) -> Any:
        got = site(*args)
        errors[name] = site.check(got, args)
        return got

    with torch.no_grad():
        out = _Sites(lowered, visit).run(*inputs)
    return tuple(out), errors
