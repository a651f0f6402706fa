"""The search end to end on dit-digits, with small populations and few samples."""

import json
import os

import pytest

from graphopt import BudgetError, OutputPathError, SamplingPlan, UsageError
from graphopt.autodiffusion import EvolutionConfig, search_run, steps_for_nfe
from graphopt.cli import main
from graphopt.models import load
from graphopt.quality import QualityEvaluator

SMALL = EvolutionConfig(population=6, parents=3, mutations=2, crossovers=2, generations=3, steps_only=1, increments=1)


@pytest.fixture(scope="module")
def dit():
    return load("dit-digits")


@pytest.fixture(scope="module")
def evaluator():
    return QualityEvaluator.for_digits(proxy_samples=16, confirm_samples=16, confirm_seeds=(0, 1))


@pytest.fixture(scope="module")
def searched(dit, evaluator, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "out"
    model, sampler, example = dit
    result = search_run(model, sampler.with_steps(2, "euler"), example, nfe=3, evaluator=evaluator, config=SMALL,
                        workers=1, out=out, batch=16, progress=False, max_skip_ratio=0.25)
    return result, out


def test_a_search_writes_the_plan_the_front_and_its_state(searched, dit):
    result, out = searched
    assert sorted(p.name for p in out.iterdir()) == ["pareto.md", "pareto.png", "plan.json", "search-state.json"]
    plan = SamplingPlan.load(out, dit.model)
    assert plan == result.plan and plan.nfe == 3 and plan.method == "euler"
    assert plan.search["evaluations"] == len(result.state.records) <= 3 * 6
    assert plan.search["generations"] == 3 and plan.search["minutes"] > 0
    assert plan.quality.samples == 16 and plan.quality.seeds == (0, 1)
    assert plan.quality.baseline == "default schedule (euler, 3 steps)"
    assert plan.cost["gflops_per_image"] <= plan.cost["gflops_per_image_without_skips"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "chosen plan" in (out / "pareto.md").read_text()
    costs = [r.cost for r in result.front]
    assert costs == sorted(costs) and result.chosen.candidate.key in {r.candidate.key for r in result.state.records.values()}


def test_the_chosen_plan_is_the_best_confirmed_candidate(searched):
    result, _ = searched
    confirmed = result.plan.search["confirmed"]
    assert result.plan.quality.mean == min(c["mean"] for c in confirmed)


def test_the_same_seed_gives_the_same_search_and_resume_continues_it(dit, evaluator, searched, tmp_path):
    result, _ = searched
    model, sampler, example = dit
    short = EvolutionConfig(**{**SMALL.__dict__, "generations": 2})
    search_run(model, sampler.with_steps(2, "euler"), example, nfe=3, evaluator=evaluator, config=short, workers=1,
               out=tmp_path / "r", batch=16, progress=False, max_skip_ratio=0.25)
    again = search_run(model, sampler.with_steps(2, "euler"), example, nfe=3, evaluator=evaluator, config=SMALL,
                       workers=1, out=tmp_path / "r", resume=True, batch=16, progress=False, max_skip_ratio=0.25)
    assert again.state.records.keys() == result.state.records.keys()
    assert again.plan.levels == result.plan.levels


def test_an_impossible_budget_names_the_cheapest_feasible_cost(dit, evaluator, tmp_path):
    model, sampler, example = dit
    with pytest.raises(BudgetError, match=r"the cheapest this space allows is 0\.\d+"):
        search_run(model, sampler, example, nfe=4, evaluator=evaluator, config=SMALL, workers=1, max_gflops=0.01,
                   progress=False)


def test_bad_output_folders_are_refused_before_any_work(dit, evaluator, tmp_path):
    model, sampler, example = dit
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    for out, message in ((busy, "not empty"), (tmp_path / "no" / "such", "does not exist"),
                         (busy / "mine.txt", "not a folder")):
        with pytest.raises(OutputPathError, match=message):
            search_run(model, sampler, example, nfe=3, evaluator=evaluator, config=SMALL, workers=1, out=out)
    with pytest.raises(OutputPathError, match="no search-state.json"):
        search_run(model, sampler, example, nfe=3, evaluator=evaluator, config=SMALL, workers=1, out=busy,
                   resume=True)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputPathError, match="permission"):
            search_run(model, sampler, example, nfe=3, evaluator=evaluator, config=SMALL, workers=1,
                       out=locked / "x")


def test_bad_requests_are_refused(dit, evaluator):
    model, sampler, example = dit
    with pytest.raises(UsageError, match="needs encoder-decoder skips"):
        search_run(model, sampler, example, nfe=3, space=("skip-scale",), evaluator=evaluator, config=SMALL)
    with pytest.raises(UsageError, match="subset of"):
        search_run(model, sampler, example, nfe=3, space=("steps", "layers"), evaluator=evaluator, config=SMALL)
    with pytest.raises(UsageError, match="at least 1"):
        steps_for_nfe("heun", 0)
    assert steps_for_nfe("heun", 6) == 3 and steps_for_nfe("heun", 7) == 4 and steps_for_nfe("euler", 6) == 6


def test_cli_search_refuses_bad_requests_with_exit_2(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    cases = [
        (["search", "classifier-digits", "--nfe", "4", "--out", str(tmp_path / "a")], "reference generator"),
        (["search", "dit-digits", "--nfe", "4", "--space", "steps,bogus", "--out", str(tmp_path / "b")], "--space"),
        (["search", "dit-digits", "--nfe", "4", "--time-budget", "soon", "--out", str(tmp_path / "c")], "duration"),
        (["search", "dit-digits", "--nfe", "4", "--out", str(busy)], "not empty"),
        (["search", "dit-digits", "--nfe", "4", "--out", str(tmp_path / "d"), "--resume"], "no search-state"),
        (["search", "dit-digits", "--nfe", "4", "--max-gflops", "-1", "--out", str(tmp_path / "e")], "positive"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing created by a refused request


def test_cli_search_and_bench_with_the_plan(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["search", "dit-digits", "--nfe", "3", "--sampler", "euler", "--population", "4", "--generations", "2",
            "--samples", "16", "--confirm-samples", "16", "--confirm-seeds", "0", "--workers", "1", "--batch", "16",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "GFLOPs/img" in printed and "wrote" in printed
    assert main(["bench", "dit-digits", "--plan", str(out / "plan.json"), "--samples", "16", "--seeds", "0",
                 "--batch", "16", "--repeats", "1", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "plan (euler, 3 steps)" in printed and "default heun, 2 steps" in printed
    assert "default heun, 17 steps" in printed and "speedup" in printed
    data = json.loads((tmp_path / "b" / "dit-digits-plan-bench.json").read_text())
    assert [r["nfe"] for r in data["rows"]] == [3, 3, 33]
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "dit-digits", "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "not a graphopt sampling plan" in capsys.readouterr().err
    assert main(["bench", "unet-digits", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "b")]) == 2
    assert "another model" in capsys.readouterr().err


def test_a_search_can_minimise_measured_latency_with_per_step_skip_scales(tmp_path):
    from graphopt.passes.skip_scale import linear_scales

    ref = load("unet-digits")
    evaluator = QualityEvaluator.for_digits(proxy_samples=8, confirm_samples=8, confirm_seeds=(0,))
    config = EvolutionConfig(population=4, parents=2, mutations=2, crossovers=1, generations=2, steps_only=0,
                             increments=1)
    result = search_run(ref.model, ref.sampler.with_steps(2, "euler"), ref.example_inputs, nfe=3,
                        space=("skips", "skip-scale"), evaluator=evaluator, config=config, workers=1, batch=8,
                        progress=False, measure_latency=True, skip_scale_schedule="per-step", max_skip_ratio=0.2)
    assert all(r.ms is not None and r.ms > 0 and r.cost == r.ms for r in result.state.records.values())
    assert result.plan.cost["ms_per_image_measured"] == result.chosen.ms
    scales = result.plan.skip_scales
    top0, bottom0, top1, bottom1 = result.space.rho_of(result.chosen.candidate)
    assert scales[0] == pytest.approx(linear_scales(6, top0, bottom0))
    assert scales[-1] == pytest.approx(linear_scales(6, top1, bottom1))
    with pytest.raises(UsageError, match="'constant' or 'per-step'"):
        search_run(ref.model, ref.sampler, ref.example_inputs, nfe=3, evaluator=evaluator, config=config,
                   skip_scale_schedule="wavy")


def test_an_onnx_export_with_a_plan_writes_it_beside_the_file(searched, dit, tmp_path):
    import graphopt

    result, out = searched
    opt = graphopt.optimize(dit.model, dit.example_inputs)
    report = graphopt.export_onnx(opt, tmp_path / "dit.onnx", plan=result.plan)
    assert SamplingPlan.load(tmp_path / "dit.plan.json", dit.model) == result.plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.onnx", "dit.plan.json"]
    assert report.inputs == ("x", "t", "y")
    unet = load("unet-digits")
    with pytest.raises(graphopt.PlanError, match="another model"):
        graphopt.export_onnx(graphopt.optimize(unet.model, unet.example_inputs), tmp_path / "u.onnx",
                             plan=result.plan)
    assert not (tmp_path / "u.onnx").exists()


def test_cli_optimize_refuses_approximate_settings_it_cannot_use(capsys):
    assert main(["optimize", "unet-digits", "--nfe", "6"]) == 2
    assert "no approximate pass" in capsys.readouterr().err
    assert main(["optimize", "tests.zoo:unet", "--passes", "skip-scale,skip-tune"]) == 2
    assert "reference generator" in capsys.readouterr().err
    assert main(["optimize", "dit-digits", "--passes", "noop,skip-tune", "--nfe", "2"]) == 1
    assert "no encoder-decoder skips to tune" in capsys.readouterr().err
