"""A run's output folder, written by the ServerApp and read back by the tools: one codec.

- ``config.json``: the resolved configuration (every key, defaults filled in);
- ``metrics.jsonl``: one JSON object per round (round 0 is the starting point) with at least
  ``round``, ``ndcg@10``, ``log_loss``, ``bytes_to_clients`` and ``seconds``;
- ``summary.json``: final metrics of the teacher and of the global student, parameter counts,
  the data and the configuration used;
- ``ndcg10.png``: NDCG@10 of the global student per round (teacher as a reference line).

Metric keys are snake_case everywhere (``train_seconds``, ``loss_total``, ``num_examples``,
``bytes_to_clients``, ``log_loss``); configuration keys stay hyphenated, as Flower writes
them. Folders written before that rule (metric keys such as ``loss-total``,
``true-ndcg@10`` or ``num-examples``) are read with their metric keys renamed
(:func:`~fedrank.common.reply_schema.metric_key`), so old and new runs compare in one report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrank.common.atomic_io import append_jsonl, atomic_write_json, atomic_write_text
from fedrank.common.errors import DataFormatError
from fedrank.common.reply_schema import metric_key

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "RunFolder",
    "read_json_object",
    "read_metrics",
    "read_summary",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "ndcg10.png"
# objects of a summary whose keys are configuration keys, not metric keys
_CONFIG_OBJECTS = frozenset({"config", "spec"})


def _migrate(value: Any, parent: str = "") -> Any:
    if isinstance(value, dict):
        if parent in _CONFIG_OBJECTS:
            return value
        return {
            metric_key(k) if isinstance(k, str) else k: _migrate(v, k) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_migrate(v, parent) for v in value]
    return value


class RunFolder:
    """The output folder of one run (the writing side)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def plot_path(self) -> Path:
        return self.dir / PLOT_FILE

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


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object file; DataFormatError naming the file and line otherwise."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    return obj


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (``path``: the file or its run folder), metric keys
    in the current style. A torn last line (a run killed mid-write) is dropped; any other
    line that is not a JSON object is a DataFormatError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                break
            raise DataFormatError(f"{path}:{lineno}: not a JSON object") from None
        if isinstance(row, dict):
            rows.append(_migrate(row))
    return rows


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``summary.json`` (``path``: the file or its run folder), metric keys in the current
    style (the configuration inside keeps its keys)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    return _migrate(read_json_object(path))
