import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.passes.skip_scale import INPUT, encoder_decoder_skips, linear_scales
from tests import zoo

PIPELINE = ["noop", "fold", "dce", "skip-scale"]
# the encoder-decoder skips each UNet style has (tests/analysis/test_blocks.py checks which they are)
SKIPS = {"unet": 4, "list_unet": 3, "dict_unet": 2, "uvit": 3, "text_unet": 4}


@pytest.fixture(scope="module")
def scaled():
    return {name: (zoo.ZOO[name](), graphopt.optimize(*zoo.ZOO[name](), passes=PIPELINE)) for name in SKIPS}


@pytest.mark.parametrize("name", sorted(SKIPS))
def test_every_encoder_decoder_skip_gets_a_scale_and_rho_one_is_bit_exact(scaled, name):
    (model, args, kwargs), opt = scaled[name]
    report = opt.report.passes[-1]
    assert report.name == "skip-scale" and report.exact and report.verified
    assert report.hits == SKIPS[name] and dict(report.rule_hits) == {"skip": SKIPS[name]}
    assert opt.captured.call.extras == (INPUT,)
    assert opt.captured.example_inputs[-1].tolist() == [1.0] * SKIPS[name]
    with torch.no_grad():
        want = model(*args, **kwargs)
        assert torch.equal(opt(*args, **kwargs), want)  # the default scales: bit parity
        assert torch.equal(opt(*args, **kwargs, skip_scales=torch.ones(SKIPS[name])), want)
        changed = opt(*args, **kwargs, skip_scales=torch.full((SKIPS[name],), 0.5))
    assert not torch.allclose(changed, want)


def test_each_scale_acts_on_its_own_skip_in_join_order():
    model, args, kwargs = zoo.unet()
    opt = graphopt.optimize(model, args, passes=PIPELINE)
    captured = graphopt.capture(model, args)
    joins = [e.join for e in encoder_decoder_skips(captured.graph_module)]
    assert len(joins) == 4
    # scale i acts on exactly the skip the i-th decoder concat reads: compare with the model whose
    # i-th popped skip is scaled by hand
    for i in range(4):
        scales = torch.ones(4)
        scales[i] = 0.3
        model.skip_rho = {i: 0.3}
        try:
            with torch.no_grad():
                got, want = opt(*args, skip_scales=scales), model(*args)
        finally:
            model.skip_rho = {}
        torch.testing.assert_close(got, want)


def test_models_without_skips_are_left_alone():
    model, args, kwargs = zoo.dit()
    opt = graphopt.optimize(model, args, kwargs, passes=PIPELINE)
    report = opt.report.passes[-1]
    assert report.hits == 0 and report.nodes_before == report.nodes_after
    assert opt.captured.call.extras == () and "no encoder-decoder skip" in report.notes[0]


def test_linear_scales_run_from_the_deepest_skip_to_the_top():
    assert linear_scales(5, rho_top=1.0, rho_bottom=0.6) == pytest.approx((0.6, 0.7, 0.8, 0.9, 1.0))
    assert linear_scales(1, 0.9, 0.5) == (0.9,)
    assert linear_scales(0, 0.9, 0.5) == ()


def test_scales_are_inputs_of_the_saved_module_and_the_onnx_file(scaled, tmp_path):
    import onnxruntime as ort

    (model, args, kwargs), opt = scaled["unet"]
    loaded = graphopt.load(opt.save(tmp_path / "m"))
    scales = torch.tensor([0.9, 0.8, 0.7, 0.6])
    with torch.no_grad():
        want = opt(*args, skip_scales=scales)
        torch.testing.assert_close(loaded(*args, skip_scales=scales), want)
        torch.testing.assert_close(loaded(*args), model(*args))
    report = graphopt.export_onnx(opt, tmp_path / "m.onnx")
    assert report.inputs == ("x", "sigma", "skip_scales")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": args[0].numpy(), "sigma": args[1].numpy(), "skip_scales": scales.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), want, atol=1e-4, rtol=1e-3)


def test_a_scaled_skip_keeps_working_at_another_batch(scaled):
    (model, args, _), opt = scaled["unet"]
    scales = torch.tensor([0.9, 0.8, 0.7, 0.6])
    with torch.no_grad():
        whole = opt(*args, skip_scales=scales)
        one = opt(args[0][:1], args[1][:1], skip_scales=scales)  # batch 1 is in the captured range
        three = opt(args[0][[0, 1, 0]], args[1][[0, 1, 0]], skip_scales=scales)
    torch.testing.assert_close(one, whole[:1])
    torch.testing.assert_close(three, whole[[0, 1, 0]])
    assert opt.report.batch_range == (1, None) and opt.report.recaptures == 0


def test_cli_inserts_scales_on_a_model_from_a_file(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text("from tests.zoo import list_unet as make\n")
    assert main(["optimize", f"{path}:make", "--passes", "noop,fold,dce,skip-scale"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("skip-scale"))
    assert row.split()[1:3] == ["exact", "3"]  # kind, hits: the three skips scaled
