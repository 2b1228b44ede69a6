"""Any teacher's scores over the full data: streamed into a score table, and evaluated.

:func:`score_to_table` runs a teacher's scoring function over contiguous chunks of whole sets
(a progress bar shows on a terminal) and writes each chunk straight into a table folder
(:class:`~fedrank.common.score_table.ScoreTableWriter`), so the scores of the full data never sit in
memory at once. :func:`evaluate_scores` gives the ranking metrics of a teacher from its scores
alone, so a teacher with no model at hand (imported scores) is measured like the others.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedrank.common.errors import ScoreTableError
from fedrank.common.evaluation import evaluate_scores
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable, ScoreTableWriter

__all__ = ["CHUNK_ITEMS", "score_to_table", "split_metrics"]

CHUNK_ITEMS = 1 << 16  # items scored per chunk: bounded memory whatever the data's size

ScoreFn = Callable[[ExampleSets], np.ndarray]


def _chunks(sets: ExampleSets, chunk_items: int) -> list[tuple[int, int]]:
    """Contiguous ``[a, b)`` ranges of whole sets holding about ``chunk_items`` items each."""
    cuts = [0]
    targets = np.arange(chunk_items, sets.num_items, chunk_items)
    for b in np.searchsorted(sets.offsets, targets, side="right").tolist():
        if b > cuts[-1] and b < sets.num_sets:
            cuts.append(int(b))
    cuts.append(sets.num_sets)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _progress(total: int, enabled: bool, desc: str) -> Any:
    shown = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not shown)


def score_to_table(
    sets: ExampleSets,
    score_fn: ScoreFn,
    path: str | os.PathLike[str] | None = None,
    *,
    version: str | None = None,
    progress: bool = False,
    chunk_items: int = CHUNK_ITEMS,
    desc: str = "scoring",
) -> ScoreTable:
    """The table of ``score_fn`` over every set of ``sets``, in chunks of whole sets.

    ``score_fn(part)`` returns the flat scores of ``part`` (an :class:`ExampleSets`) in item
    order. With ``path`` the chunks stream into that table folder (memory-mapped result);
    without it the table is built in memory. Version: the content hash unless given.
    """
    ranges = _chunks(sets, max(int(chunk_items), 1))
    bar = _progress(sets.num_items, progress, desc)
    try:
        if path is None:
            parts = [_score_part(sets, a, b, score_fn, bar) for a, b in ranges]
            flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            return ScoreTable.from_scores(sets, flat, version=version)
        with ScoreTableWriter(path, version=version) as writer:
            for a, b in ranges:
                writer.add(
                    sets.set_ids[a:b], sets.sizes[a:b], _score_part(sets, a, b, score_fn, bar)
                )
        assert writer.table is not None
        return writer.table
    finally:
        bar.close()


def _score_part(sets: ExampleSets, a: int, b: int, score_fn: ScoreFn, bar: Any) -> np.ndarray:
    part = sets.take(np.arange(a, b))
    scores = np.asarray(score_fn(part), dtype=np.float32).reshape(-1)
    if scores.size != part.num_items:
        raise ScoreTableError(
            f"the teacher returned {scores.size} scores for {part.num_items} items "
            f"(sets {a}..{b - 1})"
        )
    bar.update(part.num_items)
    return scores


def split_metrics(
    splits: Mapping[str, ExampleSets], table: ScoreTable, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """NDCG@k per split from the table's scores (sets without a relevant item count 0)."""
    out = {}
    for name in sorted(splits):
        metrics = evaluate_scores(splits[name], table.align(splits[name]))
        out[name] = {f"ndcg@{k}": metrics[f"ndcg@{k}"] for k in ks if f"ndcg@{k}" in metrics}
    return out


def table_path(folder: str | os.PathLike[str]) -> Path:
    """Where a teacher folder keeps its table folder."""
    return Path(folder) / "scores"
