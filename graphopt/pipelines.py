"""Diffusers pipelines: optimize the denoiser a pipeline runs, and give it a sampling plan's steps.

:func:`optimize_pipeline` finds a pipeline's denoiser (``pipe.transformer`` or ``pipe.unet``), runs
the pipeline once with the caller's arguments until the denoiser's first call, records that call's
exact arguments with a forward pre-hook (classifier-free guidance's doubled batch, the dtype, the
time step's form: what the pipeline really passes, nothing guessed), optimizes the denoiser on them
and installs the optimized module in its place. The recording run is stopped at that first call, so
no step runs; the pipeline, its scheduler, the call's generators and torch's global random state are
left as they were, and when the denoiser cannot be optimized the pipeline is left unchanged.

:func:`plan_steps` and :func:`plan_scheduler` give a :class:`~graphopt.plan.SamplingPlan`'s noise
levels to a diffusers scheduler, so a plan is usable without graphopt's samplers. The mapping is by
noise level: a plan's level becomes the variance-preserving noise-to-signal ratio
``sigma = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` of the scheduler's training schedule.
An EDM plan's levels are that sigma already (EDM's x = x0 + sigma * noise is the VP process divided
by sqrt(alphas_cumprod)); a flow-matching plan's time t (x = (1 - t) x0 + t noise) has the same
signal-to-noise ratio at sigma = t / (1 - t). A scheduler whose ``set_timesteps`` takes ``sigmas``
(Euler's) gets the levels themselves; one that takes only integer ``timesteps`` (DDPM's, DPM-Solver's,
Heun's, LCM's) gets, per level, the training time step whose sigma is nearest in log sigma, and the
report gives the largest relative sigma error that rounding made. The scheduler keeps its own update
rule: the plan's method (Euler, Heun, DDIM) and its guidance scale are not carried over.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import time
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from . import structure
from .driver import optimize
from .emit import OptimizedModule
from .report import OptimizationReport
from .errors import CaptureError, GraphoptError, PlanError, UsageError, first_line

DENOISERS = ("transformer", "unet")
"""The attributes a pipeline keeps its denoiser in, looked up in this order."""


# ------------------------------------------------------------------------------ the denoiser's call


@dataclasses.dataclass(frozen=True)
class RecordedCall:
    """The arguments of a denoiser's first call in a pipeline run (tensors detached copies)."""

    pipeline: str
    denoiser: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    time_s: float

    def describe(self) -> str:
        """``hidden_states=float32[4, 4, 8, 8], timestep=int64[4], ...``: the call's arguments, briefly."""
        parts = [_brief(v) for v in self.args] + [f"{k}={_brief(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return repr(value) if not isinstance(value, (list, tuple, dict)) else type(value).__name__


class _Recorded(Exception):
    """Raised from the pre-hook once the call is recorded: the pipeline run stops there."""


def find_denoiser(pipe: Any, denoiser: str | None = None) -> tuple[str, nn.Module]:
    """(attribute, module) of the pipeline's denoiser: ``denoiser`` when given, else the first of
    ``transformer`` and ``unet`` that holds an nn.Module."""
    names = (denoiser,) if denoiser else DENOISERS
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    if denoiser:
        found = getattr(pipe, denoiser, None)
        raise UsageError(f"{type(pipe).__name__}.{denoiser} is "
                         + (f"a {type(found).__name__}, not an nn.Module" if found is not None else "missing or None"))
    raise UsageError(f"{type(pipe).__name__} has no denoiser graphopt can find: neither pipe.transformer nor "
                     "pipe.unet is an nn.Module; name it with denoiser='attribute'")


def record_denoiser_call(pipe: Any, *call_args: Any, denoiser: str | None = None,
                         **call_kwargs: Any) -> RecordedCall:
    """Run ``pipe(*call_args, **call_kwargs)`` up to its denoiser's first call and return that call.

    The run stops before the denoiser computes anything. The scheduler's state, the progress bar
    setting, the state of every ``torch.Generator`` among the call's arguments and torch's global
    random state are restored afterwards, so the pipeline's next run is the one it would have been.
    """
    if not callable(pipe):
        raise UsageError(f"expected a pipeline (a callable such as a diffusers DiffusionPipeline), got "
                         f"{type(pipe).__name__}")
    name, module = find_denoiser(pipe, denoiser)
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"] = structure.map_tensors(args, lambda t: t.detach().clone())
        seen["kwargs"] = structure.map_tensors(kwargs, lambda t: t.detach().clone())
        raise _Recorded

    start = time.perf_counter()
    with _kept_pipeline_state(pipe, (call_args, call_kwargs)):
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            pipe(*call_args, **call_kwargs)
        except _Recorded:
            pass
        except Exception as e:
            raise UsageError(f"running {type(pipe).__name__} with the given arguments raised {type(e).__name__} "
                             f"before its denoiser pipe.{name} was called: {first_line(e)}") from e
        finally:
            handle.remove()
    if "args" not in seen:
        raise UsageError(f"{type(pipe).__name__} ran to its end without calling pipe.{name}: give call arguments "
                         "that run at least one denoising step")
    return RecordedCall(type(pipe).__name__, name, module, tuple(seen["args"]), dict(seen["kwargs"]),
                        time.perf_counter() - start)


@contextlib.contextmanager
def _kept_pipeline_state(pipe: Any, call: Any) -> Iterator[None]:
    """Restores the scheduler, the progress bar setting and the random states a pipeline run changes."""
    generators = list(_generators(call))
    states = [g.get_state() for g in generators]
    scheduler = getattr(pipe, "scheduler", None)
    scheduler_state = copy.deepcopy(scheduler.__dict__) if scheduler is not None else None
    had_bar = "_progress_bar_config" in vars(pipe)
    bar = vars(pipe).get("_progress_bar_config")
    if hasattr(pipe, "set_progress_bar_config"):  # no half-drawn bar for a run that stops at step 0
        object.__setattr__(pipe, "_progress_bar_config", {**(bar or {}), "disable": True})
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
        if scheduler is not None:
            scheduler.__dict__.clear()
            scheduler.__dict__.update(scheduler_state)
        if had_bar:
            object.__setattr__(pipe, "_progress_bar_config", bar)
        elif "_progress_bar_config" in vars(pipe):
            object.__delattr__(pipe, "_progress_bar_config")


def _generators(value: Any) -> Iterable[torch.Generator]:
    if isinstance(value, torch.Generator):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _generators(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _generators(v)


# ------------------------------------------------------------------------------ optimize and install


@dataclasses.dataclass(frozen=True)
class PipelineReport:
    """What :func:`optimize_pipeline` did: which denoiser, on which recorded call, and its report."""

    pipeline: str
    denoiser: str
    denoiser_class: str
    call: str
    record_time_s: float
    optimization: OptimizationReport

    def line(self) -> str:
        return (f"{self.pipeline}: pipe.{self.denoiser} ({self.denoiser_class}) optimized on its first call "
                f"({self.call}; recorded in {self.record_time_s:.2f}s)")

    def table(self) -> str:
        """The line above, then the optimization's per-pass table."""
        return self.line() + "\n" + self.optimization.table()


def optimize_pipeline(pipe: Any, *call_args: Any, passes: Iterable[str | Any] | None = None, target: str = "cpu",
                      compile: bool = False, eval_mode: bool = False, denoiser: str | None = None,
                      **call_kwargs: Any) -> PipelineReport:
    """Optimize ``pipe``'s denoiser on the arguments it really receives and install it; returns the report.

    ``pipe(*call_args, **call_kwargs)`` is run up to the denoiser's first call (nothing is
    denoised; see :func:`record_denoiser_call`), and that call's arguments are the example inputs of
    :func:`graphopt.optimize` (``passes``, ``target``, ``compile`` and ``eval_mode`` as there; the
    batch stays dynamic, so other batch sizes run the same graph). On success ``pipe.transformer``
    (or ``pipe.unet``, or ``denoiser``) is the :class:`~graphopt.emit.OptimizedModule`; on any error
    the pipeline is left as it was. A denoiser graphopt cannot capture or verify raises the error of
    ``optimize`` (:class:`~graphopt.errors.CaptureError`, ...) naming the attribute, its class and
    the reason. The keyword names ``passes``, ``target``, ``compile``, ``eval_mode`` and ``denoiser``
    are this function's; every other argument goes to the pipeline.
    """
    name, module = find_denoiser(pipe, denoiser)
    if isinstance(module, OptimizedModule):
        raise UsageError(f"pipe.{name} is already an optimized module; optimize the original denoiser")
    recorded = record_denoiser_call(pipe, *call_args, denoiser=name, **call_kwargs)
    try:
        optimized = optimize(module, recorded.args, recorded.kwargs, passes=passes, target=target, compile=compile,
                             eval_mode=eval_mode)
    except UsageError as e:
        raise type(e)(f"pipe.{name} ({type(module).__name__}): {e}") from e
    except GraphoptError as e:
        cls = type(e) if type(e).__init__ in (GraphoptError.__init__, CaptureError.__init__) else GraphoptError
        raise cls(f"pipe.{name} ({type(module).__name__}) cannot be optimized: {e}") from e
    setattr(pipe, name, optimized)
    return PipelineReport(recorded.pipeline, name, type(module).__name__, recorded.describe(), recorded.time_s,
                          optimized.report)


# ------------------------------------------------------------------------------ sampling plans


@dataclasses.dataclass(frozen=True)
class SchedulerSteps:
    """A plan's levels as a scheduler's ``set_timesteps`` argument.

    ``argument`` is ``"sigmas"`` or ``"timesteps"`` and ``values`` what to pass (``kwargs()``);
    ``sigmas`` are the noise levels the scheduler steps through, as VP sigmas, ending at 0;
    ``max_rel_error`` the largest relative difference between those and the plan's (0 when the
    scheduler takes sigmas); ``clamped`` how many plan levels lay above the scheduler's largest
    sigma and were set to it (a flow plan's t = 1 always is).
    """

    scheduler: str
    argument: str
    values: tuple[float, ...] | tuple[int, ...]
    sigmas: tuple[float, ...]
    max_rel_error: float
    clamped: int

    def kwargs(self) -> dict[str, list[Any]]:
        """``{"timesteps": [...]}`` or ``{"sigmas": [...]}``: for ``scheduler.set_timesteps(**...)``, or
        ``pipe(..., **...)`` where the pipeline's call takes that argument."""
        return {self.argument: list(self.values)}

    def line(self) -> str:
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in self.values)
        return (f"{self.scheduler}: {self.argument}=[{shown}], max relative sigma error {self.max_rel_error:.2%}"
                + (f", {self.clamped} level(s) clamped to the scheduler's largest sigma" if self.clamped else ""))


def plan_steps(plan: Any, scheduler: Any) -> SchedulerSteps:
    """The ``set_timesteps`` argument that makes ``scheduler`` step through ``plan``'s levels.

    Raises :class:`~graphopt.errors.PlanError` for a plan that skips blocks or scales skips (a
    scheduler sets time steps only) or whose levels round to the same training time step, and
    :class:`~graphopt.errors.UsageError` for a scheduler that takes neither ``sigmas`` nor
    ``timesteps`` or has no ``alphas_cumprod`` table to map levels onto.
    """
    from .plan import SamplingPlan

    if not isinstance(plan, SamplingPlan):
        raise UsageError(f"expected a graphopt.SamplingPlan, got {type(plan).__name__}")
    if plan.skips_blocks or plan.scales_skips:
        raise PlanError("this plan skips blocks or scales skips at some steps, and a scheduler sets only the time "
                        "steps; sample with plan.sampler() and the graphopt model, or use a plan of time steps only")
    name = type(scheduler).__name__
    try:
        accepted = inspect.signature(scheduler.set_timesteps).parameters
    except (AttributeError, TypeError, ValueError):
        raise UsageError(f"{name} is not a diffusers scheduler (it has no set_timesteps)") from None
    argument = "sigmas" if "sigmas" in accepted else "timesteps" if "timesteps" in accepted else None
    if argument is None:
        raise UsageError(f"{name}.set_timesteps takes neither sigmas nor timesteps, so it cannot follow a plan; "
                         f"use a scheduler that does, e.g. EulerDiscreteScheduler.from_config(pipe.scheduler.config) "
                         "or DDPMScheduler.from_config(...)")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor) or alphas.dim() != 1 or len(alphas) < 2:
        raise UsageError(f"{name} has no alphas_cumprod table to map a plan's noise levels onto (graphopt maps "
                         "plans onto variance-preserving discrete schedulers only)")
    table = ((1 - alphas.double()) / alphas.double()).sqrt()  # the VP sigma of every training time step
    sigma_max = float(table.max())
    wanted = [_vp_sigma(plan.family, level) for level in plan.levels[:-1]]
    clamped = sum(1 for s in wanted if s > sigma_max)
    wanted = [min(s, sigma_max) for s in wanted]
    if argument == "sigmas":
        values: tuple[Any, ...] = tuple(wanted) + (0.0,)
        got = list(wanted)
    else:
        log_table = table.clamp_min(1e-12).log()
        steps = [int((log_table - math.log(s)).abs().argmin()) for s in wanted]
        if len(set(steps)) != len(steps):
            raise PlanError(f"the plan's levels {[round(v, 4) for v in plan.levels]} round to repeated time steps "
                            f"{steps} of {name}'s {len(alphas)}-step training schedule (sigmas {float(table.min()):.3g} "
                            f"to {sigma_max:.3g}{f'; {clamped} level(s) above it' if clamped else ''}); use a "
                            "scheduler that takes sigmas (EulerDiscreteScheduler), one with more training steps, "
                            "or a plan with levels further apart")
        values = tuple(steps)
        got = [float(table[t]) for t in steps]
    error = max((abs(g - w) / w for g, w in zip(got, wanted) if w > 0), default=0.0)
    return SchedulerSteps(name, argument, values, tuple(got) + (0.0,), error, clamped)


def _vp_sigma(family: str, level: float) -> float:
    """A plan level as a VP sigma: EDM's sigma itself; flow time t at the same signal-to-noise ratio."""
    if family == "edm":
        return float(level)
    return math.inf if level >= 1 else float(level) / (1 - float(level))


def plan_scheduler(plan: Any, scheduler: Any) -> Any:
    """A copy of ``scheduler`` that steps through ``plan``'s levels whatever ``num_inference_steps`` it is given.

    For pipelines whose call takes no ``timesteps``/``sigmas``: ``pipe.scheduler =
    plan_scheduler(plan, pipe.scheduler)``. The copy is an instance of a subclass of the scheduler's
    class (same name, same config, so ``isinstance`` checks and ``save_pretrained`` see the original
    scheduler; a saved pipeline keeps the config, not the plan) whose ``set_timesteps`` ignores the
    number of steps and the other arguments it is called with and sets the plan's (see
    :func:`plan_steps`, which raises for a scheduler that cannot follow a plan).
    """
    steps = plan_steps(plan, scheduler)
    base = type(scheduler)
    chosen = steps.kwargs()

    def set_timesteps(self: Any, num_inference_steps: int | None = None, device: Any = None, *args: Any,
                      **kwargs: Any) -> None:
        base.set_timesteps(self, device=device, **chosen)  # the plan fixes the steps

    planned = type(base.__name__, (base,), {"set_timesteps": set_timesteps, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "plan_steps": steps})
    copied = copy.deepcopy(scheduler)
    copied.__class__ = planned
    return copied
