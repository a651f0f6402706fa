import dataclasses
import json

import pytest
import torch

import graphopt
from graphopt import PlanError, SamplingPlan
from graphopt.models import load
from graphopt.plan import ModelIdentity, fingerprint
from graphopt.planned import PlannedDenoiser, PlanSampler, example_call


@pytest.fixture(scope="module")
def unet():
    ref = load("unet-digits")
    planned = PlannedDenoiser.build(ref.model, ref.example_inputs)
    return ref, planned


def _plan(planned, sampler, **fields):
    return SamplingPlan(planned.identity(), sampler.family, sampler.method, sampler.levels, sampler.shape, **fields)


def test_identity_names_the_model_its_blocks_and_skips(unet):
    ref, planned = unet
    identity = planned.identity()
    assert identity.name == "EDMUNet" and identity.fingerprint == fingerprint(ref.model)
    assert identity.skips == 6 and len(identity.blocks) == 15
    assert identity.blocks[3] == (3, "enc.2.attention.0", "attention")


def test_a_plan_round_trips_through_json_and_says_what_it_does(unet, tmp_path):
    ref, planned = unet
    sampler = ref.sampler.with_steps(3, "euler")
    plan = _plan(planned, sampler, skipped=((), (3, 5), ()), skip_scales=((1.0,) * 6, (0.9,) * 6, (0.8,) * 6))
    plan = dataclasses.replace(plan, cost=planned.plan_cost(plan))
    path = plan.save(tmp_path)  # a folder gets plan.json
    assert path == tmp_path / "plan.json"
    data = json.loads(path.read_text())
    assert data["schema"] == "graphopt.sampling-plan" and data["schema_version"] == 1 and data["nfe"] == 3
    assert data["steps"][1]["skip_blocks"] == [{"id": 3, "module": "enc.2.attention.0"}, {"id": 5, "module": "mid.1"}]
    assert data["steps"][2]["skip_scales"] == [0.8] * 6
    assert SamplingPlan.load(tmp_path, ref.model) == plan
    assert "skip 3 (enc.2.attention.0), 5 (mid.1)" in plan.describe()
    cost = plan.cost
    assert cost["gflops_per_image"] < cost["gflops_per_image_without_skips"]
    assert cost["block_calls"] == 3 * 15 - 2


def test_heun_counts_one_call_on_its_last_step(unet):
    ref, planned = unet
    plan = _plan(planned, ref.sampler.with_steps(4, "heun"))
    assert plan.nfe == 7 == ref.sampler.with_steps(4, "heun").nfe
    assert [plan.calls(i) for i in range(4)] == [2, 2, 2, 1]


def test_the_plan_sampler_is_the_reference_sampler_when_nothing_is_skipped_or_scaled(unet):
    ref, planned = unet
    sampler = ref.sampler.with_steps(3, "heun")
    noise = sampler.noise(4, seed=0)
    got = _plan(planned, sampler).sampler().sample(ref.model, noise)
    assert torch.equal(got, sampler.sample(ref.model, noise))


def test_the_plan_sampler_skips_and_scales_per_step(unet):
    ref, planned = unet
    sampler = ref.sampler.with_steps(3, "euler")
    skipped, scales = ((), (5,), (7, 9)), ((1.0,) * 6, (0.8,) * 6, (0.7,) * 6)
    plan = _plan(planned, sampler, skipped=skipped, skip_scales=scales)
    noise = sampler.noise(4, seed=1)
    got = plan.sampler().sample(ref.model, noise)
    # the same steps by hand: per step, the variant without the step's blocks, with its scales
    module = planned.module
    steps = [module.with_skipped(skipped[i]) for i in range(3)]
    want = sampler.sample_steps(
        lambda i: (lambda x, s: steps[i](x, s, skip_scales=torch.tensor(scales[i]))), noise)
    assert torch.equal(got, want)
    assert not torch.allclose(got, sampler.sample(ref.model, noise))


def test_a_plan_works_with_a_dit_and_guidance():
    ref = load("dit-digits")
    sampler = dataclasses.replace(ref.sampler.with_steps(2, "euler"), cfg_scale=2.0)
    noise, labels = sampler.noise(3, seed=0), sampler.labels(3, seed=0)
    planned = PlannedDenoiser.build(ref.model, example_call("flow", noise, 1.0, labels, 10))
    assert planned.skips == 0 and len(planned.blocks) == 8
    plan = SamplingPlan(planned.identity(), "flow", "euler", sampler.levels, sampler.shape, skipped=((1,), ()),
                        cfg_scale=2.0, null_class=10)
    got = plan.sampler().sample(ref.model, noise, labels)
    assert got.shape == noise.shape and torch.isfinite(got).all()
    assert planned.plan_cost(plan)["gflops_per_image"] < planned.plan_cost(
        dataclasses.replace(plan, skipped=()))["gflops_per_image"]


def _write(tmp_path, data):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_malformed_plans_raise_one_clear_error_each(unet, tmp_path):
    ref, planned = unet
    good = _plan(planned, ref.sampler.with_steps(2, "euler"), skipped=((3,), ())).to_json()
    cases = {
        "not valid JSON": "{",
        "not a graphopt sampling plan": {"levels": [1, 0]},
        "schema version 7": {**good, "schema_version": 7},
        "strictly decrease to 0": {**good, "levels": [80.0, 90.0, 0.0]},
        "skips unknown block 99": {**good, "steps": [{**good["steps"][0], "skip_blocks": [{"id": 99}]},
                                                     good["steps"][1]]},
        "block 3 of EDMUNet is 'enc.2.attention.0'": {
            **good, "steps": [{**good["steps"][0], "skip_blocks": [{"id": 3, "module": "mid.1"}]}, good["steps"][1]]},
        "need 2 steps": {**good, "steps": good["steps"][:1]},
        "is malformed": {**good, "sampler": {"family": "edm"}},
    }
    for message, data in cases.items():
        with pytest.raises(PlanError, match=message):
            SamplingPlan.load(_write(tmp_path, data))
    with pytest.raises(PlanError, match="no sampling plan"):
        SamplingPlan.load(tmp_path / "missing.json")


def test_a_plan_for_another_model_is_refused(unet, tmp_path):
    ref, planned = unet
    plan = _plan(planned, ref.sampler.with_steps(2, "euler"), skipped=((3,), ()))
    path = plan.save(tmp_path / "plan.json")
    other = load("dit-digits")
    with pytest.raises(PlanError, match="made for another model"):
        SamplingPlan.load(path, other.model)
    sampler = PlanSampler(plan)
    with pytest.raises(PlanError, match="another model"):
        sampler.sample(other.model, other.sampler.noise(2, 0), torch.tensor([1, 2]))
    # the same architecture with other block structure in its identity: the blocks must match too
    fake = dataclasses.replace(plan, model=ModelIdentity("EDMUNet", plan.model.fingerprint,
                                                         plan.model.blocks[:-1], plan.model.skips))
    with pytest.raises(PlanError, match="blocks"):
        fake.sampler().sample(ref.model, ref.sampler.noise(2, 0))


def test_a_plan_saved_with_a_module_fits_it_after_loading(unet, tmp_path):
    ref, planned = unet
    plan = _plan(planned, ref.sampler.with_steps(2, "euler"), skipped=((), (3,)),
                 skip_scales=((0.9,) * 6, (0.8,) * 6))
    path = planned.module.save(tmp_path / "saved", plan=plan)
    assert (path / "plan.json").is_file()
    loaded = graphopt.load(path)
    again = SamplingPlan.load(path, loaded)
    noise = ref.sampler.noise(2, 0)
    torch.testing.assert_close(again.sampler().sample(loaded, noise), plan.sampler().sample(ref.model, noise))


def test_bad_plans_are_refused_when_built(unet):
    ref, planned = unet
    sampler = ref.sampler.with_steps(2, "euler")
    with pytest.raises(PlanError, match="2 steps but 3 skip sets"):
        _plan(planned, sampler, skipped=((), (), ()))
    with pytest.raises(PlanError, match="lists a block twice"):
        _plan(planned, sampler, skipped=((3, 3), ()))
    with pytest.raises(PlanError, match="6 encoder-decoder skips"):
        _plan(planned, sampler, skip_scales=((1.0,), (1.0,)))
    with pytest.raises(PlanError, match="non-finite"):
        _plan(planned, sampler, skip_scales=((float("nan"),) * 6, (1.0,) * 6))


def test_saving_a_plan_into_a_missing_folder_is_refused_and_writes_nothing(unet, tmp_path):
    from graphopt import OutputPathError

    ref, planned = unet
    plan = _plan(planned, ref.sampler.with_steps(2, "euler"))
    with pytest.raises(OutputPathError, match="does not exist"):
        plan.save(tmp_path / "missing" / "plan.json")
    assert list(tmp_path.iterdir()) == []


def test_export_with_a_malformed_plan_exits_2_before_writing(tmp_path, capsys):
    from graphopt.cli import main

    (tmp_path / "plan.json").write_text('{"schema": "graphopt.sampling-plan", "schema_version": 1}')
    assert main(["export", "tests.zoo:unet", "--out", str(tmp_path / "m.onnx"), "--plan",
                 str(tmp_path / "plan.json")]) == 2
    assert "is malformed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
