import torch

import graphopt
from graphopt.analysis import analyse
from graphopt.models import build_model, example_inputs
from tests.models.tiny import DIT, UNET


def test_unet_preconditioning_and_structure():
    torch.manual_seed(0)
    model = build_model("unet", UNET).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        # at vanishing noise c_skip -> 1 and c_out -> 0: D(x) ~= x
        torch.testing.assert_close(model(x, torch.full((2,), 1e-4)), x, atol=1e-3, rtol=0)
    analysis = analyse(graphopt.capture(model, example_inputs("unet", UNET)))
    concats = [s for s in analysis.skip_edges if s.kind == "concat"]
    # one skip per encoder output: conv_in, 2 levels x 1 block, 1 downsample = 4, popped by 2 x 2 decoder blocks
    assert len(concats) == 4
    assert [a.kind for a in analysis.attention_sites] == ["softmax"] * 4  # enc level 1, mid, 2 decoder blocks


def test_dit_starts_as_zero_and_has_a_stack_of_blocks():
    torch.manual_seed(0)
    model = build_model("dit", DIT).eval()
    x, t, y = example_inputs("dit", DIT)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros_like(x))  # adaLN-Zero and a zero final layer
    analysis = analyse(graphopt.capture(model, (x, t, y)))
    assert len(analysis.attention_sites) == 2 and all(a.kind == "sdpa" for a in analysis.attention_sites)
    assert [s.count for s in analysis.stacks] == [2]
