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
    assert torch.isfinite(out).all()
    if name == "classifier-digits":
        assert sampler is None
        assert load(name).record["heldout_accuracy"] >= 0.97
    else:
        assert sampler.steps > 0 and out.shape == example_inputs[0].shape


def test_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match="unknown model 'sd-xl'"):
        load("sd-xl")
