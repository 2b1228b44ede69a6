"""Derived LETOR folds for tests and benchmarks: fewer training sets, raw-like features.

:func:`write_derived_fold` reads a LETOR fold folder (``train``/``vali``/``test``), optionally
keeps a seeded random subset of the training sets (the "small data" case: about 60 training
queries over 5 clients) and optionally rescales every column to raw-like, heavy-tailed values
with :class:`fedrank.common.synthetic.RawScaling` (each column times a factor in ``[1,
max_factor]``, half of them through ``exp`` first), and writes the result as a new fold folder that
``data-path`` can point at. The source folder is only read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError
from fedrank.common.letor import write_letor
from fedrank.common.synthetic import raw_like_splits

__all__ = ["write_derived_fold"]


def write_derived_fold(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    train_sets: int | None = None,
    raw: bool = False,
    seed: int = 0,
    max_factor: float = 1e5,
) -> Path:
    """Write ``out_dir/{train,vali,test}.txt`` derived from the fold folder ``source``.

    ``train_sets``: keep that many training sets (seeded; None keeps all). ``raw``: raw-like
    rescaled features (scaling drawn on the kept training sets, applied to every split).
    Returns ``out_dir``.
    """
    dataset = load_dataset(os.fspath(source), seed=seed)
    splits = dict(dataset.splits)
    if train_sets is not None:
        total = splits["train"].num_sets
        if not 1 <= train_sets <= total:
            raise ConfigError(f"train_sets must lie in 1..{total}, got {train_sets}")
        keep = np.sort(np.random.default_rng([seed, 60]).permutation(total)[:train_sets])
        splits["train"] = splits["train"].take(keep)
    if raw:
        splits = raw_like_splits(splits, seed=seed, max_factor=max_factor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, sets in splits.items():
        write_letor(sets, out / f"{name}.txt")
    return out
