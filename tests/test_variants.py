import contextlib

import pytest
import torch

import graphopt
from graphopt import InputError
from graphopt.analysis.cost import graph_cost
from tests import zoo


@contextlib.contextmanager
def replaced(obj, name, value):
    """``obj.name`` is ``value`` inside the block (a module's forward, say), then what it was."""
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@pytest.fixture(scope="module")
def dit():
    model, args, kwargs = zoo.dit()
    return model, args, graphopt.optimize(model, args)


def test_blocks_are_numbered_in_graph_order_with_module_paths_and_kinds(dit):
    _, _, opt = dit
    assert [(b.id, b.module, b.kind) for b in opt.blocks] == [
        (0, "blocks.0", "attention"), (1, "blocks.0.mlp", "residual"), (2, "blocks.1", "attention"),
        (3, "blocks.1.mlp", "residual"), (4, "blocks.2", "attention"), (5, "blocks.2.mlp", "residual")]


def test_a_skipped_block_returns_its_shortcut(dit):
    model, args, opt = dit
    # blocks.1's attention residual is x + gate * attention(...): skipping it is the model with that
    # attention returning zeros (x + gate * 0 is x, bit for bit)
    with replaced(model.blocks[1], "attention", lambda x: torch.zeros_like(x)), torch.no_grad():
        want = model(*args)
    with torch.no_grad():
        got = opt.with_skipped([2])(*args)
        assert not torch.allclose(got, opt(*args))
    torch.testing.assert_close(got, want)


def test_a_skip_set_runs_a_smaller_graph_built_once(dit):
    _, args, opt = dit
    symbol = opt.captured.batch_symbol()
    full = graph_cost(opt.graph_module, symbol).at(1)[0]
    with torch.no_grad():
        opt.with_skipped([1, 3])(*args)
        opt.with_skipped([3, 1])(*args)  # the same set: the same variant
    graphs = [g for (i, skipped, free), g in opt._skip_graphs.items() if skipped == frozenset({1, 3})]
    assert len(graphs) == 1
    assert len(graphs[0].graph.nodes) < len(opt.graph_module.graph.nodes) - 10
    assert graph_cost(graphs[0], symbol).at(1)[0] < full * 0.8  # two MLPs gone: no multiply by zero
    shared = {id(p) for p in opt.graph_module.parameters()}
    assert all(id(p) in shared for p in graphs[0].parameters())  # the variant shares the weights


def test_skipping_works_at_a_batch_outside_the_captured_range(dit):
    model, args, opt = dit
    with torch.no_grad():
        whole = opt.with_skipped([0])(*args)
        one = opt.with_skipped([0])(*(a[:1] for a in args))
    torch.testing.assert_close(one, whole[:1])


def test_an_empty_skip_set_is_the_module_and_unknown_blocks_are_refused(dit):
    _, _, opt = dit
    assert opt.with_skipped([]) is opt
    with pytest.raises(InputError, match=r"unknown block id\(s\) \[6, 9\]"):
        opt.with_skipped([9, 6, 0])


def test_skipping_a_unet_decoder_block_uses_its_shortcut_projection():
    model, args, _ = zoo.unet()
    opt = graphopt.optimize(model, args)
    block = next(b for b in opt.blocks if b.module == "dec0.0")
    # the block is shortcut(cat) + h: skipped, it returns the 1x1 shortcut conv of its input
    with replaced(model.dec0[0], "forward", lambda x, emb: model.dec0[0].shortcut(x)), torch.no_grad():
        want = model(*args)
    with torch.no_grad():
        torch.testing.assert_close(opt.with_skipped([block.id])(*args), want)


def test_a_lowered_module_runs_its_skip_variants_on_kernels_too(dit):
    pytest.importorskip("triton")
    model, args, opt = dit
    lowered = graphopt.optimize(model, args, target="cuda")  # the suite runs Triton's interpreter on the CPU
    with torch.no_grad():
        got = lowered.with_skipped([1, 4])(*args)
        want = opt.with_skipped([1, 4])(*args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    from graphopt.autotune.sites import _Tuned

    (runtime,) = [g for (i, s, free), g in lowered._skip_graphs.items() if s == frozenset({1, 4})]
    # kernel call sites, not the ATen graph, run through a generated forward
    assert any(isinstance(m, _Tuned) for m in runtime.graph_module.modules()) and runtime.stats.generated == 1
