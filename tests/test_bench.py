import json

import pytest
import torch

from graphopt import UsageError
from graphopt.analysis.cost import graph_cost
from graphopt.bench import _first_sample, run_bench
from graphopt.capture import capture
from graphopt.cli import main
from graphopt.models import load


@pytest.mark.parametrize("name", ["unet-digits", "dit-digits"])
def test_bench_reports_every_figure_and_writes_json_and_grid(tmp_path, name):
    result = run_bench(name, steps=2, method="euler", batch=8, samples=16, seeds=(0, 1), repeats=1,
                       out_dir=tmp_path, progress=False)
    assert result.nfe == 2 and result.latency_ms_per_image > 0 and result.parameters > 100_000
    assert result.fd["samples"] == 16 and len(result.fd["values"]) == 2
    assert 0 < result.fd_floor < result.fd_ceiling and result.flops_per_image > 0
    data = json.loads((tmp_path / f"{name}-bench.json").read_text())
    assert data["nfe"] == 2 and data["conditions"]["device"] == "cpu"
    assert (tmp_path / f"{name}-grid.png").read_bytes()[:4] == b"\x89PNG"
    if name == "dit-digits":  # costed from a static batch-1 capture: the dynamic capture's cost at batch 1
        ref = load(name)
        captured = capture(ref.model, ref.example_inputs)
        per_call = graph_cost(captured.graph_module, captured.batch_symbol()).at(1)[0]
        guided = 2 if result.cfg_scale != 1.0 else 1  # guidance runs each call on the doubled batch
        assert result.flops_per_image == pytest.approx(result.nfe * guided * float(per_call))


def test_first_sample_cuts_every_tensor_of_the_batch_and_nothing_else():
    x, t, table = torch.randn(4, 3, 2), torch.rand(4), torch.randn(5, 4)
    cut = _first_sample((x, t, table, torch.tensor(2.0), 7))
    assert [tuple(v.shape) for v in cut[:4]] == [(1, 3, 2), (1,), (5, 4), ()] and cut[4] == 7
    assert torch.equal(cut[0], x[:1]) and cut[2] is table


def test_bench_samples_var_digits_scale_by_scale(tmp_path):
    result = run_bench("var-digits", batch=8, samples=16, seeds=(0,), repeats=1, out_dir=tmp_path, progress=False)
    assert result.sampler == "var" and result.nfe == result.steps == 7
    assert result.fd["samples"] == 16 and 0 <= result.class_agreement["mean"] <= 1
    # every scale's own cost, the guided half included: more than 7 calls at the first scale's cost
    assert result.flops_per_image > 0 and "class agreement" in result.summary()
    assert (tmp_path / "var-digits-grid.png").is_file()
    with pytest.raises(UsageError, match="scale by scale"):
        run_bench("var-digits", steps=16, out_dir=tmp_path)
    assert main(["bench", "var-digits", "--sampler", "euler", "--out", str(tmp_path)]) == 2


def test_bench_with_passes_reports_fidelity(tmp_path):
    result = run_bench("dit-digits", steps=1, method="euler", batch=4, samples=8, seeds=(0,), repeats=1,
                       out_dir=tmp_path, passes=["noop", "fold", "dce"], progress=False)
    assert result.passes == ("noop", "fold", "dce") and result.psnr_vs_original > 60  # exact passes


def test_bench_rejects_non_generators(tmp_path, capsys):
    with pytest.raises(UsageError, match="reference generator"):
        run_bench("classifier-digits", out_dir=tmp_path)
    with pytest.raises(UsageError, match="reference generator"):
        run_bench("var-digits-vq", out_dir=tmp_path)
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as info:  # argparse rejects it before any work
        main(["bench", "dit-digits", "--steps", "0"])
    assert info.value.code == 2
