"""Distillation of a substituted student towards its teacher: seeded, resumable, never touching the teacher."""

import dataclasses
import json

import pytest
import torch

import graphopt
import graphopt.quality
from graphopt import DistillConfig, OutputPathError, UsageError, distill
from graphopt.approx import ApproxOutcome, _apply
from graphopt.distill import CHECKPOINT, RECORD, _DigitsTask
from graphopt.passes.linear_attention import LinearAttentionOptions, substitute_linear_attention
from tests import zoo

SMALL = dict(steps=12, batch=8, lr=1e-3, warmup=2, checkpoint_every=4)


def _student():
    model, args, kwargs = zoo.dit()
    opt = graphopt.optimize(model, args, kwargs)
    gm, replaced = substitute_linear_attention(opt.captured.graph_module, LinearAttentionOptions())
    _apply(opt, ApproxOutcome(graph=gm))
    return opt, model, args


def _fresh_values(opt):
    return {n: p.detach().clone() for n, p in opt.captured.graph_module.graphopt_fresh.named_parameters()}


def _gap(opt, model, args):
    """Mean squared output difference on 64 inputs drawn like the examples (what it trains on)."""
    from graphopt.distill import _SyntheticTask

    inputs = _SyntheticTask(args).draw(64, torch.Generator().manual_seed(5))[0]
    with torch.no_grad():
        return float((opt(*inputs) - model(*inputs)).pow(2).mean())


def test_distillation_brings_the_student_towards_the_teacher_and_leaves_the_teacher_alone():
    opt, model, args = _student()
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    before = _gap(opt, model, args)
    report = distill(opt, model, config=DistillConfig(**SMALL, all_steps=4), progress=False)
    assert _gap(opt, model, args) < 0.6 * before
    assert all(torch.equal(teacher[k], v) for k, v in model.state_dict().items())  # also after training all
    assert report.steps == 16 and report.data == "synthetic inputs" and report.quality is None
    assert [s for s, _ in report.losses] == [4, 8, 12, 16]
    assert opt.report.passes[-1].name == "distill" and opt.report.passes[-1].hits == report.trained_tensors
    assert not any(p.requires_grad for p in opt.captured.graph_module.parameters())


def test_the_same_seed_gives_the_same_student():
    a, model_a, _ = _student()
    b, model_b, _ = _student()
    distill(a, model_a, config=DistillConfig(**SMALL), progress=False)
    distill(b, model_b, config=DistillConfig(**SMALL), progress=False)
    for (name, x), y in zip(_fresh_values(a).items(), _fresh_values(b).values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("extra", [{}, {"ema": 0.8, "schedule": "cosine", "all_steps": 4}], ids=["plain", "ema-cosine"])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, extra):
    config = DistillConfig(**SMALL, **extra)
    whole, model, _ = _student()
    distill(whole, model, config=config, checkpoint_dir=tmp_path / "whole", progress=False)

    cut, model, _ = _student()
    from graphopt.distill import _SyntheticTask

    draw = _SyntheticTask.draw
    calls = []

    def interrupted(self, batch, g):
        calls.append(1)
        if len(calls) == 7:  # after the checkpoint of step 4 and before the one of step 8
            raise KeyboardInterrupt
        return draw(self, batch, g)

    monkeypatch.setattr(_SyntheticTask, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(cut, model, config=config, checkpoint_dir=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / CHECKPOINT).is_file() and (tmp_path / "cut" / RECORD).is_file()
    monkeypatch.setattr(_SyntheticTask, "draw", draw)
    resumed, model, _ = _student()  # a fresh process: the student rebuilt, its state from the checkpoint
    report = distill(resumed, model, config=config, checkpoint_dir=tmp_path / "cut", resume=True, progress=False)
    assert report.steps == config.total
    for (name, x), y in zip(_fresh_values(whole).items(), _fresh_values(resumed).values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)
    again, model, _ = _student()  # resuming a finished run ends on the same state (the average, with ema)
    distill(again, model, config=config, checkpoint_dir=tmp_path / "whole", resume=True, progress=False)
    for (name, x), y in zip(_fresh_values(whole).items(), _fresh_values(again).values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_the_schedule_warms_up_and_decays_within_each_phase():
    config = DistillConfig(steps=10, all_steps=20, lr=1e-3, warmup=2, schedule="cosine")
    lrs = [config.learning_rate(s) for s in range(1, 31)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # warm-up
    assert all(a >= b for a, b in zip(lrs[1:9], lrs[2:10])) and lrs[9] == pytest.approx(0, abs=1e-12)
    assert lrs[10] == pytest.approx(5e-4) and lrs[29] == pytest.approx(0, abs=1e-12)  # the second phase anew
    constant = DistillConfig(steps=10, lr=1e-3, warmup=2)
    assert [constant.learning_rate(s) for s in (1, 2, 10)] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_with_ema_the_moving_average_is_what_is_kept():
    plain, model, args = _student()
    distill(plain, model, config=DistillConfig(**SMALL), progress=False)
    # a decay of ~0 makes the average the iterate itself: the same student as without it
    tiny, model, _ = _student()
    distill(tiny, model, config=DistillConfig(**SMALL, ema=1e-12), progress=False)
    for (name, x), y in zip(_fresh_values(plain).items(), _fresh_values(tiny).values()):
        assert torch.equal(x, y), name
    # a long average lags the iterate: the student ends between its start and the plain run's end
    start, model, _ = _student()
    start_values = _fresh_values(start)
    averaged, model, _ = _student()
    distill(averaged, model, config=DistillConfig(**SMALL, ema=0.9), progress=False)
    moved = sum(float((a - s).norm()) for a, s in zip(_fresh_values(averaged).values(), start_values.values()))
    full = sum(float((p - s).norm()) for p, s in zip(_fresh_values(plain).values(), start_values.values()))
    assert 0 < moved < full


def test_bad_requests_are_clear_errors_and_write_nothing(tmp_path):
    opt, model, _ = _student()
    with pytest.raises(UsageError, match="at least one step"):
        DistillConfig(steps=0)
    with pytest.raises(UsageError, match="not both zero"):
        DistillConfig(lambda1=0, task_weight=0)
    with pytest.raises(UsageError, match="unknown learning-rate schedule 'linear'; choose from constant, cosine"):
        DistillConfig(schedule="linear")
    with pytest.raises(UsageError, match=r"ema must be a decay in \[0, 1\), got 1.0"):
        DistillConfig(ema=1.0)
    with pytest.raises(UsageError, match="no distillation checkpoint"):
        distill(opt, model, config=DistillConfig(**SMALL), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(OutputPathError, match="does not exist"):
        distill(opt, model, config=DistillConfig(**SMALL), checkpoint_dir=tmp_path / "no" / "such", progress=False)
    assert not (tmp_path / "no").exists()
    plain = graphopt.optimize(*zoo.dit()[:2])
    with pytest.raises(UsageError, match="no new parameters"):
        distill(plain, zoo.dit()[0], config=DistillConfig(**SMALL), progress=False)
    distill(opt, model, config=DistillConfig(**SMALL), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(OutputPathError, match="holds a distillation checkpoint"):
        distill(opt, model, config=DistillConfig(**SMALL), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(UsageError, match="other distillation settings"):
        distill(opt, model, config=DistillConfig(**{**SMALL, "lr": 1e-4}), checkpoint_dir=tmp_path / "c",
                resume=True, progress=False)


def test_a_reference_generator_is_distilled_on_its_own_objective():
    from graphopt.models import load

    ref = load("dit-digits")
    task = _DigitsTask("dit", ref.model.config, ref.model.null_class)
    (xt, t, y), target, weight = task.draw(4, torch.Generator().manual_seed(0))
    assert xt.shape == target.shape == (4, 1, 16, 16) and weight is None and "training digits" in task.name
    ref = load("unet-digits")
    (noisy, sigma), target, weight = _DigitsTask("unet", ref.model.config, None).draw(4, torch.Generator())
    assert noisy.shape == target.shape and weight.shape == sigma.shape == (4,)


def test_a_time_budget_stops_after_the_step_that_crosses_it(tmp_path):
    opt, model, _ = _student()
    report = distill(opt, model, config=DistillConfig(**SMALL, max_minutes=1e-6), checkpoint_dir=tmp_path / "t",
                     progress=False)
    assert report.steps == 1 and report.losses == ((1, report.loss),)
    assert (tmp_path / "t" / CHECKPOINT).is_file()
    with pytest.raises(UsageError, match="max_minutes"):
        DistillConfig(max_minutes=0)


class _Scripted(graphopt.quality.OutputFidelity):
    """Output fidelity whose scores follow a script, to decide which state is best."""

    def __init__(self, script):
        super().__init__(samples=8, seeds=(0,))
        object.__setattr__(self, "script", list(script))

    def measure(self, generate, baseline=None, *, samples=None, seeds=None):
        cost = super().measure(generate, baseline, samples=samples, seeds=seeds)
        return dataclasses.replace(cost, values=(self.script.pop(0),)) if self.script else cost


def test_the_best_scored_state_is_kept_not_the_last():
    opt, model, args = _student()
    context = graphopt.ApproxContext(model, None, tuple(args), _Scripted([5.0, 3.0, 1.0, 2.0]))
    report = distill(opt, model, config=DistillConfig(**SMALL), context=context, progress=False)
    assert report.scores == ((0, 5.0), (4, 3.0), (8, 1.0), (12, 2.0)) and report.kept_step == 8
    assert "kept the state of step 8 of 4 scored" in report.line()
    reference, model, _ = _student()  # the same run stopped at step 8
    distill(reference, model, config=DistillConfig(**{**SMALL, "steps": 8}), progress=False)
    for (name, x), y in zip(_fresh_values(reference).items(), _fresh_values(opt).values()):
        assert torch.equal(x, y), name


def test_training_that_only_hurts_keeps_the_pass_own_result():
    opt, model, args = _student()
    untrained = _fresh_values(opt)
    context = graphopt.ApproxContext(model, None, tuple(args), _Scripted([1.0, 2.0, 3.0, 4.0]))
    report = distill(opt, model, config=DistillConfig(**SMALL), context=context, progress=False)
    assert report.kept_step == 0 and "the pass's own result" in report.line()
    for (name, x), y in zip(untrained.items(), _fresh_values(opt).values()):
        assert torch.equal(x, y), name
    with pytest.raises(UsageError, match="select_every"):
        DistillConfig(select_every=0)


def test_real_scores_pick_the_closest_student_and_go_into_the_checkpoint(tmp_path):
    opt, model, args = _student()
    context = graphopt.ApproxContext.for_model(model, args, samples=16, seeds=(0,))
    report = distill(opt, model, config=DistillConfig(**SMALL), context=context, checkpoint_dir=tmp_path / "c",
                     progress=False)
    steps = [s for s, _ in report.scores]
    assert steps == [0, 4, 8, 12] and report.kept_step == min(report.scores, key=lambda s: s[1])[0]
    assert report.quality is not None  # the kept state is what was measured
    record = json.loads((tmp_path / "c" / RECORD).read_text())
    assert [s for s, _ in record["scores"]] == steps
