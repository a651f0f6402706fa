"""graphopt: a compiler-style optimizer for image generative models."""

from .capture import CapturedGraph, capture
from .errors import (CaptureError, GraphoptError, InputError, LoadError, OnnxExportError, OnnxParityError,
                     OutputPathError, PassError, SaveError, SignatureError, UnknownPassError, UsageError,
                     VerificationError)

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CapturedGraph", "GraphoptError", "InputError", "LoadError", "OnnxExportError",
    "OnnxParityError", "OutputPathError", "PassError", "SaveError", "SignatureError", "UnknownPassError",
    "UsageError", "VerificationError", "capture",
]
