"""Distillation: train a substituted student graph back towards the original teacher.

After an approximate pass replaced part of a model (attention by linear attention, say), the new
parameters are untrained. :func:`distill` trains them (and optionally every parameter afterwards)
on the hybrid loss of LiT (arXiv 2501.12976)::

    L = w_task * L_task + lambda1 * ||teacher(x) - student(x)||^2

``L_task`` is the model's own training objective on its training data where the model ships it (the
reference generators: EDM denoising for ``unet``, flow matching's velocity for ``dit``, on the
bundled digits); the distillation term compares the denoiser outputs (the velocity for flow
models) on the same noisy inputs. A model without training data is distilled on synthetic inputs
drawn like its example inputs (per tensor: Gaussian with the example's mean and spread for float
tensors, uniform over the example's range for integer ones), against the teacher's outputs alone.

Training is seeded and deterministic on the CPU; a progress bar shows the loss; a checkpoint
(safetensors: the trained tensors, the optimizer's state and the sampling generator's state, plus
a JSON record) is written atomically every ``checkpoint_every`` steps and at the end, and
``resume=True`` continues from it with the same result as an uninterrupted run. The teacher and
the user's model are never changed: inherited weights are copied into the student before any of
them is trained. With an approximate context, the student is scored with the context's cheap
measure (the proxy FD, or the output error on one seed) before training and every
``select_every`` steps, and the best-scoring state is the one kept (``keep_best``): distillation
never ends worse, by that measure, than the pass's own result or an earlier state. At the end the
student's graph is made canonical again and the quality evaluator measures it against the teacher;
the report gets a ``distill`` row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import OutputPathError, UsageError, no_folder

if TYPE_CHECKING:
    from .approx import ApproxContext
    from .emit import OptimizedModule

FRESH = "graphopt_fresh"
CHECKPOINT = "distill.safetensors"
RECORD = "distill.json"
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """``steps`` on the new parameters, then ``all_steps`` on every parameter; batch, AdamW learning
    rate (linear warm-up over each phase's first ``warmup`` steps, then ``schedule``: ``"constant"``,
    or ``"cosine"`` decay to zero at the phase's last step), ``lambda1`` (LiT's 0.5) on the teacher
    term and ``task_weight`` on the model's own objective (0: distillation only). ``ema`` > 0 keeps an
    exponential moving average of the trained tensors (decay ``ema``, ramped up as ``(1 + s) / (10 + s)``
    over a phase's first steps): the average, not the last iterate, is what is scored, kept and
    carried into the next phase."""

    steps: int = 400
    all_steps: int = 0
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 25
    lambda1: float = 0.5
    task_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    max_minutes: float | None = None  # stop after the step that crosses it (checkpointed), fewer steps done
    keep_best: bool = True  # with a context: score every select_every steps, end on the best state
    select_every: int | None = None  # default: checkpoint_every
    schedule: str = "constant"
    ema: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.all_steps < 0 or self.steps + self.all_steps < 1:
            raise UsageError("distillation needs at least one step")
        if self.batch < 1 or not self.lr > 0 or self.warmup < 0 or self.checkpoint_every < 1:
            raise UsageError("distillation needs a positive batch, learning rate and checkpoint interval")
        if self.lambda1 < 0 or self.task_weight < 0 or self.lambda1 + self.task_weight == 0:
            raise UsageError("lambda1 and task_weight must be non-negative and not both zero")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UsageError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.select_every is not None and self.select_every < 1:
            raise UsageError(f"select_every must be a positive number of steps, got {self.select_every}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown learning-rate schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.ema < 1:
            raise UsageError(f"ema must be a decay in [0, 1), got {self.ema}")

    @property
    def total(self) -> int:
        return self.steps + self.all_steps

    @property
    def selection_interval(self) -> int:
        return self.select_every or self.checkpoint_every

    def phase_step(self, step: int) -> tuple[int, int]:
        """``step`` (1-based, over both phases) as (step within its phase, that phase's length)."""
        return (step, self.steps) if step <= self.steps else (step - self.steps, self.all_steps)

    def learning_rate(self, step: int) -> float:
        """The learning rate of ``step``: warm-up, then the schedule, within the step's phase."""
        s, n = self.phase_step(step)
        lr = self.lr * min(1.0, s / max(1, self.warmup))
        if self.schedule == "cosine" and s > self.warmup:
            lr *= 0.5 * (1 + math.cos(math.pi * (s - self.warmup) / max(1, n - self.warmup)))
        return lr


@dataclasses.dataclass(frozen=True)
class DistillReport:
    """What a distillation did: steps, minutes, the smoothed loss at the end and every
    ``checkpoint_every`` steps, how many tensors and values were trained, the data used and the
    measured quality (a :class:`~graphopt.quality.QualityCost` as JSON, when measured)."""

    steps: int
    minutes: float
    loss: float
    losses: tuple[tuple[int, float], ...]
    trained_tensors: int
    trained_values: int
    data: str
    quality: dict[str, Any] | None = None
    scores: tuple[tuple[int, float], ...] = ()  # (step, selection score) of each scored state; 0: untrained
    kept_step: int | None = None  # the step whose state was kept (the best score), None: no selection

    def line(self) -> str:
        quality = ""
        if self.quality is not None:
            from .quality import QualityCost

            quality = f"; {QualityCost.from_json(self.quality).line()}"
        kept = ""
        if self.kept_step is not None:
            best = dict(self.scores)[self.kept_step]
            kept = (f"; kept the state of step {self.kept_step} of {len(self.scores)} scored (selection score "
                    f"{best:.4g}" + (", the pass's own result" if self.kept_step == 0 else "") + ")")
        return (f"distilled {self.steps} steps in {self.minutes:.1f} min on {self.data}, loss {self.loss:.4g}, "
                f"{self.trained_values:,} values in {self.trained_tensors} tensors{kept}{quality}")


# ------------------------------------------------------------------------------------------- batches


class _Task:
    """Draws a training batch: the denoiser's call arguments and, for the task loss, a target and
    per-sample weights (None: distillation only)."""

    name = "synthetic inputs"

    def draw(self, batch: int, g: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None,
                                                             torch.Tensor | None]:
        raise NotImplementedError


class _DigitsTask(_Task):
    """A reference generator's own objective on the bundled digits (models/train.py)."""

    def __init__(self, family: str, config: Any, null_class: int | None):
        from .models.data import load_digits

        self.family, self.config, self.null_class = family, config, null_class
        data = load_digits(config.resolution)
        self.images, self.labels = data.train_images, data.train_labels
        self.name = f"the {family} objective on {len(self.labels)} training digits"

    def draw(self, batch: int, g: torch.Generator):
        idx = torch.randint(0, len(self.labels), (batch,), generator=g)
        x, y = self.images[idx], self.labels[idx]
        if self.family == "unet":  # EDM: sigma = exp(-1.2 + 1.2 n), weight (s^2 + sd^2) / (s sd)^2
            sd = self.config.sigma_data
            sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
            noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
            return (noisy, sigma), x, (sigma**2 + sd**2) / (sigma * sd) ** 2
        t = torch.rand(batch, generator=g)  # flow matching: x_t = (1 - t) x + t eps, v = eps - x
        eps = torch.randn(x.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
        drop = torch.rand(batch, generator=g) < self.config.class_dropout
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return (xt, t, y), eps - x, None


class _SyntheticTask(_Task):
    """Inputs drawn like the example inputs; no task target."""

    def __init__(self, example_inputs: Sequence[Any]):
        self.examples = [e for e in example_inputs]
        if not all(isinstance(e, torch.Tensor) and e.dim() >= 1 for e in self.examples):
            raise UsageError("synthetic distillation needs tensor example inputs with a batch axis")

    def draw(self, batch: int, g: torch.Generator):
        out = []
        for e in self.examples:
            shape = (batch, *e.shape[1:])
            if e.is_floating_point():
                std = float(e.float().std()) if e.numel() > 1 else 1.0
                out.append((torch.randn(shape, generator=g) * (std if std > 0 else 1.0) + float(e.float().mean()))
                           .to(e.dtype))
            else:
                low, high = int(e.min()), int(e.max())
                out.append(torch.randint(low, high + 1, shape, generator=g).to(e.dtype))
        return tuple(out), None, None


def synthetic_outputs(model: Any, example_inputs: Sequence[Any], n: int, seed: int, batch: int) -> torch.Tensor:
    """``model``'s outputs on ``n`` inputs drawn like ``example_inputs`` from ``seed``, ``batch`` at a time."""
    inputs = _SyntheticTask(example_inputs).draw(n, torch.Generator().manual_seed(seed))[0]
    with torch.no_grad():
        return torch.cat([_first(model(*(t[i:i + batch] for t in inputs))) for i in range(0, n, batch)])


def _task_for(teacher: nn.Module, example_inputs: Sequence[Any], use_data: bool) -> _Task:
    config = getattr(teacher, "config", None)
    family = {"UNetConfig": "unet", "DiTConfig": "dit"}.get(type(config).__name__)
    if use_data and family is not None:
        return _DigitsTask(family, config, getattr(teacher, "null_class", None))
    return _SyntheticTask(example_inputs)


# ------------------------------------------------------------------------------------------ training


def distill(student: "OptimizedModule", teacher: nn.Module, example_inputs: Sequence[Any] | None = None, *,
            config: DistillConfig | None = None, context: "ApproxContext | None" = None,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, use_data: bool = True,
            progress: bool = True) -> DistillReport:
    """Train ``student`` (an optimized module an approximate pass changed) towards ``teacher`` (the
    original model); see the module docstring. ``example_inputs`` default to the student's. With
    ``context`` (an :class:`~graphopt.approx.ApproxContext`) the final quality is measured against
    the teacher with its sampler and evaluator and written into the report. Returns what was done;
    the student is changed in place and its report gets a ``distill`` row."""
    from tqdm import tqdm

    from .approx import ApproxOutcome, _apply

    config = config or DistillConfig()
    captured = student.captured
    examples = list(example_inputs if example_inputs is not None else captured.example_inputs[:captured.model_inputs])
    task = _task_for(teacher, examples, use_data)
    folder = _checkpoint_folder(checkpoint_dir, resume)
    gm = captured.graph_module
    fresh = _named_tensors(gm, FRESH)
    if not fresh and config.steps:
        raise UsageError("the student has no new parameters to train (no approximate pass initialised any); "
                         "use all_steps to fine-tune every parameter")
    if config.all_steps:
        _unshare(gm, teacher)
    extras = list(captured.example_inputs[captured.model_inputs:])
    teacher_was_training = teacher.training
    teacher.eval()
    g = torch.Generator().manual_seed(config.seed)
    state = _State(gm, config, g)
    start_step = state.load(folder) if resume else 0
    selector = _Selector(student, teacher, context, state) if config.keep_best and context is not None else None
    if selector is not None and start_step == 0:
        selector.score(0)  # the pass's own result competes too
    losses: list[tuple[int, float]] = list(state.losses)
    smoothed = state.smoothed
    started = time.perf_counter() - state.seconds
    bar = tqdm(range(start_step + 1, config.total + 1), "distill", disable=not progress, initial=start_step,
               total=config.total)
    done = start_step
    try:
        for step in bar:
            params = state.phase(step)
            args, target, weight = task.draw(config.batch, g)
            with torch.no_grad():
                teacher_out = _first(teacher(*args))
            with torch.enable_grad():
                out = _first(gm(*args, *extras))
                loss = config.lambda1 * ((out - teacher_out) ** 2).mean()
                if target is not None and config.task_weight:
                    error = (out - target) ** 2
                    if weight is not None:
                        error = weight.view(-1, *([1] * (error.dim() - 1))) * error
                    loss = loss + config.task_weight * error.mean()
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            for group in state.optimizer.param_groups:
                group["lr"] = config.learning_rate(step)
            state.optimizer.step()
            state.update_average(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UsageError(f"the distillation loss diverged at step {step} (lower the learning rate)")
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            bar.set_postfix_str(f"loss {smoothed:.4f}", refresh=False)
            out_of_time = config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes
            if selector is not None and (step % config.selection_interval == 0 or step == config.total
                                         or out_of_time):
                selector.score(step)
                bar.set_postfix_str(f"loss {smoothed:.4f}, best {selector.best_score:.4g} @ {selector.best_step}")
            if step % config.checkpoint_every == 0 or step == config.total or out_of_time:
                losses.append((step, smoothed))
                if folder is not None:
                    state.save(folder, step, losses, smoothed, time.perf_counter() - started)
            done = step
            if out_of_time:
                break
    finally:
        bar.close()
        for p in gm.parameters():
            p.requires_grad_(False)
        teacher.train(teacher_was_training)
    minutes = (time.perf_counter() - started) / 60
    state.use_average()
    if selector is not None:
        selector.restore_best()
    _apply(student, ApproxOutcome(graph=gm))  # trained weights: new reference outputs, caches dropped
    trained = state.trained
    report = DistillReport(done, round(minutes, 2), float(smoothed or 0.0), tuple(losses), len(trained),
                           sum(t.numel() for t in trained), task.name,
                           scores=tuple(state.scores), kept_step=None if selector is None else selector.best_step)
    if context is not None:
        quality = context.evaluator.measure(context.generator(student), ("teacher", context.generator(teacher)))
        report = dataclasses.replace(report, quality=quality.to_json())
    _add_row(student, report, config)
    return report


def _first(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _named_tensors(gm: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    module = getattr(gm, prefix, None)
    if module is None:
        return {}
    return {f"{prefix}.{n}": p for n, p in module.named_parameters()}


def _unshare(gm: nn.Module, teacher: nn.Module) -> None:
    """Copy every floating tensor the student shares with the teacher, so training all of them
    leaves the teacher (and the user's model) as it was."""
    shared = {t.data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers())}
    for module in gm.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.data_ptr() in shared:
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and b.data_ptr() in shared:
                module.register_buffer(name, b.detach().clone())


class _State:
    """The optimizer over the current phase's tensors, and its checkpoint."""

    def __init__(self, gm: nn.Module, config: DistillConfig, g: torch.Generator):
        self.gm, self.config, self.g = gm, config, g
        self.fresh = _named_tensors(gm, FRESH)
        self.everything = {n: p for n, p in gm.named_parameters() if p.is_floating_point()}
        self.current: str | None = None
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW([torch.zeros(1)], lr=config.lr)
        self.trained: list[torch.Tensor] = []
        self.losses: tuple[tuple[int, float], ...] = ()
        self.smoothed: float | None = None
        self.seconds = 0.0
        self.scores: list[tuple[int, float]] = []  # the selection scores so far
        self.best: dict[str, torch.Tensor] = {}  # the best-scoring state's tensors (keep_best)
        self.average: dict[str, torch.Tensor] = {}  # the current phase's moving average (ema > 0)

    def _tensors(self, phase: str) -> dict[str, torch.Tensor]:
        return self.fresh if phase == "new" else self.everything

    def phase(self, step: int) -> list[torch.Tensor]:
        name = "new" if step <= self.config.steps else "all"
        if name != self.current:
            self._start(name)
        return list(self._tensors(name).values())

    def _start(self, name: str) -> None:
        self.use_average()  # a phase starts from the previous phase's average
        for p in self.gm.parameters():
            p.requires_grad_(False)
        tensors = self._tensors(name)
        for p in tensors.values():
            p.requires_grad_(True)
        self.current = name
        self.optimizer = torch.optim.AdamW(list(tensors.values()), lr=self.config.lr, weight_decay=0.0)
        self.trained = list({id(t): t for t in self.trained + list(tensors.values())}.values())
        if self.config.ema:
            self.average = {n: p.detach().clone() for n, p in tensors.items()}

    def update_average(self, step: int) -> None:
        """Move the average towards the tensors after ``step``'s update."""
        if not self.average:
            return
        s, _ = self.config.phase_step(step)
        decay = min(self.config.ema, (1 + s) / (10 + s))
        with torch.no_grad():
            for n, p in self._tensors(self.current or "new").items():
                self.average[n].lerp_(p.detach(), 1 - decay)

    def use_average(self) -> None:
        """Copy the average into the tensors (the state that is scored, kept and carried on)."""
        with torch.no_grad():
            for n, t in self.average.items():
                self.everything[n].copy_(t)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The average in the tensors for the block's duration, the training iterate afterwards."""
        if not self.average:
            yield
            return
        iterate = {n: self.everything[n].detach().clone() for n in self.average}
        self.use_average()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in iterate.items():
                    self.everything[n].copy_(t)

    def save(self, folder: Path, step: int, losses: list[tuple[int, float]], smoothed: float | None,
             seconds: float) -> None:
        from safetensors.torch import save_file

        tensors = {f"param.{n}": p.detach().contiguous() for n, p in self.everything.items()}
        order = list(self._tensors(self.current or "new"))
        for i, n in enumerate(order):
            slot = self.optimizer.state.get(self._tensors(self.current or "new")[n], {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in slot:
                    tensors[f"adam.{n}.{key}"] = torch.as_tensor(slot[key]).detach().clone().contiguous()
        tensors["generator"] = self.g.get_state()
        tensors.update({f"best.{n}": t.contiguous() for n, t in self.best.items()})
        tensors.update({f"average.{n}": t.contiguous() for n, t in self.average.items()})
        record = {"step": step, "phase": self.current, "losses": losses, "smoothed": smoothed, "seconds": seconds,
                  "scores": self.scores, "config": dataclasses.asdict(self.config)}
        _atomic(folder / CHECKPOINT, lambda p: save_file(tensors, str(p)))
        _atomic(folder / RECORD, lambda p: p.write_text(json.dumps(record, indent=2)))

    def load(self, folder: Path | None) -> int:
        from safetensors.torch import load_file

        if folder is None or not (folder / CHECKPOINT).is_file() or not (folder / RECORD).is_file():
            raise UsageError(f"resume: {folder} holds no distillation checkpoint")
        record = json.loads((folder / RECORD).read_text())
        if record.get("config") != dataclasses.asdict(self.config):
            raise UsageError("resume: the checkpoint was made with other distillation settings")
        tensors = load_file(str(folder / CHECKPOINT))
        with torch.no_grad():
            for n, p in self.everything.items():
                if f"param.{n}" not in tensors:
                    raise UsageError(f"resume: the checkpoint does not fit this student (no {n})")
                p.copy_(tensors[f"param.{n}"])
        step = int(record["step"])
        if step < self.config.total:
            self.phase(step + 1 if record["phase"] == "new" and step < self.config.steps else max(step, 1))
            for n, p in self._tensors(self.current or "new").items():
                slot = {k: tensors[f"adam.{n}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step")
                        if f"adam.{n}.{k}" in tensors}
                if slot:
                    self.optimizer.state[p] = slot
        self.average = {n.removeprefix("average."): t for n, t in tensors.items() if n.startswith("average.")}
        self.g.set_state(tensors["generator"])
        self.losses = tuple((int(s), float(v)) for s, v in record["losses"])
        self.smoothed = record["smoothed"]
        self.seconds = float(record["seconds"])
        self.scores = [(int(s), float(v)) for s, v in record.get("scores", [])]
        self.best = {n.removeprefix("best."): t for n, t in tensors.items() if n.startswith("best.")}
        return step


class _Selector:
    """Keeps the best-scoring state of a distillation (the untrained one included): scores the
    student with the context's cheap measure (the evaluator's proxy FD, or the output error
    against the teacher on one seed) and snapshots the trained tensors whenever it improves."""

    def __init__(self, student: "OptimizedModule", teacher: nn.Module, context: "ApproxContext", state: _State):
        self.student, self.teacher, self.context, self.state = student, teacher, context, state
        # the tensors that can change: the new ones, or every one once all are trained
        self.tensors = state.everything if state.config.all_steps else state.fresh

    @property
    def best_step(self) -> int | None:
        return min(self.state.scores, key=lambda s: s[1])[0] if self.state.scores else None

    @property
    def best_score(self) -> float:
        return min(v for _, v in self.state.scores)

    def score(self, step: int) -> float:
        from .quality import OutputFidelity

        evaluator = self.context.evaluator
        generate = self.context.generator(self.student)
        with torch.no_grad(), self.state.averaged():
            if isinstance(evaluator, OutputFidelity):
                value = evaluator.measure(generate, ("teacher", self.context.generator(self.teacher)),
                                          seeds=evaluator.seeds[:1]).mean
            else:
                value = evaluator.proxy(generate)
            improved = not self.state.scores or value < self.best_score
            self.state.scores.append((step, float(value)))
            if improved:
                self.state.best = {n: p.detach().clone() for n, p in self.tensors.items()}
        return value

    def restore_best(self) -> None:
        with torch.no_grad():
            for n, p in self.tensors.items():
                if n in self.state.best:
                    p.copy_(self.state.best[n])


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _checkpoint_folder(checkpoint_dir: str | os.PathLike | None, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise UsageError("resume needs the checkpoint folder")
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{folder} exists and is not a folder")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise no_folder(folder, folder.parent, "create")
        folder.mkdir()
    elif not resume and (folder / CHECKPOINT).exists():
        raise OutputPathError(f"{folder} holds a distillation checkpoint already; resume it or choose another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {folder}: no write permission")
    return folder


def _add_row(student: "OptimizedModule", report: DistillReport, config: DistillConfig) -> None:
    from .pipeline import PassReport

    gm = student.captured.graph_module
    nodes = len(gm.graph.nodes)
    flops = student._report.passes[-1].flops_after if student._report.passes else float("nan")
    row = PassReport(name="distill", exact=False, skipped=False, hits=report.trained_tensors, rule_hits=(),
                     near_misses=(), nodes_before=nodes, nodes_after=nodes, nodes_added=0, nodes_removed=0,
                     flops_before=flops, flops_after=flops, max_abs_error=float("nan"), max_rel_error=float("nan"),
                     verified=False, time_s=report.minutes * 60,
                     notes=(report.line(), f"new parameters {config.steps} steps, then all {config.all_steps}; "
                            f"lambda1 {config.lambda1}, task weight {config.task_weight}, lr {config.lr}, "
                            f"batch {config.batch}, seed {config.seed}"),
                     quality=report.quality)
    student._report = dataclasses.replace(student._report, passes=student._report.passes + (row,))
