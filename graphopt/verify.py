"""Numerical comparison with a dtype-aware tolerance.

An output ``y`` matches its reference ``r`` when ``max|y - r| <= atol + rtol * max|r|``: the
tolerance scales with the output's magnitude, as a relative error on the whole tensor rather than
per element (per-element relative error explodes near zero and says nothing about image quality).
The reported relative error is ``max|y - r| / max|r|``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

# (atol, rtol) per dtype: a few ulps of accumulated rounding for graph rewrites that reorder nothing,
# loose enough for reduced precision where one re-association moves the last bits.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; integers and booleans must match exactly."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far a set of outputs is from its reference; ``within`` tells whether every output passes."""

    max_abs_error: float
    max_rel_error: float
    within: bool
    worst_output: int

    def line(self) -> str:
        verdict = "ok" if self.within else "FAILED"
        return f"max abs err {self.max_abs_error:.3g}, max rel err {self.max_rel_error:.3g} ({verdict})"


def compare(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
            atol: float | None = None, rtol: float | None = None) -> Comparison:
    """Compare flat outputs against references; ``atol``/``rtol`` override the dtype's defaults."""
    if len(outputs) != len(references):
        return Comparison(float("inf"), float("inf"), False, -1)
    worst_abs, worst_rel, within, worst = 0.0, 0.0, True, -1
    for i, (out, ref) in enumerate(zip(outputs, references)):
        out = torch.as_tensor(out).detach().cpu()
        ref = torch.as_tensor(ref).detach().cpu()
        if out.shape != ref.shape:
            return Comparison(float("inf"), float("inf"), False, i)
        a, r = tolerance(ref.dtype)
        a = a if atol is None else atol
        r = r if rtol is None else rtol
        if out.numel() == 0:
            continue
        diff = (out.double() - ref.double()).abs()
        nan_mismatch = bool((torch.isnan(out) != torch.isnan(ref)).any()) if ref.is_floating_point() else False
        err = float(torch.nan_to_num(diff, nan=0.0).max())
        scale = float(torch.nan_to_num(ref.double().abs(), nan=0.0).max())
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        ok = not nan_mismatch and err <= a + r * scale
        if nan_mismatch:
            err = rel = float("inf")
        if err >= worst_abs:
            worst = i
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
        within = within and ok
    return Comparison(worst_abs, worst_rel, within, worst)
