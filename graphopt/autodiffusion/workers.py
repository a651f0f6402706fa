"""Where candidates are evaluated: in this process, a local process pool, or a Ray cluster.

A :class:`SearchJob` is everything a worker needs (picklable): how to get the model (a CLI model
spec, rebuilt in the worker, or the module itself), the example inputs, the reference sampler, the
space and the quality evaluator. A worker builds its :class:`Scorer` once (captures the model,
whose graph variants then stay cached) and scores candidate after candidate: the quality proxy of
the plan the candidate stands for. Pool and Ray workers compute with one thread each, so with the
same seeds they give the same scores; in this process the scores use this process's threads.
Results come back in the order the candidates were given.

The local pool uses spawned processes (no fork of a threaded torch), so the model must be
picklable or named by a spec; Ray workers are actors created once per search. A spawned process
re-imports the script that started the search, so a search called from a script's top level
outside ``if __name__ == "__main__":`` runs in this process instead (with a warning): the script's
own work would otherwise run again in every worker.
"""

from __future__ import annotations

import ast
import dataclasses
import multiprocessing as mp
import queue
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from graphopt.errors import GraphoptError, UsageError

from .space import Candidate, SearchSpace


@dataclasses.dataclass(frozen=True)
class SearchJob:
    """What every worker needs to score candidates."""

    example_inputs: tuple[Any, ...]
    sampler: Any
    space: SearchSpace
    evaluator: Any
    model: nn.Module | None = None
    model_spec: str | None = None
    batch: int = 256

    def load_model(self) -> nn.Module:
        if self.model is not None:
            return self.model
        from graphopt.cli import load_model_spec

        return load_model_spec(str(self.model_spec))[0]


class Scorer:
    """Scores candidates of one job: builds the planned denoiser once, then samples each plan."""

    def __init__(self, job: SearchJob):
        from graphopt.planned import PlannedDenoiser

        self.job = job
        self.planned = PlannedDenoiser.build(job.load_model(), job.example_inputs)
        self.identity = self.planned.identity()

    def plan(self, candidate: Candidate) -> Any:
        from .plans import candidate_plan

        return candidate_plan(self.job.space, candidate, self.job.sampler, self.identity)

    def generator(self, plan: Any) -> Callable[[int, int], torch.Tensor]:
        """``(n, seed) -> images`` for a plan, with this worker's planned denoiser."""
        from graphopt.bench import sample_images

        from graphopt.planned import PlanSampler

        sampler = PlanSampler(plan, self.planned)
        return lambda n, seed: sample_images(self.planned.module, sampler, n, seed, self.job.batch)

    def __call__(self, candidate: Candidate) -> float:
        return float(self.job.evaluator.proxy(self.generator(self.plan(candidate))))


class InProcess:
    """Scores candidates here, one after another."""

    def __init__(self, job: SearchJob):
        self.scorer = Scorer(job)
        self.workers = 1

    def map(self, candidates: Sequence[Candidate], done: Callable[[], None] | None = None) -> list[float]:
        out = []
        for c in candidates:
            out.append(self.scorer(c))
            if done:
                done()
        return out

    def close(self) -> None:
        pass


def _worker_loop(job: SearchJob, tasks: Any, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        scorer = Scorer(job)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((-1, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        index, candidate = task
        try:
            results.put((index, scorer(candidate), None))
        except BaseException as e:  # noqa: BLE001
            results.put((index, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class LocalPool:
    """``workers`` spawned processes, each scoring with one thread."""

    def __init__(self, job: SearchJob, workers: int):
        ctx = mp.get_context("spawn")
        self.workers = workers
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_loop, args=(job, self.tasks, self.results), daemon=True)
                      for _ in range(workers)]
        try:
            for p in self.procs:
                p.start()
        except Exception as e:  # the model or evaluator cannot be sent to another process
            self.close()
            raise UsageError(f"cannot start the worker processes ({type(e).__name__}: {e}); pass workers=1 "
                             "to evaluate in this process, or name the model by a spec") from e

    def map(self, candidates: Sequence[Candidate], done: Callable[[], None] | None = None) -> list[float]:
        for i, c in enumerate(candidates):
            self.tasks.put((i, c))
        out: list[float | None] = [None] * len(candidates)
        pending = len(candidates)
        while pending:
            try:
                index, value, error = self.results.get(timeout=5.0)
            except queue.Empty:
                # workers leave only on close or after reporting an error, so a dead one (killed, out of
                # memory) took its candidate with it: waiting on would never end
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead:
                    raise GraphoptError(f"{len(dead)} of {len(self.procs)} search worker processes died "
                                        f"(exit codes {', '.join(map(str, dead))})") from None
                continue
            if error is not None:
                raise GraphoptError(f"a search worker failed: {error.splitlines()[0]}")
            out[index] = value
            pending -= 1
            if done:
                done()
        return [float(v) for v in out]  # type: ignore[arg-type]

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put(None)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        for p in self.procs:
            if p.pid is None:  # never started: the pool failed to start
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


class RayPool:
    """One Ray actor per worker on the cluster at ``address`` (``auto``: the running cluster)."""

    def __init__(self, job: SearchJob, address: str, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'graphopt[ray]'") from None
        self.ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except Exception as e:  # no cluster at that address
                raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {e}") from e
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or cpus)
        actor = ray.remote(num_cpus=1)(_RayScorer)
        job_ref = ray.put(job)
        self.actors = [actor.remote(job_ref) for _ in range(self.workers)]

    def map(self, candidates: Sequence[Candidate], done: Callable[[], None] | None = None) -> list[float]:
        from ray.util import ActorPool

        out = []
        pool = ActorPool(self.actors)
        try:
            for value in pool.map(lambda a, c: a.score.remote(c), list(candidates)):
                out.append(float(value))
                if done:
                    done()
        except self.ray.exceptions.RayError as e:
            raise GraphoptError(f"a Ray search worker failed: {str(e).splitlines()[0]}") from e
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._owns_connection:  # connected for this search: leave the caller's Ray state as it was
            self.ray.shutdown()


class _RayScorer:
    def __init__(self, job: SearchJob):
        torch.set_num_threads(1)
        self.scorer = Scorer(job)

    def score(self, candidate: Candidate) -> float:
        return self.scorer(candidate)


def open_backend(job: SearchJob, workers: int, ray: str | None) -> InProcess | LocalPool | RayPool:
    """Ray when ``ray`` names a cluster, else a local pool of ``workers`` processes (1: this process)."""
    if ray:
        return RayPool(job, ray, workers if workers > 1 else None)
    if workers <= 1:
        return InProcess(job)
    script = unguarded_main_call()
    if script is not None:
        warnings.warn(f"the search evaluates in this process: {script} calls it outside `if __name__ == "
                      f"\"__main__\":`, and each of the {workers} worker processes would run the script again",
                      stacklevel=2)
        return InProcess(job)
    return LocalPool(job, workers)


def unguarded_main_call() -> Path | None:
    """The main script's path when this call comes from its top-level code outside an
    ``if __name__ == "__main__":`` block (which a spawned process would run again), else None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:  # interactive, python -c, a notebook: nothing is re-run
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level
        return None
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test) and \
                node.lineno <= frame.f_lineno <= (node.end_lineno or node.lineno):
            return None
    return Path(path)


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(a, ast.Name) and a.id == "__name__" for a in sides) and \
        any(isinstance(a, ast.Constant) and a.value == "__main__" for a in sides)
