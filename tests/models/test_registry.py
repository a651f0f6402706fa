import pytest
import torch

from graphopt import UsageError
from graphopt.models import REFERENCES, load


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_shipped_checkpoints_load_by_name(name):
    model, sampler, example_inputs = load(name)
    assert not model.training
    with torch.no_grad():
        out = model(*example_inputs)
    if name == "classifier-digits":
        assert sampler is None and torch.isfinite(out).all()
        assert load(name).record["heldout_accuracy"] >= 0.97
    elif name == "var-digits-vq":  # the tokenizer: (reconstruction, VQ loss)
        assert sampler is None and out[0].shape == example_inputs[0].shape
        assert load(name).record["heldout_mse"] < 0.01
    elif name == "var-digits":  # one scale: logits, then the grown cache
        logits, *cache = out
        assert torch.isfinite(logits).all() and len(cache) == 2 * model.config.depth
        assert sampler.steps == len(model.config.patch_nums)
    else:
        assert torch.isfinite(out).all()
        assert sampler.steps > 0 and out.shape == example_inputs[0].shape


def test_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match="unknown model 'sd-xl'"):
        load("sd-xl")
