"""Keep torch's internal log chatter out of graphopt's output."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

# torch.export and the ONNX exporter log warnings (unresolved symbols, optional packages missing)
# that describe their internals, not the user's model; graphopt reports failures itself.
TORCH_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo",
                 "torch.onnx")


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the given loggers (default: torch's export/ONNX loggers) to ``level`` for the duration."""
    loggers = [logging.getLogger(n) for n in (names or TORCH_LOGGERS)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
