"""The errors graphopt raises, one class per thing a user can get wrong.

Every error carries a message that reads on one line in a terminal; the CLI prints ``str(err)`` and
exits 2 for :class:`UsageError` subclasses (the user asked for something malformed) and 1 for the
rest (the request was fine but the work failed).
"""

from __future__ import annotations

import os
from pathlib import Path


def first_line(e: BaseException, limit: int = 240) -> str:
    """The first meaningful line of an exception's message (torch's exporters prefix log lines with '[')."""
    for line in str(e).splitlines():
        line = line.strip()
        if line and not line.startswith("["):
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(e).__name__


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class UsageError(GraphoptError):
    """The request itself is malformed: a bad model spec, an unknown pass, an unwritable path."""


class UnknownPassError(UsageError, KeyError):
    """A pass name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(UsageError, ValueError):
    """Inputs that do not fit the model: wrong count, wrong shape or dtype, or the model raised on them."""


class SignatureError(InputError, TypeError):
    """A call whose arguments do not bind to the model's forward signature."""


class CaptureError(GraphoptError):
    """torch.export could not capture the model.

    ``module_path`` and ``source`` name where the capture broke (``""`` when unknown) and ``hint``
    says what usually fixes it.
    """

    def __init__(self, message: str, *, module_path: str = "", source: str = "", hint: str = ""):
        self.module_path = module_path
        self.source = source
        self.hint = hint
        parts = [message]
        if module_path or source:
            where = f"module '{module_path}'" if module_path else "the model"
            parts.append(f"in {where}" + (f" at {source}" if source else ""))
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__("; ".join(parts))


class PassError(GraphoptError):
    """A pass raised or left the graph invalid; the message names the pass."""


class VerificationError(PassError):
    """An exact pass changed the model's outputs beyond the dtype's tolerance."""


class OutputPathError(UsageError):
    """A path graphopt was asked to write cannot be written (missing folder, no permission, exists)."""


def no_folder(target: object, parent: "os.PathLike[str] | str", verb: str = "write") -> OutputPathError:
    """The error for ``target`` whose parent folder is missing, or is a file (``x.py/out``)."""
    kind = "is a file, not a folder" if Path(parent).exists() else "does not exist"
    return OutputPathError(f"cannot {verb} {target}: {'' if kind.startswith('is') else 'folder '}{parent} {kind}")


class SaveError(UsageError):
    """An optimized module could not be saved: something in its call structure has no JSON form."""


class LoadError(GraphoptError):
    """A saved directory is missing, truncated, corrupted or from an incompatible version."""


class OnnxExportError(GraphoptError):
    """The ONNX exporter, checker or onnxruntime failed."""


class OnnxParityError(OnnxExportError):
    """onnxruntime's outputs differ from torch's beyond tolerance."""


class PlanError(UsageError):
    """A sampling plan that is malformed (non-monotone levels, unknown blocks) or made for another model."""


class BudgetError(UsageError):
    """A budget no candidate can meet; the message names the cheapest feasible cost."""
