"""The ``graphopt`` command: inspect, optimize and export a model named on the command line.

A model is named as ``package.module:factory`` or ``path/to/file.py:factory``: a callable returning
``(model, args)`` or ``(model, args, kwargs)`` with example inputs, or a diffusers pipeline (alone or
as ``(pipeline, call_kwargs)``), whose denoiser is then the model, with the arguments of its first
call in one run of the pipeline as example inputs. Errors print one line; exit
status 2 means the command was malformed (bad spec, unknown pass, unwritable path), 1 that the work
failed (the model cannot be captured, a pass broke verification, ONNX parity failed).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .errors import GraphoptError, UsageError, no_folder


def load_model_spec(spec: str) -> tuple[nn.Module, tuple, dict]:
    """Resolve a reference model name, a ``module:factory`` or a ``file.py:factory`` spec."""
    from .models import REFERENCES, load

    if spec in REFERENCES:
        ref = load(spec)
        return ref.model, ref.example_inputs, {}
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"model {spec!r} is not a reference model ({', '.join(REFERENCES)}) nor a "
                         "package.module:factory or path/to/file.py:factory spec")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"model file {path} does not exist")
        name = "graphopt_user_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
        module = sys.modules.get(name)
        if module is None:
            import_spec = importlib.util.spec_from_file_location(name, path)
            if import_spec is None or import_spec.loader is None:
                raise UsageError(f"cannot import {path} as Python")
            module = importlib.util.module_from_spec(import_spec)
            sys.modules[name] = module  # dataclass outputs defined there must be importable by name
            sys.path.insert(0, str(path.resolve().parent))
            try:
                import_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise GraphoptError(f"importing {path} raised {type(e).__name__}: {e}") from e
            finally:
                sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UsageError(f"cannot import module {target!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{target} has no callable {attr!r}")
    result = factory()
    pipeline = _pipeline_result(result)
    if pipeline is not None:  # a diffusers pipeline: its denoiser, on the arguments of its first call
        from .pipelines import record_denoiser_call

        pipe, call_kwargs = pipeline
        _status(f"running {type(pipe).__name__} up to its denoiser's first call ...")
        recorded = record_denoiser_call(pipe, **call_kwargs)
        return recorded.module, recorded.args, recorded.kwargs
    if isinstance(result, nn.Module):
        raise UsageError(f"{spec} returned only a model; return (model, example_args) or (model, args, kwargs)")
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UsageError(f"{spec} must return (model, example_args) or (model, example_args, example_kwargs)")
    if not isinstance(result[0], nn.Module):
        raise UsageError(f"{spec} returned a {type(result[0]).__name__} as its model; the model must be a "
                         "torch.nn.Module")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    args = args if isinstance(args, tuple) else (tuple(args) if isinstance(args, list) else (args,))
    if not isinstance(kwargs, dict):
        raise UsageError(f"{spec}: example kwargs must be a dict")
    return model, args, kwargs


def _pipeline_result(result: Any) -> tuple[Any, dict] | None:
    """(pipeline, call kwargs) when a factory returned a pipeline or (pipeline, call_kwargs), else None."""
    from .pipelines import DENOISERS

    def is_pipeline(obj: Any) -> bool:
        return not isinstance(obj, nn.Module) and any(isinstance(getattr(obj, n, None), nn.Module) for n in DENOISERS)

    if is_pipeline(result):
        return result, {}
    if isinstance(result, tuple) and len(result) == 2 and is_pipeline(result[0]):
        if not isinstance(result[1], dict):
            raise UsageError(f"a factory returning a pipeline returns it alone or as (pipeline, call_kwargs), the "
                             f"keyword arguments of one pipeline call; got a {type(result[1]).__name__} beside it")
        return result
    return None


def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from . import capture
    from .analysis import analyse

    model, args, kwargs = load_model_spec(ns.model)
    _status(f"capturing {type(model).__name__} ...")
    captured = capture(model, args, kwargs, dynamic_batch=not ns.static)
    analysis = analyse(captured)
    rng = captured.guards.batch_range()
    batch = "static" if rng is None else f"[{rng[0]}, {'inf' if rng[1] is None else rng[1]}]"
    if ns.json:
        print(json.dumps(analysis.to_json(), indent=2, default=str))
        return 0
    print(f"{type(model).__name__}: {len(captured.graph_module.graph.nodes)} nodes, captured in "
          f"{captured.capture_time_s:.2f}s, batch {batch}")
    print(analysis.summary())
    return 0


def _cmd_optimize(ns: argparse.Namespace) -> int:
    from . import optimize
    from . import passes as registry
    from .driver import check_inference_mode

    pipeline = _with_options(registry.resolve(ns.passes), ns.pass_option)  # fails before the model is built
    out = Path(ns.out) if ns.out else None
    if out is not None:
        from .saved import check_save_target

        check_save_target(out, ns.overwrite)
    approximate = any(not p.exact for p in pipeline)
    approx = None
    generator = _is_reference_generator(ns.model)
    samplers = [p.name for p in pipeline if getattr(p, "needs_sampler", False)]
    if samplers and not generator:
        _reference_generator(ns.model, ", ".join(samplers))  # says what MODEL must be
    if approximate and generator:
        from .approx import ApproxContext

        approx = ApproxContext.for_reference(ns.model, nfe=ns.nfe, method=ns.sampler)
    elif (ns.nfe is not None or ns.sampler is not None) and not (approximate and generator):
        raise UsageError("--nfe and --sampler set how approximate passes judge a reference generator's sampling"
                         + ("" if approximate else "; no approximate pass is given"))
    distilling = bool(ns.distill_steps or ns.distill_all_steps)
    if (distilling or ns.distill_checkpoint) and not approximate:
        raise UsageError("--distill-steps trains what an approximate pass replaced; give one in --passes "
                         "(e.g. linear-attention)")
    if (ns.distill_checkpoint or ns.distill_keep_last) and not distilling:
        raise UsageError("--distill-checkpoint and --distill-keep-last need --distill-steps or --distill-all-steps")
    if distilling and ns.target != "cpu":
        raise UsageError("distillation trains on the CPU graph: optimize with --target cpu")
    if ns.compile and ns.target != "cpu":
        raise UsageError("--compile builds the CPU program with Inductor; --target cuda lowers onto Triton kernels")
    config = None
    if distilling:
        from .distill import DistillConfig

        config = DistillConfig(steps=ns.distill_steps or 0, all_steps=ns.distill_all_steps or 0,
                               keep_best=not ns.distill_keep_last)
    model, args, kwargs = load_model_spec(ns.model)
    check_inference_mode(model, ns.eval)
    if approximate and approx is None:  # any model: judged by its outputs against the original's
        from .approx import ApproxContext

        if kwargs:
            raise UsageError("approximate passes on a model called with keyword arguments are not supported yet")
        approx = ApproxContext.for_model(model, args)
    _status(f"optimizing {type(model).__name__} with {', '.join(p.name for p in pipeline) or 'no passes'} ...")
    optimized = optimize(model, args, kwargs, passes=pipeline, target=ns.target, dynamic_batch=not ns.static,
                         approx=approx, eval_mode=ns.eval)
    if config is not None:
        from .distill import CHECKPOINT, distill

        folder = Path(ns.distill_checkpoint) if ns.distill_checkpoint else None
        resume = folder is not None and (folder / CHECKPOINT).is_file()
        _status(f"distilling {config.steps} + {config.all_steps} steps" + (f", resuming {folder}" if resume else ""))
        print(distill(optimized, model, config=config, context=approx, checkpoint_dir=folder, resume=resume).line())
    if ns.compile:
        _status("compiling the optimized graph with Inductor for this CPU ...")
        optimized.compile()
    print(optimized.report.table())
    if out is not None:
        start = time.perf_counter()
        optimized.save(out, overwrite=ns.overwrite)
        print(f"saved to {out} in {time.perf_counter() - start:.2f}s")
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from . import export_onnx, load, optimize
    from . import passes as registry
    from .onnx import check_onnx_path, plan_path

    check_onnx_path(Path(ns.out), overwrite=ns.overwrite)
    plan = None
    if ns.plan is not None or (Path(ns.model).is_dir() and (Path(ns.model) / "plan.json").is_file()):
        from .plan import SamplingPlan

        plan = SamplingPlan.load(ns.plan or ns.model)  # a bad plan fails before any work
    if Path(ns.model).is_dir():
        _status(f"loading {ns.model} ...")
        optimized = load(ns.model)
    else:
        pipeline = registry.resolve(ns.passes)
        model, args, kwargs = load_model_spec(ns.model)
        _status(f"optimizing {type(model).__name__} with {', '.join(p.name for p in pipeline) or 'no passes'} ...")
        optimized = optimize(model, args, kwargs, passes=pipeline, dynamic_batch=not ns.static, eval_mode=ns.eval)
    _status("exporting to ONNX and checking it with onnxruntime ...")
    report = export_onnx(optimized, ns.out, opset=ns.opset, plan=plan)
    print(f"wrote {report.path} (opset {report.opset}, inputs {', '.join(report.inputs)}, "
          f"outputs {', '.join(report.outputs)}) in {report.export_time_s:.1f}s")
    print(report.line())
    if plan is not None:
        print(f"wrote {plan_path(report.path)} (levels and per-step skip scales to feed)")
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from . import passes as registry
    from .bench import run_bench, run_plan_bench

    if ns.passes is not None:
        registry.resolve(ns.passes)
    seeds = _seeds(ns.seeds)
    if ns.plan is not None:
        if ns.passes is not None:
            raise UsageError("--plan benchmarks a sampling plan; it takes no --passes")
        result = run_plan_bench(ns.model, ns.plan, batch=ns.batch, samples=ns.samples, seeds=seeds,
                                repeats=ns.repeats, out_dir=ns.out)
        print(f"{ns.model} with {ns.plan}:")
        print(result.table())
        print(f"wrote {Path(ns.out) / (ns.model + '-plan-bench.json')}")
        return 0
    result = run_bench(ns.model, steps=ns.steps, method=ns.sampler, batch=ns.batch, samples=ns.samples,
                       seeds=seeds, repeats=ns.repeats, out_dir=ns.out, passes=ns.passes)
    print(result.summary())
    print(f"wrote {Path(ns.out) / (ns.model + '-bench.json')}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"seeds are comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UsageError("give at least one seed")
    return seeds


def parse_duration(text: str) -> float:
    """Seconds in ``20m``, ``90s``, ``1.5h`` or a plain number of seconds."""
    value = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise UsageError(f"a duration is a number with s, m or h (20m, 90s, 1.5h), got {text!r}") from None
    if not seconds > 0:
        raise UsageError(f"a duration must be positive, got {text!r}")
    return seconds


def _is_reference_generator(spec: str) -> bool:
    from .models import generators

    return spec in generators()


def _reference_generator(spec: str, what: str, diffusion: bool = False) -> "Any":
    from .models import REFERENCES, generators, load

    names = [n for n in generators() if not diffusion or REFERENCES[n] != "var"]
    if diffusion and REFERENCES.get(spec) == "var":
        raise UsageError(f"{what} searches a diffusion sampler's steps; {spec} samples scale by scale (its subnet "
                         f"pass is `--passes ...,subnet`): MODEL must be one of {', '.join(names)}")
    if spec not in names:
        raise UsageError(f"{what} needs a sampler and a quality measure: MODEL must be a reference generator "
                         f"({', '.join(names)}); from Python, pass your own (graphopt.search / "
                         "graphopt.ApproxContext)")
    return load(spec)


def _cmd_search(ns: argparse.Namespace) -> int:
    from .autodiffusion import SPACES, EvolutionConfig, prepare_out, search_run
    from .quality import QualityEvaluator

    space = None
    if ns.space is not None:
        space = [p.strip() for p in ns.space.split(",") if p.strip()]
        if not space or set(space) - set(SPACES):
            raise UsageError(f"--space takes a comma-separated subset of {', '.join(SPACES)}, got {ns.space!r}")
    budget = parse_duration(ns.time_budget) if ns.time_budget else None
    if ns.max_gflops is not None and not ns.max_gflops > 0:
        raise UsageError(f"--max-gflops must be positive, got {ns.max_gflops}")
    config = EvolutionConfig.sized(ns.population, ns.generations)
    ref = _reference_generator(ns.model, "search", diffusion=True)
    out = prepare_out(ns.out, ns.resume)  # before any work: a bad --out is exit 2
    sampler = ref.sampler if ns.sampler is None else ref.sampler.with_steps(ref.sampler.steps, ns.sampler)
    evaluator = QualityEvaluator.for_digits(ref.config.resolution, proxy_samples=ns.samples,
                                            confirm_samples=ns.confirm_samples, confirm_seeds=_seeds(ns.confirm_seeds))
    _status(f"searching {ns.model} at NFE <= {ns.nfe} over {', '.join(space or ['all that applies'])} into {out} ...")
    try:
        result = search_run(ref.model, sampler, ref.example_inputs, nfe=ns.nfe, space=space, evaluator=evaluator,
                            max_gflops=ns.max_gflops, time_budget_s=budget, config=config, seed=ns.seed,
                            workers=ns.workers, ray=ns.ray, out=out, resume=ns.resume,
                            max_skip_ratio=ns.max_skip_ratio, batch=ns.batch, measure_latency=ns.measure_latency,
                            model_spec=ns.model, skip_scale_schedule=ns.skip_scale_schedule)
    except KeyboardInterrupt:
        print(f"graphopt: interrupted; the last completed generation is saved in {out}: continue with "
              f"graphopt search {ns.model} ... --out {out} --resume", file=sys.stderr)
        raise
    plan = result.plan
    print(f"Pareto front ({len(result.state.records)} evaluated, * chosen, d default schedule):")
    print(result.table)
    print(plan.describe())
    print(f"search: {plan.search['generations']} generations, {plan.search['evaluations']} evaluations, "
          f"{plan.search['minutes']:.1f} min; wrote {out / 'plan.json'}, {out / 'pareto.png'}, {out / 'pareto.md'}")
    return 0


def _cmd_autotune(ns: argparse.Namespace) -> int:
    from .autotune import clear, export_bundle, format_listing, import_bundle, list_caches

    actions = [flag for flag, on in (("--list", ns.list), ("--export", ns.export), ("--import", ns.import_),
                                     ("--clear", ns.clear)) if on]
    if ns.model and actions:
        raise UsageError(f"give either MODEL (to tune it) or {actions[0]}, not both")
    if ns.model:
        return _tune_model(ns)
    if not actions:
        raise UsageError("name a MODEL to tune, or one of --list, --export FILE, --import FILE, --clear")
    if ns.list:
        print(format_listing(list_caches(ns.cache_dir)))
    elif ns.export:
        if not Path(ns.export).parent.is_dir():
            raise no_folder(ns.export, Path(ns.export).parent)
        count = export_bundle(ns.export, ns.cache_dir)
        print(f"exported {count} entries to {ns.export}")
    elif ns.import_:
        count = import_bundle(ns.import_, ns.cache_dir)
        print(f"imported {count} entries from {ns.import_}")
    elif ns.cache_dir is not None:
        print(f"removed {clear(ns.cache_dir)} cache file(s)")
    else:  # the forwards stored for saved models' GPU loads bake in the tunings: they go with them
        from .autotune import stored

        print(f"removed {clear()} cache file(s) and {stored.clear()} stored forward(s)")
    return 0


def _tune_model(ns: argparse.Namespace) -> int:
    import torch

    batches = _batches(ns.batch)
    if ns.budget_s is not None and not ns.budget_s > 0:
        raise UsageError(f"--budget-s must be a positive number of seconds, got {ns.budget_s}")
    if not torch.cuda.is_available():
        print("graphopt autotune: no CUDA GPU here (torch.cuda.is_available() is False); kernels are tuned on "
              "the GPU they will run on", file=sys.stderr)
        return 1
    device = torch.device(ns.device)
    if device.type != "cuda":
        raise UsageError(f"--device must be a CUDA device such as cuda:0, got {ns.device}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {ns.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    from . import optimize
    from . import passes as registry
    from .autotune import TuningCache, gpu_device_key
    from .autotune.model_tuning import format_table, tune_model

    pipeline = registry.resolve(ns.passes)
    with torch.cuda.device(device):
        model, args, kwargs = load_model_spec(ns.model)
        if ns.dtype:  # timings depend on the dtype: tune in the one the model will run in
            model, args, kwargs = _cast(model, args, kwargs, DTYPES[ns.dtype])
        _status(f"optimizing {type(model).__name__} for {torch.cuda.get_device_name(device)} ...")
        start = time.perf_counter()
        optimized = optimize(model, args, kwargs, passes=pipeline, target="cuda")
        print(optimized.report.table())
        cache = TuningCache(gpu_device_key(device), ns.cache_dir)
        _status(f"tuning for batch {', '.join(map(str, batches))} into {cache.path} ...")
        rows = tune_model(optimized, batches, cache=cache, budget_s=ns.budget_s, force=ns.force)
    print(format_table(rows))
    print(f"tuned {len(rows)} kernel shapes in {time.perf_counter() - start:.1f}s; cache: {cache.path}")
    return 0


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _cast(model: nn.Module, args: tuple, kwargs: dict, dtype_name: str) -> tuple[nn.Module, tuple, dict]:
    """The model and its floating-point example inputs in ``dtype_name``; other inputs as they are."""
    import torch

    from .structure import map_tensors

    dtype = getattr(torch, dtype_name)

    def cast(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype) if value.is_floating_point() else value

    return model.to(dtype), map_tensors(args, cast), map_tensors(kwargs, cast)


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch takes comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(batches))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_passes(ns: argparse.Namespace) -> int:
    from . import passes as registry

    described = registry.describe()
    width = max(len(name) for name, _, _ in described)
    for name, exact, doc in described:
        print(f"{name:{width}s} {'exact' if exact else 'approx':6s} {doc}")
        options = registry.options_of(name)
        if options:
            print(" " * (width + 8) + "options (--pass-option " + name + ".OPTION=VALUE): "
                  + ", ".join(f"{o} ({t}, default {d})" for o, t, d in options))
    print(f"default pipeline: {','.join(registry.DEFAULT_PIPELINE)}")
    return 0


def _with_options(pipeline: Sequence[Any], specs: Sequence[str] | None) -> tuple[Any, ...]:
    """``pipeline`` with the passes that ``--pass-option NAME.KEY=VALUE`` settings name rebuilt with them."""
    from . import passes as registry

    settings: dict[str, dict[str, str]] = {}
    for spec in specs or ():
        target, eq, value = spec.partition("=")
        name, dot, key = target.strip().rpartition(".")
        if not eq or not dot or not name or not key:
            raise UsageError(f"--pass-option {spec!r}: write it as PASS.OPTION=VALUE, e.g. linear-attention.heads=2")
        settings.setdefault(name, {})[key] = value
    names = [p.name for p in pipeline]
    for name in settings:
        if name not in names:
            raise UsageError(f"--pass-option for '{name}', which is not in the passes ({', '.join(names) or 'none'})")
    return tuple(registry.configure(p.name, settings[p.name]) if p.name in settings else p for p in pipeline)


def _eval_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", action="store_true",
                   help="optimize a model that is in training mode as in eval mode (dropout off, running "
                        "batch-norm statistics); the model itself is not changed")


def _passes_arg(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty pass name in {text!r} (comma-separated names, or 'none')")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.split("\n\n")[0],
                                     epilog="MODEL is a reference model name (unet-digits, dit-digits, "
                                            "classifier-digits), package.module:factory or path/to/file.py:factory "
                                            "(a callable returning (model, example_args[, example_kwargs]), or a "
                                            "diffusers pipeline, alone or as (pipeline, call_kwargs): then the model is "
                                            "its denoiser, pipe.transformer or pipe.unet, and the example inputs are the "
                                            "arguments of its first call when the pipeline is run with call_kwargs).")
    parser.add_argument("--verbose", "-v", action="store_true", help="print full tracebacks on errors")
    # --verbose also after the subcommand; SUPPRESS keeps an absent one from resetting the global one
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                         help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[verbose])  # type: ignore[method-assign]

    p = sub.add_parser("inspect", help="capture a model and summarise its graph",
                       description="Capture MODEL and print op counts, residual blocks, skip edges, stacks, "
                                   "attention sites and FLOPs per sample.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--static", action="store_true", help="capture with a static batch size")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("optimize", help="run passes, print the report, save the optimized model",
                       description="Capture MODEL, run the passes (each verified against the model), print "
                                   "the per-pass report and optionally save the result (.pt2 + report.json, "
                                   "with hashes that loading checks). For a MODEL whose factory returns a "
                                   "diffusers pipeline, the denoiser is optimized and --out saves the optimized "
                                   "denoiser alone (with its config); install it with pipe.transformer (or "
                                   "pipe.unet) = graphopt.load(DIR).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--passes", type=_passes_arg, default=None,
                   help="comma-separated pass names, or 'none' (default: the exact pipeline; see 'graphopt passes')")
    p.add_argument("--pass-option", action="append", metavar="PASS.OPTION=VALUE",
                   help="an option of a pass in --passes, e.g. linear-attention.heads=2 or atconv.hybrid=true "
                        "(repeatable; 'graphopt passes' lists them)")
    p.add_argument("--out", "-o", help="directory to save the optimized model to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous save or an empty folder (never other files)")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu", help="device to optimize for")
    p.add_argument("--compile", action="store_true",
                   help="target cpu: compile the optimized graph with Inductor ahead of time (C++; tens of "
                        "seconds or more), checked and saved with the model so a loaded one starts warm")
    p.add_argument("--static", action="store_true", help="capture with a static batch size")
    _eval_arg(p)
    p.add_argument("--nfe", type=_positive, default=None,
                   help="approximate passes (skip-tune): the NFE their quality is judged at (default: the sampler's)")
    p.add_argument("--sampler", choices=("euler", "heun", "ddim"), default=None,
                   help="approximate passes: the ODE method they are judged with (default: the model's)")
    p.add_argument("--distill-steps", type=_positive, default=None, metavar="N",
                   help="after the approximate passes, train their new parameters N steps against the original "
                        "(task loss + 0.5 x distillation loss); the final FD goes into the report")
    p.add_argument("--distill-all-steps", type=_positive, default=None, metavar="N",
                   help="then train every parameter N steps")
    p.add_argument("--distill-checkpoint", metavar="DIR",
                   help="checkpoint the distillation here; a DIR holding one resumes it")
    p.add_argument("--distill-keep-last", action="store_true",
                   help="keep the last trained state (default: the best-scoring one every 100 steps, "
                        "the untrained pass result included)")
    p.set_defaults(run=_cmd_optimize)

    p = sub.add_parser("export", help="export to ONNX and check parity with onnxruntime",
                       description="Optimize MODEL (or load a directory saved by 'graphopt optimize --out') and "
                                   "export it to ONNX with a dynamic batch axis; onnxruntime's outputs are "
                                   "compared with torch's and the max error printed.")
    p.add_argument("model", metavar="MODEL", help="a model spec, or a directory saved by 'graphopt optimize'")
    p.add_argument("--out", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--passes", type=_passes_arg, default=None, help="passes to run first (default: exact pipeline)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--plan", default=None, help="a sampling plan to write beside the .onnx as NAME.plan.json "
                                                "(default: the saved directory's plan.json, if any)")
    p.add_argument("--static", action="store_true", help="capture with a static batch size")
    _eval_arg(p)
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("bench", help="latency, NFE, FD, FLOPs and a sample grid for a reference generator",
                       description="Sample a reference generator (unet-digits, dit-digits, var-digits): median "
                                   "latency per image after warm-up, NFE, Frechet distance to held-out digits over "
                                   "seeds (with floor and ceiling), class agreement of class-conditional samples "
                                   "with their labels, parameters, FLOPs per image, and a PNG grid; writes JSON.")
    p.add_argument("model", metavar="MODEL", help="unet-digits, dit-digits or var-digits")
    p.add_argument("--steps", type=_positive, default=None,
                   help="sampler steps (default 16; var-digits samples its scales, one call each)")
    p.add_argument("--sampler", choices=("euler", "heun", "ddim"), default=None,
                   help="ODE method (default heun; not for var-digits)")
    p.add_argument("--batch", type=_positive, default=64, help="images per denoiser call (default 64)")
    p.add_argument("--samples", type=_positive, default=500, help="samples per FD seed (default 500)")
    p.add_argument("--seeds", default="0,1", help="comma-separated FD seeds (default 0,1)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed latency runs (default 5)")
    p.add_argument("--passes", type=_passes_arg, default=None, help="optimize the denoiser with these passes first")
    p.add_argument("--plan", metavar="PLAN", default=None,
                   help="benchmark this sampling plan (plan.json or its folder) against the default sampler at "
                        "the same NFE and at 32 NFE, in one run")
    p.add_argument("--out", "-o", default="bench-out", help="folder for the JSON and the PNG grid")
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser("search", help="search a sampling plan: time steps, skipped blocks, skip scales",
                       description="Evolutionary search (AutoDiffusion, joint with Skip-Tuning's skip scales) for "
                                   "the best-quality sampling plan of a reference generator at a given NFE, "
                                   "optionally under a FLOPs budget. Candidates are scored by FD on --samples "
                                   "images (fixed noise); the best few are confirmed at --confirm-samples over "
                                   "--confirm-seeds. Writes plan.json, pareto.png, pareto.md and a resumable "
                                   "search-state.json to --out, and prints the Pareto table.")
    p.add_argument("model", metavar="MODEL", help="unet-digits or dit-digits")
    p.add_argument("--nfe", type=_positive, required=True, help="denoiser calls per sample (Heun: the odd NFE "
                                                                "at or below it)")
    p.add_argument("--space", default=None,
                   help="what to search: a comma-separated subset of steps, skips, skip-scale (default: all "
                        "that apply; skip-scale needs encoder-decoder skips)")
    p.add_argument("--sampler", choices=("euler", "heun", "ddim"), default=None,
                   help="ODE method (default: the model's, heun)")
    p.add_argument("--max-gflops", type=float, default=None, help="budget: GFLOPs per image (cost model)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="stop after the generation that crosses this wall time (20m, 90s, 1h)")
    p.add_argument("--samples", type=_positive, default=256, help="samples per candidate for the FD proxy (256)")
    p.add_argument("--confirm-samples", type=_positive, default=500, help="samples per seed to confirm (500)")
    p.add_argument("--confirm-seeds", default="0,1,2", help="seeds to confirm on (default 0,1,2)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0): the same seed, the same search")
    p.add_argument("--population", type=_positive, default=50, help="candidates per generation (default 50); parents, mutations and crossovers keep "
                   "AutoDiffusion's proportions")
    p.add_argument("--generations", type=_positive, default=20, help="generations (default 20); the first quarter searches time steps only")
    p.add_argument("--max-skip-ratio", type=float, default=0.1,
                   help="most block-steps a plan may skip, once the bound has opened (default 0.1)")
    p.add_argument("--batch", type=_positive, default=256, help="images per denoiser call while sampling (256)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="local worker processes (default: one per CPU core, at most 8; 1: in this process)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="evaluate on a Ray cluster: 'auto' or an address (needs graphopt[ray])")
    p.add_argument("--skip-scale-schedule", choices=("constant", "per-step"), default="constant",
                   help="skip scales: one rho_top/rho_bottom for all steps, or per step (first and last step's, "
                        "linear in between)")
    p.add_argument("--measure-latency", action="store_true",
                   help="minimise measured milliseconds per image instead of cost-model FLOPs")
    p.add_argument("--out", "-o", required=True, help="folder for plan.json, pareto.png, pareto.md and the state")
    p.add_argument("--resume", action="store_true", help="continue the search saved in --out")
    p.set_defaults(run=_cmd_search)

    p = sub.add_parser("autotune", help="tune a model's kernels for this GPU; manage the tuning cache",
                       description="With MODEL: optimize it for CUDA, run it at each --batch size, time the "
                                   "configs the cost model keeps for each kernel it runs, each checked against the "
                                   "ATen ops it replaces and timed replayed in a CUDA graph (median of repeats), and "
                                   "store the fastest in this GPU's cache, which later runs on this GPU use; prints "
                                   "kernel, shape, best config, time and speedup over the default config. Without "
                                   "MODEL: list, export, import or clear the cache (one JSON file per GPU under the "
                                   "user cache dir; GRAPHOPT_CACHE_DIR overrides). A bundle exported on one GPU "
                                   "serves every identical GPU of a fleet.")
    p.add_argument("model", metavar="MODEL", nargs="?", help="the model to tune (see 'graphopt --help')")
    p.add_argument("--device", default="cuda", help="the GPU to tune for (default: the current one, e.g. cuda:0)")
    p.add_argument("--batch", default="1,8,16", help="comma-separated batch sizes to tune for (default 1,8,16)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget in seconds for the whole run (default: time every config)")
    p.add_argument("--force", action="store_true", help="re-time kernels that already have a cache entry")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the model and its float inputs first (default: as the factory returns them); "
                        "tunings are stored per dtype")
    p.add_argument("--passes", type=_passes_arg, default=None, help="passes to run first (default: exact pipeline)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list every cached kernel, shape bucket and best config")
    action.add_argument("--export", metavar="FILE", help="write all device caches into one bundle file")
    action.add_argument("--import", dest="import_", metavar="FILE", help="merge a bundle into the cache")
    action.add_argument("--clear", action="store_true", help="delete the cache files (without --cache-dir, also "
                        "the forwards stored for saved models' GPU loads)")
    p.add_argument("--cache-dir", default=None, help="use this cache folder instead of the default")
    p.set_defaults(run=_cmd_autotune)

    p = sub.add_parser("passes", help="list the available passes", description="List the registered passes.")
    p.set_defaults(run=_cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(ns)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"graphopt: warning: {message}", file=sys.stderr)


def _run(ns: argparse.Namespace) -> int:
    try:
        return ns.run(ns)
    except UsageError as e:
        _report(ns, e)
        return 2
    except GraphoptError as e:
        _report(ns, e)
        return 1
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected failure in user code: still one line unless --verbose
        _report(ns, e, prefix=f"unexpected {type(e).__name__}: ")
        return 1


def _report(ns: argparse.Namespace, err: BaseException, prefix: str = "") -> None:
    if ns.verbose:
        traceback.print_exception(err)
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"graphopt: error: {prefix}{message}", file=sys.stderr)
    if prefix and not ns.verbose:
        print("graphopt: run with --verbose for the full traceback", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())


