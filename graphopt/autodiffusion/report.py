"""What a search shows: the Pareto table (text and Markdown) and the quality-against-cost plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .evolution import Record
from .space import SearchSpace


def _rho(space: SearchSpace, r: Record) -> str:
    rho = space.rho_of(r.candidate)
    if rho is None:
        return "-"
    text = f"{rho[0]:.3g}/{rho[1]:.3g}"
    return text if len(rho) == 2 else f"{text} -> {rho[2]:.3g}/{rho[3]:.3g}"


def _levels(space: SearchSpace, r: Record) -> str:
    return ",".join(f"{v:.3g}" for v in space.levels_of(r.candidate)[:-1])


def front_rows(space: SearchSpace, front: Sequence[Record], *, chosen: str | None = None,
               default: str | None = None, measured_ms: bool = False) -> list[list[str]]:
    head = ["", "GFLOPs/img"] + (["ms/img"] if measured_ms else []) + ["proxy FD", "skipped", "rho top/bottom",
                                                                      "levels"]
    rows = [head]
    for r in front:
        mark = ("*" if r.candidate.key == chosen else "") + ("d" if r.candidate.key == default else "")
        rows.append([mark, f"{r.gflops:.4f}"] + ([f"{r.ms:.3f}" if r.ms is not None else "-"] if measured_ms else [])
                    + [f"{r.quality:.2f}", str(r.candidate.skipped_count()), _rho(space, r), _levels(space, r)])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    head = [c or "mark" for c in rows[0]]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def plot(path: str | os.PathLike, records: Sequence[Record], front: Sequence[Record], *, title: str,
         quality_label: str, chosen: Record | None, default: Record | None, budget: float | None,
         extra: Sequence[tuple[str, float, float]] = ()) -> Path:
    """Scatter every evaluated candidate's proxy quality against its cost, the front as a line, the
    default schedule and the chosen plan marked; written as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = any(r.ms is not None for r in records)
    cost_label = "ms per image (measured)" if measured else "GFLOPs per image"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        ax.scatter([r.cost for r in records], [r.quality for r in records], s=10, alpha=0.35, color="tab:gray",
                   label=f"evaluated ({len(records)})")
        ax.plot([r.cost for r in front], [r.quality for r in front], "-o", ms=4, color="tab:blue",
                label="Pareto front")
        if default is not None:
            ax.scatter([default.cost], [default.quality], marker="s", s=60, color="tab:orange",
                       label="default schedule", zorder=3)
        if chosen is not None:
            ax.scatter([chosen.cost], [chosen.quality], marker="*", s=160, color="tab:red", label="chosen plan",
                       zorder=4)
        for label, cost, quality in extra:
            ax.scatter([cost], [quality], marker="^", s=50, label=label, zorder=3)
        if budget is not None and not measured:
            ax.axvline(budget, ls="--", color="tab:red", lw=1, label="GFLOPs budget")
        qualities = [r.quality for r in records if r.quality > 0]
        if qualities and max(qualities) > 20 * min(qualities):  # failed candidates would flatten the front
            ax.set_yscale("log")
        ax.set_xlabel(cost_label)
        ax.set_ylabel(quality_label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
