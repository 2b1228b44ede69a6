"""What every run writes into its output folder.

- ``config.json``: the resolved configuration (every key, defaults filled in);
- ``metrics.jsonl``: one JSON object per round (round 0 is the starting point) with at least
  ``round``, ``ndcg@10``, ``log_loss``, ``bytes_to_clients`` and ``seconds``;
- ``summary.json``: final metrics of the teacher and of the global student, parameter counts,
  the data and the configuration used;
- ``ndcg10.png``: NDCG@10 of the global student per round (teacher as a reference line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic_io import append_jsonl, atomic_path, atomic_write_json, atomic_write_text

__all__ = ["RunOutput", "plot_ndcg", "read_metrics"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "ndcg10.png"


class RunOutput:
    """The output folder of one run."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.dir / CONFIG_FILE, dict(config))

    def reset_metrics(self, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        """Rewrite ``metrics.jsonl`` with ``rows`` (a fresh run: none; a resumed run: the
        checkpoint's history, dropping rounds logged after the last checkpoint)."""
        text = "".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in rows)
        atomic_write_text(self.metrics_path, text)

    def append_round(self, row: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, dict(row))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.dir / SUMMARY_FILE, dict(summary))

    def plot(
        self, rows: Sequence[Mapping[str, Any]], teacher_ndcg10: float | None, title: str
    ) -> Path:
        series = {"global student": [(r["round"], r["ndcg@10"]) for r in rows if "ndcg@10" in r]}
        refs = {"teacher": teacher_ndcg10} if teacher_ndcg10 is not None else {}
        return plot_ndcg(series, self.dir / PLOT_FILE, title=title, references=refs)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_ndcg(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of NDCG@10 per round for each series (PNG, written atomically)."""
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
