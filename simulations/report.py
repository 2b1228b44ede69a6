"""Turn finished simulation runs into a table (CSV and Markdown) and PNG plots.

A *run directory* holds ``config.json`` (the run's configuration), ``metrics.jsonl`` (one JSON
object per round with at least ``round``, ``ndcg@10`` and ``log_loss``) and, once the run has
finished, ``summary.json``. ``fedrank report DIR...`` accepts run directories or any directory
above them (a sweep directory), finds every run below, and writes into ``--out``:

- ``report.csv`` / ``report.md``: one row per run, sorted by the final NDCG@10: the run's label,
  the configuration keys that differ between the runs, the final round's metrics, the best
  NDCG@10 over rounds and the teacher's NDCG@10 (from ``summary.json``);
- ``groups.csv`` / ``groups.md`` when some runs differ only by seed: mean and standard
  deviation over seeds per configuration;
- ``ndcg_per_round.png``: NDCG@10 per round, one line per configuration (the teacher dashed);
- ``ndcg_vs_log_loss.png``: final NDCG@10 against final log loss per run (ranking against
  calibration; up and to the left is better).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.atomic_io import atomic_path, atomic_write_text
from fedrank.common.errors import DataFormatError, FedrankError
from fedrank.common.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    read_json_object,
    read_metrics,
    read_summary,
)

METRIC = "ndcg@10"
CALIBRATION = "log_loss"
# final-round metrics shown when present, in this order
SHOWN_METRICS = (
    "ndcg@10",
    "map",
    "log_loss",
    "kendall_tau",
    "ndcg@5",
    "mrr",
    "auc",
    "ece",
)
SEED_KEYS = ("seed", "run-seed", "data-seed", "partition-seed")
# keys recorded by the tools that are not part of what was configured
IGNORED_KEYS = ("label", "name", "sweep", "out-dir", "out_dir")


@dataclass
class Run:
    """One run directory read back from disk."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    summary: dict[str, Any] | None
    label: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.summary is not None

    def final(self) -> dict[str, Any]:
        """Final metrics: the last round's record, overridden by the summary's numbers."""
        out: dict[str, Any] = dict(self.rounds[-1]) if self.rounds else {}
        student = (self.summary or {}).get("student")
        if isinstance(student, dict) and isinstance(student.get("metrics"), dict):
            out.update({k: v for k, v in student["metrics"].items() if _is_number(v)})
        return out

    def teacher(self, key: str = METRIC) -> float:
        """The teacher's ``key`` from the summary (NaN when unknown)."""
        teacher = (self.summary or {}).get("teacher")
        metrics = teacher.get("metrics") if isinstance(teacher, dict) else None
        value = metrics.get(key) if isinstance(metrics, dict) else None
        return float(value) if _is_number(value) else math.nan

    @property
    def last_round(self) -> int:
        rounds = [int(r["round"]) for r in self.rounds if _is_number(r.get("round"))]
        return max(rounds, default=0)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i, rec in enumerate(self.rounds):
            if _is_number(rec.get(key)):
                xs.append(float(rec.get("round", i + 1)))
                ys.append(float(rec[key]))
        return np.asarray(xs), np.asarray(ys)

    def best(self, key: str = METRIC) -> float:
        _, ys = self.series(key)
        return float(np.max(ys)) if ys.size else math.nan


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(path: str | Path) -> Run:
    """Read one run directory (``summary.json`` may be missing for an unfinished run)."""
    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        raise DataFormatError(f"{path}: no {METRICS_FILE}, so not a run directory")
    rounds = read_metrics(path)
    config = read_json_object(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    summary = read_summary(path) if (path / SUMMARY_FILE).is_file() else None
    meta = read_json_object(path / "sweep.json") if (path / "sweep.json").is_file() else {}
    label = str(meta.get("label") or config.get("label") or path.name)
    return Run(path, config, rounds, summary, label=label, params=dict(meta.get("params", {})))


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run directory at or below ``paths`` (sorted by path, duplicates dropped)."""
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataFormatError(f"{p}: no such directory")
        if (p / METRICS_FILE).is_file():
            found[p.resolve()] = None
        for metrics in sorted(p.rglob(METRICS_FILE)):
            found[metrics.parent.resolve()] = None
    return [read_run(p) for p in sorted(found)]


# ---- tables -----------------------------------------------------------------------------------
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Configuration keys whose values differ between runs (swept parameters first)."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.params))
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    out = []
    for key in keys:
        if key in IGNORED_KEYS:
            continue
        values = {_canonical(r.params.get(key, r.config.get(key))) for r in runs}
        if len(values) > 1:
            out.append(key)
    return out


def _value(run: Run, key: str) -> Any:
    return run.params.get(key, run.config.get(key))


def _metric_columns(runs: Sequence[Run]) -> list[str]:
    present = {k for run in runs for k, v in run.final().items() if _is_number(v)}
    return [m for m in SHOWN_METRICS if m in present]


def run_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-run table, best final NDCG@10 first."""
    keys = varying_keys(runs)
    metrics = _metric_columns(runs)
    header = ["run", *keys, *metrics, "best_ndcg@10", "teacher_ndcg@10", "rounds"]
    header += ["bytes_to_clients", "seconds", "status"]
    rows = []
    for run in runs:
        final = run.final()
        bytes_total = sum(float(r.get("bytes_to_clients", 0) or 0) for r in run.rounds)
        seconds = sum(float(r.get("seconds", 0) or 0) for r in run.rounds)
        rows.append(
            [
                run.label,
                *[_value(run, k) for k in keys],
                *[final.get(m, math.nan) for m in metrics],
                run.best(METRIC),
                run.teacher(METRIC),
                run.last_round,
                int(bytes_total),
                round(seconds, 2),
                "complete" if run.complete else "incomplete",
            ]
        )
    col = header.index(METRIC) if METRIC in header else None
    if col is not None:
        rows.sort(key=lambda r: -r[col] if _is_number(r[col]) and not math.isnan(r[col]) else 1e9)
    return header, rows


def group_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]] | None:
    """Mean and std over seeds of the final metrics per configuration, or None if no repeats."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        cfg = {**run.config, **run.params}
        key = _canonical({k: v for k, v in cfg.items() if k not in (*SEED_KEYS, *IGNORED_KEYS)})
        groups.setdefault(key, []).append(run)
    if all(len(g) == 1 for g in groups.values()):
        return None
    keys = [k for k in varying_keys(runs) if k not in SEED_KEYS]
    metrics = _metric_columns(runs)
    header = ["configuration", *keys, "runs"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std"]
    rows = []
    for members in groups.values():
        finals = [r.final() for r in members]
        row: list[Any] = [members[0].label, *[_value(members[0], k) for k in keys], len(members)]
        for m in metrics:
            vals = np.asarray([f.get(m, math.nan) for f in finals], dtype=np.float64)
            row += (
                [float(np.nanmean(vals)), float(np.nanstd(vals))]
                if np.any(~np.isnan(vals))
                else [
                    math.nan,
                    math.nan,
                ]
            )
        rows.append(row)
    if f"{METRIC}_mean" in header:
        col = header.index(f"{METRIC}_mean")
        rows.sort(key=lambda r: -r[col] if not math.isnan(r[col]) else 1e9)
    return header, rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_fmt(v) for v in row])
    return buf.getvalue()


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- plots ------------------------------------------------------------------------------------
def _short_label(run: Run, keys: Sequence[str], limit: int = 60) -> str:
    if not keys:
        return run.label

    def short(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else _fmt(v)

    text = ", ".join(f"{k}={short(_value(run, k))}" for k in keys)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plot_rounds(runs: Sequence[Run], path: Path, metric: str = METRIC) -> None:
    # matplotlib only when a plot is drawn: importing it costs about a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_keys(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        xs, ys = run.series(metric)
        if xs.size:
            ax.plot(xs, ys, marker="o", markersize=3, label=_short_label(run, keys))
    teachers = sorted({round(t, 6) for t in (r.teacher(metric) for r in runs) if not math.isnan(t)})
    for i, value in enumerate(teachers[:3]):
        ax.axhline(
            value,
            color="black",
            linestyle="--",
            linewidth=1,
            alpha=0.6,
            label="teacher" if i == 0 else None,
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} per round")
    ax.grid(alpha=0.3)
    if len(runs) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_tradeoff(
    runs: Sequence[Run], path: Path, metric: str = METRIC, calibration: str = CALIBRATION
) -> None:
    # matplotlib only when a plot is drawn: importing it costs about a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_keys(runs)
    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        final = run.final()
        x, y = final.get(calibration), final.get(metric)
        if _is_number(x) and _is_number(y):
            ax.scatter([x], [y], s=30)
            if len(runs) <= 20:
                ax.annotate(_short_label(run, keys, 40), (x, y), fontsize=6, alpha=0.8)
    ax.set_xlabel(f"{calibration} (lower is better calibrated)")
    ax.set_ylabel(f"{metric.upper()} (higher ranks better)")
    ax.set_title("ranking vs calibration (final round)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_comparison(
    series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: str | Path,
    *,
    references: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
    metrics: Sequence[str] = ("ndcg@10", "log_loss"),
) -> Path:
    """Per-round curves of a few federations, one panel per metric (PNG, atomic).

    ``series``: ``{name: {metric: [(round, value), ...]}}``; round 0 (the untrained start) is
    left out so it cannot squash the axis. ``references``: ``{name: {metric: value}}`` drawn as
    horizontal lines (e.g. the teacher and a central student). Each federation gets its own
    colour, marker and line style; the y range covers the curves and the references.
    """
    # matplotlib only when a plot is drawn: importing it costs about a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = [("tab:blue", "o", "-"), ("tab:orange", "s", "--"), ("tab:green", "^", "-.")]
    ref_styles = [("black", ":"), ("tab:red", (0, (5, 2)))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values: list[float] = []
        for k, (name, by_metric) in enumerate(series.items()):
            points = [(r, v) for r, v in by_metric.get(metric, []) if r > 0 and _is_number(v)]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            color, marker, line = styles[k % len(styles)]
            ax.plot(xs, ys, color=color, marker=marker, linestyle=line, label=name, markersize=5)
            values += list(ys)
        for k, (name, refs) in enumerate((references or {}).items()):
            value = refs.get(metric)
            if not _is_number(value) or math.isnan(value):
                continue
            color, line = ref_styles[k % len(ref_styles)]
            ax.axhline(value, color=color, linestyle=line, linewidth=1.3, label=name)
            values.append(float(value))
        if values:
            low, high = min(values), max(values)
            pad = max(0.08 * (high - low), 1e-3)
            ax.set_ylim(low - pad, high + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        better = "higher is better" if metric != "log_loss" else "lower is better"
        ax.set_ylabel(f"{metric} on held-out sets ({better})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def write_report(runs: Sequence[Run], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write the tables (and plots) for ``runs`` into ``out_dir``; returns the written paths."""
    if not runs:
        raise FedrankError("no runs found (a run directory holds metrics.jsonl)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    header, rows = run_rows(runs)
    atomic_write_text(out / "report.csv", to_csv(header, rows))
    atomic_write_text(out / "report.md", to_markdown(header, rows))
    written.update(csv=out / "report.csv", markdown=out / "report.md")
    grouped = group_rows(runs)
    if grouped is not None:
        atomic_write_text(out / "groups.csv", to_csv(*grouped))
        atomic_write_text(out / "groups.md", to_markdown(*grouped))
        written.update(groups_csv=out / "groups.csv", groups_markdown=out / "groups.md")
    if plots:
        plot_rounds(runs, out / "ndcg_per_round.png")
        plot_tradeoff(runs, out / "ndcg_vs_log_loss.png")
        written.update(
            rounds_png=out / "ndcg_per_round.png", tradeoff_png=out / "ndcg_vs_log_loss.png"
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrank report", description="Tables (CSV, Markdown) and PNG plots from runs."
    )
    parser.add_argument("dirs", nargs="+", help="run directories or directories above them")
    parser.add_argument("--out", help="where to write the report (default: the first DIR)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    runs = find_runs(args.dirs)
    written = write_report(runs, args.out or args.dirs[0], plots=not args.no_plots)
    header, rows = run_rows(runs)
    print(to_markdown(header, rows), end="")
    incomplete = sum(not r.complete for r in runs)
    note = f" ({incomplete} incomplete)" if incomplete else ""
    print(f"{len(runs)} run(s){note}; wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
