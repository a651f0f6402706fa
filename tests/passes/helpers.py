"""The one shape every rule test has: a tiny model, one pass, the op list, equality with eager, hit count."""

from __future__ import annotations

import torch
from graphopt.passes import get

import graphopt
from graphopt.pipeline import PassReport, run_passes


def run_one(model: torch.nn.Module, args: tuple, pass_name: str, **kwargs):
    captured = graphopt.capture(model.eval(), args, kwargs or None)
    [report] = run_passes(captured, [get(pass_name)])
    ops = [str(n.target).removeprefix("aten.") for n in captured.graph_module.graph.nodes
           if n.op == "call_function" and "assert" not in str(n.target) and "sym_size" not in str(n.target)]
    out = captured.run(captured.example_inputs)
    for got, want in zip(out, captured.reference_outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the batch stays dynamic after the pass: run at another batch against eager
    x5 = [torch.cat([t] * 3)[:5] if t.dim() and t.shape[0] == 2 else t for t in captured.example_inputs]
    a5, k5 = captured.call.rebuild_call(x5)
    with torch.no_grad():
        want5 = model(*a5, **k5)
    torch.testing.assert_close(captured.run(x5)[0], want5 if isinstance(want5, torch.Tensor) else want5[0])
    return ops, report, captured


def hits(report: PassReport) -> dict[str, int]:
    return dict(report.rule_hits)
