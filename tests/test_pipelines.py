"""graphopt in diffusers pipelines: DiTPipeline and DDPMPipeline built from config with small random
weights (nothing downloaded), optimized in place, saved and re-loaded, and driven by a sampling plan."""

import json

import numpy as np
import pytest
import torch

import graphopt
from graphopt import CaptureError, LoadError, PlanError, SamplingPlan, UsageError
from graphopt.models.samplers import edm_sigmas, flow_times
from graphopt.pipelines import optimize_pipeline, plan_scheduler, plan_steps
from graphopt.plan import ModelIdentity

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5


def dit_pipe() -> "diffusers.DiTPipeline":
    torch.manual_seed(0)
    # num_embeds_ada_norm=1000: DiTPipeline's guidance uses class 1000 as the null class
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet(cls: type = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return (cls or diffusers.UNet2DModel)(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()


def ddpm_pipe(denoiser: torch.nn.Module | None = None) -> "diffusers.DDPMPipeline":
    pipe = diffusers.DDPMPipeline(unet=denoiser or unet(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def dit_images(pipe, labels, guidance=4.0):
    return pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=3, generator=seed(),
                output_type="np").images


def ddpm_images(pipe, batch):
    return pipe(batch_size=batch, num_inference_steps=3, generator=seed(), output_type="np").images


# ------------------------------------------------------------------------------ optimize_pipeline


def test_dit_pipeline_optimized_in_place_matches_with_guidance_at_two_batch_sizes():
    pipe = dit_pipe()
    expected = {n: dit_images(pipe, [0, 1, 1][:n]) for n in (2, 3)}
    unguided = dit_images(pipe, [1, 0], guidance=1.0)
    original = pipe.transformer
    report = optimize_pipeline(pipe, class_labels=[0, 1], num_inference_steps=3, generator=seed())
    assert isinstance(pipe.transformer, graphopt.OptimizedModule) and report.denoiser == "transformer"
    # guidance doubles the batch: two labels are one call of four latents, as the pipeline passed them
    assert report.call == "float32[4, 4, 8, 8], timestep=int64[4], class_labels=int64[4]"
    assert pipe.transformer.config is original.config and pipe.transformer.dtype == torch.float32
    for n in (2, 3):
        np.testing.assert_allclose(dit_images(pipe, [0, 1, 1][:n]), expected[n], atol=ATOL, rtol=0)
    np.testing.assert_allclose(dit_images(pipe, [1, 0], guidance=1.0), unguided, atol=ATOL, rtol=0)
    assert pipe.transformer.report.recaptures == 0  # batch 2, 4 and 6 run the one graph


def test_ddpm_pipeline_optimized_matches_and_the_recording_run_leaves_everything_as_it_was():
    pipe = ddpm_pipe()
    expected = {n: ddpm_images(pipe, n) for n in (1, 3)}
    generator = seed(7)
    state, rng = generator.get_state(), torch.random.get_rng_state()
    pipe.scheduler.set_timesteps(5)
    timesteps = pipe.scheduler.timesteps.clone()
    report = optimize_pipeline(pipe, batch_size=2, num_inference_steps=3, generator=generator)
    assert report.call == "float32[2, 3, 8, 8], int64[]" and "DDPMPipeline: pipe.unet (UNet2DModel)" in report.table()
    assert torch.equal(generator.get_state(), state) and torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(pipe.scheduler.timesteps, timesteps) and pipe.scheduler.num_inference_steps == 5
    for n in (1, 3):
        np.testing.assert_allclose(ddpm_images(pipe, n), expected[n], atol=ATOL, rtol=0)


def test_a_saved_and_reloaded_denoiser_works_in_the_pipeline(tmp_path):
    pipe = ddpm_pipe()
    expected = ddpm_images(pipe, 2)
    config = dict(pipe.unet.config)
    optimize_pipeline(pipe, batch_size=2, num_inference_steps=3)
    pipe.unet.save(tmp_path / "unet")
    fresh = ddpm_pipe()
    fresh.unet = graphopt.load(tmp_path / "unet")
    np.testing.assert_allclose(ddpm_images(fresh, 2), expected, atol=ATOL, rtol=0)
    loaded = fresh.unet
    assert isinstance(loaded.config, diffusers.configuration_utils.FrozenDict)
    assert loaded.config.sample_size == 8 and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    # as diffusers reads a config.json: tuples come back as lists
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()} == dict(loaded.config)
    with pytest.raises(AttributeError, match="no Python original.*UNet2DModel it keeps only the config"):
        loaded.set_attn_processor
    # the config is in graphopt.json, under its hash: an edit is caught like any other
    meta = json.loads((tmp_path / "unet" / "graphopt.json").read_text())
    assert meta["source"]["config_kind"] == "diffusers" and meta["source"]["config"]["sample_size"] == 8
    meta["source"]["config"]["sample_size"] = 16
    (tmp_path / "unet" / "graphopt.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="graphopt.json was edited"):
        graphopt.load(tmp_path / "unet")


def test_attribute_reads_go_to_the_original_and_writes_stay_on_the_optimized_module():
    model = unet()
    opt = graphopt.optimize(model, (torch.randn(2, 3, 8, 8), torch.tensor(5)))
    assert opt.config is model.config and opt.conv_in is model.conv_in
    assert opt.num_parameters() == model.num_parameters()  # a ModelMixin method, run on the original
    opt.custom_flag = True
    assert not hasattr(model, "custom_flag")
    assert opt.report.model == "UNet2DModel"  # its own names shadow the original's


class Branchy(diffusers.UNet2DModel):
    def forward(self, sample, timestep, **kwargs):
        if sample.mean() > 0:  # data-dependent control flow: torch.export cannot capture it
            sample = -sample
        return super().forward(sample, timestep, **kwargs)


def test_an_uncapturable_denoiser_is_one_clear_error_and_the_pipeline_is_unchanged():
    denoiser = unet(Branchy)
    pipe = ddpm_pipe(denoiser)
    expected = ddpm_images(pipe, 2)
    config = dict(pipe.config)
    with pytest.raises(CaptureError, match=r"pipe.unet \(Branchy\) cannot be optimized: torch.export could not "
                                           r"capture.*if sample.mean\(\) > 0"):
        optimize_pipeline(pipe, batch_size=2, num_inference_steps=3)
    assert pipe.unet is denoiser and dict(pipe.config) == config and not denoiser._forward_pre_hooks
    np.testing.assert_array_equal(ddpm_images(pipe, 2), expected)


class NoDenoiser:
    vae = torch.nn.Identity()

    def __call__(self):
        return None


class NeverCalls:
    def __init__(self):
        self.unet = unet()

    def __call__(self, steps=0):
        return None


def test_bad_pipelines_and_calls_are_clear_errors_that_change_nothing():
    with pytest.raises(UsageError, match="neither pipe.transformer nor pipe.unet is an nn.Module"):
        optimize_pipeline(NoDenoiser())
    with pytest.raises(UsageError, match="NeverCalls ran to its end without calling pipe.unet"):
        optimize_pipeline(NeverCalls())
    with pytest.raises(UsageError, match="NoDenoiser.nothing is missing or None"):
        optimize_pipeline(NoDenoiser(), denoiser="nothing")
    pipe = dit_pipe()
    original = pipe.transformer
    with pytest.raises(UsageError, match="raised TypeError before its denoiser pipe.transformer was called"):
        optimize_pipeline(pipe, num_inference_steps=3)  # DiTPipeline needs class_labels
    assert pipe.transformer is original and not original._forward_pre_hooks
    original.train()
    with pytest.raises(UsageError, match=r"pipe.transformer \(DiTTransformer2DModel\): .* is in training mode"):
        optimize_pipeline(pipe, class_labels=[0], num_inference_steps=2)
    assert pipe.transformer is original
    optimize_pipeline(pipe, class_labels=[0], num_inference_steps=2, eval_mode=True)
    with pytest.raises(UsageError, match="already an optimized module"):
        optimize_pipeline(pipe, class_labels=[0], num_inference_steps=2)


# ------------------------------------------------------------------------------ sampling plans


def plan(family: str = "edm", levels=None, **fields) -> SamplingPlan:
    identity = ModelIdentity("UNet2DModel", "", ((0, "down_blocks.0", "residual"),), 0)
    return SamplingPlan(identity, family, "euler", levels or edm_sigmas(5), (3, 8, 8), **fields)


def test_a_plan_gives_an_euler_scheduler_its_sigmas_exactly():
    scheduler = diffusers.EulerDiscreteScheduler()
    steps = plan_steps(plan(), scheduler)
    assert steps.argument == "sigmas" and steps.max_rel_error == 0 and steps.clamped == 0
    scheduler.set_timesteps(**steps.kwargs())
    np.testing.assert_allclose(scheduler.sigmas.numpy(), plan().levels, rtol=1e-6)


def test_a_plan_gives_a_ddpm_scheduler_the_nearest_time_steps_with_the_rounding_error():
    scheduler = diffusers.DDPMScheduler()
    steps = plan_steps(plan(), scheduler)
    assert steps.argument == "timesteps" and steps.values == (930, 751, 441, 48, 0)
    alphas = scheduler.alphas_cumprod.double()
    sigma = lambda t: float(((1 - alphas[t]) / alphas[t]).sqrt())  # noqa: E731
    assert steps.sigmas == tuple(sigma(t) for t in steps.values) + (0.0,)
    # the smallest EDM level, 0.002, is below the schedule's smallest sigma (time step 0): the report says by how much
    assert steps.max_rel_error == pytest.approx(sigma(0) / 0.002 - 1)
    # a flow plan's t maps at the same signal-to-noise ratio; t = 1 is pure noise, clamped to the largest sigma
    flow = plan_steps(plan("flow", flow_times(4)), scheduler)
    assert flow.clamped == 1 and flow.values[0] == 999
    assert sigma(flow.values[1]) == pytest.approx(0.75 / 0.25, rel=0.01)


def test_schedulers_and_plans_that_cannot_meet_are_clear_errors():
    with pytest.raises(UsageError, match="DDIMScheduler.set_timesteps takes neither sigmas nor timesteps"):
        plan_steps(plan(), diffusers.DDIMScheduler())
    with pytest.raises(PlanError, match="round to repeated time steps .* of DDPMScheduler's 100-step"):
        plan_steps(plan(), diffusers.DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(PlanError, match="skips blocks or scales skips"):
        plan_steps(plan(skipped=((0,), (), (), (), ())), diffusers.DDPMScheduler())
    with pytest.raises(UsageError, match="no alphas_cumprod"):
        plan_steps(plan(), diffusers.FlowMatchEulerDiscreteScheduler())
    scheduler = diffusers.DDIMScheduler()
    with pytest.raises(UsageError, match="neither sigmas nor timesteps"):
        plan_scheduler(plan(), scheduler)


def test_a_plan_scheduler_drives_the_pipeline_and_the_optimized_denoiser_follows_it():
    pipe = ddpm_pipe()
    pipe.scheduler = plan_scheduler(plan(), pipe.scheduler)
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler) and pipe.config.scheduler == ("diffusers",
                                                                                            "DDPMScheduler")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1])))
    expected = pipe(batch_size=2, num_inference_steps=50, generator=seed(), output_type="np").images
    hook.remove()
    assert seen == [930, 751, 441, 48, 0]  # the plan's five steps, whatever num_inference_steps says
    optimize_pipeline(pipe, batch_size=2, num_inference_steps=50)
    got = pipe(batch_size=2, num_inference_steps=50, generator=seed(), output_type="np").images
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
