import pytest
import torch
from torch import nn

import graphopt
from graphopt import PassError, VerificationError
from graphopt.pipeline import MatchResult, Pass, Rule, rule_pass, run_passes

aten = torch.ops.aten


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 1.0 + 0.5


def _captured():
    return graphopt.capture(Small().eval(), (torch.randn(2, 4),))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rule_pass_counts_hits_tags_nothing_new_and_keeps_near_misses():
    def check(node):
        if node.args[1] == 1.0:
            return MatchResult.success()
        return MatchResult.fail(f"scale is {node.args[1]}, not 1")

    mul_one = Rule("mul-one", (aten.mul.Tensor,), check, lambda n: n.args[0])
    add_any = Rule("add-half", (aten.add.Tensor,), lambda n: MatchResult.fail("not neutral"), lambda n: n)
    captured = _captured()
    [report] = run_passes(captured, [rule_pass("demo", (mul_one,) + (add_any,))])
    assert report.hits == 1 and dict(report.rule_hits) == {"mul-one": 1}
    assert aten.mul.Tensor not in _targets(captured.graph_module)
    assert [(m.rule, m.reason) for m in report.near_misses] == [("add-half", "not neutral")]
    assert report.nodes_removed == 1 and report.nodes_added == 0 and report.verified


def test_an_exact_pass_that_changes_outputs_is_named():
    def scale_up(gm, ctx):
        for node in gm.graph.nodes:
            if node.target == aten.relu.default:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(aten.mul.Tensor, (node, 2.0))
                node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
                ctx.hit("double")

    with pytest.raises(VerificationError, match="exact pass 'doubler'"):
        run_passes(_captured(), [Pass("doubler", True, scale_up)])
    # the same change declared approximate is measured, not rejected
    [report] = run_passes(_captured(), [Pass("doubler", False, scale_up)])
    assert not report.verified and report.max_abs_error > 0
    assert any(n.meta.get("graphopt_pass") == "doubler" for n in _captured_graph_after(scale_up).graph.nodes)


def _captured_graph_after(transform):
    captured = _captured()
    run_passes(captured, [Pass("doubler", False, transform)])
    return captured.graph_module


def test_a_pass_that_raises_or_breaks_the_graph_is_named():
    def boom(gm, ctx):
        raise RuntimeError("kaput")

    with pytest.raises(PassError, match="pass 'boom' failed: RuntimeError: kaput"):
        run_passes(_captured(), [Pass("boom", True, boom)])

    def dangling(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(aten.relu.default, (out,))  # uses a node defined after it

    with pytest.raises(PassError, match="pass 'dangling'"):
        run_passes(_captured(), [Pass("dangling", True, dangling)])


def test_passes_can_be_disabled_and_dumped_from_the_environment(monkeypatch, tmp_path):
    from graphopt.passes import resolve

    monkeypatch.setenv("GRAPHOPT_DISABLE_PASSES", "fold")
    monkeypatch.setenv("GRAPHOPT_DUMP_GRAPHS", str(tmp_path))
    reports = run_passes(_captured(), resolve(["noop", "fold", "dce"]))
    assert [r.skipped for r in reports] == [False, True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-noop-after.py", "00-noop-before.py", "02-dce-after.py", "02-dce-before.py"]
    assert "mul" in (tmp_path / "00-noop-before.py").read_text()
    assert "mul" not in (tmp_path / "00-noop-after.py").read_text()


def test_debug_switch_logs_rule_hits(monkeypatch, caplog):
    from graphopt.passes import resolve

    monkeypatch.setenv("GRAPHOPT_DEBUG", "1")
    with caplog.at_level("WARNING", logger="graphopt"):
        run_passes(_captured(), resolve(["noop"]))
    assert "pass noop: 1 hits {'mul-by-one': 1}" in caplog.text


def test_unknown_pass_names_suggest_the_closest():
    from graphopt.passes import resolve

    from graphopt import UnknownPassError

    with pytest.raises(UnknownPassError, match="did you mean 'fold'"):
        resolve(["fodl"])
    with pytest.raises(UnknownPassError, match="available: noop, fold, cse, merge-linears, batch-branches, dce"):
        resolve("noop,nope")


# ------------------------------------------------------------------ fp16/bf16: what "exact" is held to


class Rounds(nn.Module):
    """bf16 eager rounds after the multiply and again after the add."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x) * 1.37 + 0.11


def _in_fp32(factor):
    """A pass computing the multiply-add in fp32 (rounded once, not twice), scaled by ``factor``."""
    def transform(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target == aten.add.Tensor and node.args[0].target == aten.mul.Tensor:
                mul = node.args[0]
                with gm.graph.inserting_before(node):
                    up = gm.graph.call_function(aten._to_copy.default, (mul.args[0],), {"dtype": torch.float32})
                    y = gm.graph.call_function(aten.mul.Tensor, (up, mul.args[1] * factor))
                    y = gm.graph.call_function(aten.add.Tensor, (y, node.args[1]))
                    down = gm.graph.call_function(aten._to_copy.default, (y,), {"dtype": torch.bfloat16})
                node.replace_all_uses_with(down)
                gm.graph.erase_node(node)
                gm.graph.erase_node(mul)
                ctx.hit("fp32 multiply-add")
    return transform


def _bf16_captured():
    torch.manual_seed(0)
    return graphopt.capture(Rounds().eval().to(torch.bfloat16), (torch.randn(256, 64, dtype=torch.bfloat16),))


def test_bf16_passes_state_the_dtypes_bound_in_the_report():
    captured = graphopt.capture(Small().eval().to(torch.bfloat16), (torch.randn(2, 4, dtype=torch.bfloat16),))
    [report] = run_passes(captured, [graphopt.passes.resolve(["noop"])[0]])
    assert report.tolerance == "bfloat16: max|err| <= 0.01 + 0.02 x max|ref|"


def test_a_bf16_pass_that_rounds_differently_is_judged_by_an_fp32_run(monkeypatch):
    # a bound too tight for two bf16 roundings: the rewrite is no further from the exact result than
    # the original, so it passes, and the report says by which rule
    monkeypatch.setitem(graphopt.verify.TOLERANCES, torch.bfloat16, (1e-6, 0.0))
    [report] = run_passes(_bf16_captured(), [Pass("fp32-madd", True, _in_fp32(1.0))])
    assert report.verified and report.max_abs_error > 1e-3
    assert "against an fp32 run of the same graph" in report.tolerance
    with pytest.raises(VerificationError, match="fp32 run of the same graph"):
        run_passes(_bf16_captured(), [Pass("fp32-madd", True, _in_fp32(1.02))])
