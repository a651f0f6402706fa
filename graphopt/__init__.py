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

from . import ops  # noqa: F401 - registers torch.ops.graphopt.*, which saved programs may hold
from .approx import ApproxContext, ApproxPass, Budget, QualityBudgetError
from .autodiffusion import EvolutionConfig, search
from .capture import CapturedGraph, capture
from .cudagraphs import SamplerGraph
from .distill import DistillConfig, DistillReport, distill
from .driver import optimize
from .emit import OptimizedModule
from .report import OptimizationReport
from .saved import load, save
from .errors import (BudgetError, CaptureError, GraphoptError, InputError, LoadError, OnnxExportError,
                     OnnxParityError, OutputPathError, PassError, PlanError, SaveError, SignatureError,
                     UnknownPassError, UsageError, VerificationError)
from .onnx import OnnxReport, export_onnx
from .pipeline import MatchResult, Pass, PassReport, Rule, rule_pass
from .pipelines import PipelineReport, optimize_pipeline, plan_scheduler, plan_steps
from .plan import SamplingPlan
from .quality import QualityCost, QualityEvaluator

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
