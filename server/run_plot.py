"""The plot of a run: NDCG@10 of the global student per round, the teacher as a line."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrank.common.atomic_io import atomic_path

__all__ = ["plot_ndcg", "plot_rounds"]


def plot_rounds(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    teacher_ndcg10: float | None,
    title: str,
) -> Path:
    """``ndcg10.png`` of a run from its ``metrics.jsonl`` rows."""
    series = {"global student": [(r["round"], r["ndcg@10"]) for r in rows if "ndcg@10" in r]}
    refs = {"teacher": teacher_ndcg10} if teacher_ndcg10 is not None else {}
    return plot_ndcg(series, path, title=title, references=refs)


def plot_ndcg(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of NDCG@10 per round for each series (PNG, written atomically)."""
    # matplotlib only when a plot is drawn: importing it costs about a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(series) + i}", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (held-out sets)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
