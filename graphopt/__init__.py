"""graphopt: a compiler-style optimizer for image generative models.

Capture a generator as an ATen FX graph, rewrite it with verified passes, and emit a drop-in
nn.Module or ONNX::

    import graphopt
    opt = graphopt.optimize(model, (x, t))        # exact passes, verified against the model
    print(opt.report.table())
    y = opt(x, t)                                 # same signature, same output structure
    opt.save("out/model")                         # graphopt.load("out/model")
    graphopt.export_onnx(opt, "model.onnx")       # checked with onnxruntime

    plan = graphopt.search(model, sampler, (x, t), nfe=6)   # steps, skipped blocks, skip scales
    images = plan.sampler().sample(model, noise, labels)   # drop-in for the reference sampler

    graphopt.optimize_pipeline(pipe, class_labels=[1, 2])  # a diffusers pipeline's denoiser, in place
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import ops  # noqa: F401 - registers torch.ops.graphopt.*, which saved programs may hold
from .capture import CapturedGraph, capture
from .distill import DistillConfig, DistillReport, distill  # light, and its name is its module's: bound here
from .driver import optimize
from .emit import OptimizedModule
from .errors import (BudgetError, CaptureError, GraphoptError, InputError, LoadError, OnnxExportError,
                     OnnxParityError, OutputPathError, PassError, PlanError, SaveError, SignatureError,
                     UnknownPassError, UsageError, VerificationError)
from .pipeline import MatchResult, Pass, PassReport, Rule, rule_pass
from .report import OptimizationReport
from .saved import load, save

# Imported when first used: these modules pull in sympy (the graph analyses), onnx, the search or the
# quality stack, about half a second that a process which only loads and calls a saved model never needs.
_LAZY = {
    "ApproxContext": "approx", "ApproxPass": "approx", "Budget": "approx", "QualityBudgetError": "approx",
    "EvolutionConfig": "autodiffusion", "search": "autodiffusion",
    "SamplerGraph": "cudagraphs",
    "OnnxReport": "onnx", "export_onnx": "onnx",
    "PipelineReport": "pipelines", "optimize_pipeline": "pipelines", "plan_scheduler": "pipelines",
    "plan_steps": "pipelines",
    "SamplingPlan": "plan",
    "QualityCost": "quality", "QualityEvaluator": "quality",
}

if TYPE_CHECKING:  # what static tools and editors see: every public name, as if imported here
    from .approx import ApproxContext, ApproxPass, Budget, QualityBudgetError
    from .autodiffusion import EvolutionConfig, search
    from .cudagraphs import SamplerGraph
    from .onnx import OnnxReport, export_onnx
    from .pipelines import PipelineReport, optimize_pipeline, plan_scheduler, plan_steps
    from .plan import SamplingPlan
    from .quality import QualityCost, QualityEvaluator


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a subpackage: graphopt.models, graphopt.passes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "ApproxContext", "ApproxPass", "Budget", "BudgetError", "EvolutionConfig", "PlanError", "QualityBudgetError",
    "QualityCost", "QualityEvaluator", "SamplingPlan", "search", "DistillConfig", "DistillReport", "distill",
    "CaptureError", "CapturedGraph", "GraphoptError", "InputError", "LoadError", "MatchResult", "OnnxExportError",
    "OnnxParityError", "OnnxReport", "OptimizationReport", "OptimizedModule", "OutputPathError", "Pass", "PipelineReport",
    "PassError", "PassReport", "Rule", "SaveError", "SignatureError", "UnknownPassError", "UsageError",
    "VerificationError", "capture", "export_onnx", "load", "optimize", "optimize_pipeline", "plan_scheduler", "plan_steps",
    "rule_pass", "SamplerGraph", "save",
]
