"""TREC interop: the item names fedrank writes in TREC files, and qrels from labels.

``fedrank score`` writes runs (``qid Q0 docid rank score tag``) and ``fedrank data qrels``
writes relevance judgements (``qid 0 docid label``) with the same names, so standard tools
(``trec_eval``, ``ir-measures``) can evaluate fedrank's rankings: the set id is the ``qid``, an
item's ``docid`` is its LETOR ``#docid`` when the data has item ids, otherwise its 0-based
position within its set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets

__all__ = ["item_names", "qrels_lines", "run_lines"]


def item_names(sets: ExampleSets, k: int) -> list[str]:
    """The TREC ``docid`` of every item of set ``k``, in item order."""
    lo, hi = int(sets.offsets[k]), int(sets.offsets[k + 1])
    if sets.item_ids is not None:
        return [str(i) for i in sets.item_ids[lo:hi]]
    return [str(i) for i in range(hi - lo)]


def qrels_lines(sets: ExampleSets, source: str = "data") -> Iterator[str]:
    """``qid 0 docid label`` for every item of ``sets`` (labels must be integers).

    Raises DataFormatError naming ``source`` and the set when a label is not an integer
    (trec_eval reads relevance as an integer) or when a set repeats an item id.
    """
    labels = sets.labels
    whole = labels == np.round(labels)
    if not np.all(whole):
        bad = int(np.flatnonzero(~whole)[0])
        k = int(np.searchsorted(sets.offsets, bad, side="right") - 1)
        raise DataFormatError(
            f"{source}: set {str(sets.set_ids[k])!r} has label {float(labels[bad]):g}; qrels "
            "need integer relevance labels"
        )
    for k in range(sets.num_sets):
        names = item_names(sets, k)
        if len(set(names)) != len(names):
            raise DataFormatError(
                f"{source}: set {str(sets.set_ids[k])!r} repeats an item id; its qrels would be "
                "ambiguous"
            )
        lo = int(sets.offsets[k])
        set_id = str(sets.set_ids[k])
        for i, name in enumerate(names):
            yield f"{set_id} 0 {name} {int(labels[lo + i])}\n"


def run_lines(rankings: Iterable[dict[str, Any]], top: int = 0) -> Iterator[str]:
    """``qid Q0 docid rank score fedrank`` lines of a TREC run from rankings
    (``{"set", "items", "scores"}`` each, best first); ``top`` > 0 keeps the first ``top`` items
    of each set. Scores are written with 9 significant digits, enough to round-trip float32, so
    a tool that re-sorts by score sees the same order and no invented ties."""
    for r in rankings:
        for rank, (item, score) in enumerate(zip(r["items"], r["scores"], strict=True), 1):
            if top and rank > top:
                break
            yield f"{r['set']} Q0 {item} {rank} {score:.9g} fedrank\n"
