"""graphopt: a compiler-style optimizer for image generative models.

Capture a generator as an ATen FX graph, rewrite it with verified passes, and emit a drop-in
nn.Module or ONNX::

    import graphopt
    opt = graphopt.optimize(model, (x, t))        # exact passes, verified against the model
    print(opt.report.table())
    y = opt(x, t)                                 # same signature, same output structure
    opt.save("out/model")                         # graphopt.load("out/model")
    graphopt.export_onnx(opt, "model.onnx")       # checked with onnxruntime
"""

from . import ops  # noqa: F401 - registers torch.ops.graphopt.*, which saved programs may hold
from .capture import CapturedGraph, capture
from .emit import OptimizationReport, OptimizedModule, load, optimize, save
from .errors import (CaptureError, GraphoptError, InputError, LoadError, OnnxExportError, OnnxParityError,
                     OutputPathError, PassError, SaveError, SignatureError, UnknownPassError, UsageError,
                     VerificationError)
from .onnx import OnnxReport, export_onnx
from .pipeline import MatchResult, Pass, PassReport, Rule, rule_pass

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CapturedGraph", "GraphoptError", "InputError", "LoadError", "MatchResult", "OnnxExportError",
    "OnnxParityError", "OnnxReport", "OptimizationReport", "OptimizedModule", "OutputPathError", "Pass",
    "PassError", "PassReport", "Rule", "SaveError", "SignatureError", "UnknownPassError", "UsageError",
    "VerificationError", "capture", "export_onnx", "load", "optimize", "rule_pass", "save",
]
