"""The lowering check (graphopt.lowering): what a lowered graph is held to, stated in the report.

Under TRITON_INTERPRET=1 (the suite's default) the kernels run in Triton's interpreter on the CPU.
"""

import pytest
import torch
from torch import nn

import graphopt
from graphopt import VerificationError
from graphopt.lowering import lower_captured
from tests import zoo

pytest.importorskip("triton")


class Residuals(nn.Module):
    """UNet-style residual blocks: GroupNorm, SiLU, a 3x3 convolution, the skip add."""

    def __init__(self, channels=16, depth=4):
        super().__init__()
        self.norms = nn.ModuleList(nn.GroupNorm(4, channels) for _ in range(depth))
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        for norm, conv in zip(self.norms, self.convs):
            x = x + conv(nn.functional.silu(norm(x)))
        return x


def _residuals(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return graphopt.capture(Residuals().eval().to(dtype), (torch.randn(2, 16, 8, 8, dtype=dtype),))


def test_the_report_states_the_bound_the_lowered_graph_was_held_to():
    _, report = lower_captured(_residuals())
    assert report["tolerance"] == "bfloat16: max|err| <= 0.01 + 0.02 x max|ref|"
    text = graphopt.autotune.lower.LoweringReport.from_json(report).text()
    assert "lower: verified against the original model, bfloat16: max|err| <= 0.01" in text


def test_half_kernels_that_round_differently_are_judged_by_an_fp32_run(monkeypatch):
    # a bound too tight for two fp16 evaluations (the kernels keep in fp32 what eager rounds after every
    # op): each region and the whole graph are held to the fp32 run of their ATen ops instead. fp16, as
    # Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even.
    monkeypatch.setitem(graphopt.verify.TOLERANCES, torch.float16, (1e-7, 0.0))
    _, report = lower_captured(_residuals(torch.float16))
    assert report["max_abs_error"] > 1e-4
    assert "not met; against an fp32 run of the same graph max|err|" in report["tolerance"]


def test_a_lowered_graph_further_from_the_fp32_run_than_twice_the_original_is_refused(monkeypatch):
    from graphopt.autotune import check

    def skewed(lowered, inputs):
        outputs, errors = check_regions(lowered, inputs)
        return tuple(o * 1.05 for o in outputs), errors

    check_regions = check.check_regions
    monkeypatch.setattr(graphopt.autotune.lower, "check_regions", skewed)
    with pytest.raises(VerificationError, match="lowered graph differs.*against an fp32 run of the same graph"):
        lower_captured(_residuals())


@pytest.mark.parametrize("factory", [zoo.dit, zoo.text_unet, zoo.per_block_conditioning])
def test_every_kernel_of_a_model_whose_linears_were_merged_serves_other_batches(factory):
    """merge-linears makes each DiT block's modulation, and each cross-attention's keys and values, a
    column slice of one matmul: strides no longer those of the block's own linear. Kernels are
    generated from the values' strides, so values left as the replaced linears had them sent every
    DiT norm and gate site to its eager fallback at any batch but 1. batch-branches then stacks the
    per-block conditioning ahead of the batch: the kernels index a (blocks, batch, width) domain."""
    model, args, kwargs = factory()
    opt = graphopt.optimize(model, args, kwargs, target="cuda")
    assert any(p.name == "merge-linears" and p.hits for p in opt.report.passes)
    for batch in (2, 3):
        inputs = [torch.cat([a] * 2)[:batch] for a in args]
        with torch.no_grad():
            torch.testing.assert_close(opt(*inputs, **kwargs), model(*inputs, **kwargs), rtol=1e-4, atol=1e-5)
    sites = [m for gm in opt.lowered for m in gm.modules() if isinstance(getattr(m, "fallbacks", None), int)]
    assert len(sites) >= 5 and sum(m.fallbacks for m in sites) == 0


def test_a_graph_whose_layouts_cannot_be_recomputed_still_lowers_with_a_warning(monkeypatch):
    """Recomputing the values can fail (an op without a fake kernel): the recorded values stay, and a
    kernel that meets other strides than recorded runs its eager fallback, so the lowering still holds."""
    import graphopt.lowering

    def fails(gm, nodes=None):
        raise NotImplementedError("no fake kernel for mylib::op")

    monkeypatch.setattr(graphopt.lowering, "refresh_values", fails)
    with pytest.warns(UserWarning, match="could not recompute the graph's layouts.*mylib::op"):
        gm, report = lower_captured(_residuals(torch.float32))
    assert report["regions"]


@pytest.mark.parametrize("name", sorted(zoo.DIFFUSERS))
def test_diffusers_own_denoisers_lower_and_serve_other_batches(name):
    """diffusers' models as they are (their attention processors, embedders, RoPE, adaLN variants):
    the default pipeline and the lowering verify, and every kernel serves another batch."""
    pytest.importorskip("diffusers")
    model, args, kwargs = zoo.diffusers_model(name)
    opt = graphopt.optimize(model, args, kwargs, target="cuda")
    inputs = [torch.cat([a] * 2)[:3] if a.shape[0] == 2 else a for a in args]
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    sites = [m for gm in opt.lowered for m in gm.modules() if isinstance(getattr(m, "fallbacks", None), int)]
    assert sites and sum(m.fallbacks for m in sites) == 0
