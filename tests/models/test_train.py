import pytest
import torch

from graphopt import LoadError
from graphopt.models import load
from graphopt.models.checkpoint import read_checkpoint
from graphopt.models.train import TrainConfig, main, train
from tests.models.tiny import DIT, UNET, VAR, VQ

FEW = TrainConfig(steps=3, batch=4, lr=1e-3, save_every=2)


@pytest.mark.parametrize("family, config", [("unet", UNET), ("dit", DIT), ("classifier", None), ("vq", VQ),
                                            ("var", VAR)])
def test_a_few_training_steps_write_a_loadable_checkpoint(tmp_path, family, config):
    path = tmp_path / f"{family}.safetensors"
    model, record = train(family, config, FEW, out=path, progress=False)
    assert record["steps"] == 3 and record["final_loss"] > 0 and not model.training
    loaded = load(path)
    assert loaded.record["steps"] == 3
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    if family == "classifier":
        assert 0.0 <= record["heldout_accuracy"] <= 1.0
    elif family == "vq":
        assert record["heldout_mse"] > 0 and 1 <= record["codes_used"] <= VQ.codebook_size
    elif family == "var":  # trained on the shipped tokenizer's codes, samples through it
        assert record["tokenizer"] == "var-digits-vq" and loaded.sampler.tokens == 155
    else:
        assert loaded.sampler is not None and len(loaded.example_inputs) == (2 if family == "unet" else 3)


def test_training_is_seeded(tmp_path):
    a, _ = train("dit", DIT, FEW, progress=False)
    b, _ = train("dit", DIT, FEW, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_corrupted_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    train("classifier", None, FEW, out=path, progress=False)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="corrupted or not a graphopt checkpoint"):
        load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoadError, match="corrupted"):
        read_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(LoadError, match="does not exist"):
        read_checkpoint(tmp_path / "none.safetensors")


def test_train_cli_rejects_a_missing_output_folder(tmp_path, capsys):
    assert main(["classifier", "--steps", "1", "--out", str(tmp_path / "no" / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
