"""``fedrank data``: inspect example-set data.

``fedrank data stats PATH`` prints, for a LETOR file, a fold folder (train / vali / test), a
data root (its ``Fold1``) or ``synthetic[:key=value,...]``: sets, items, features, the label
histogram, the set-size distribution and the sets with no relevant item (label > 0).

``fedrank data qrels PATH [--split test] [--out FILE]`` writes TREC qrels (``qid 0 docid
label``) of a LETOR file or a fold folder's split, with the ids ``fedrank score`` writes in its
TREC runs, so ``trec_eval`` or ``ir-measures`` can evaluate those runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.atomic_io import atomic_write_text
from fedrank.common.datasets import load_dataset, resolve_letor
from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import SPLIT_NAMES, find_split_file, read_letor
from fedrank.common.trec import qrels_lines

__all__ = ["describe", "main"]

PERCENTILES = (10, 25, 50, 75, 90)


def describe(sets: ExampleSets) -> dict[str, Any]:
    """Statistics of one :class:`ExampleSets` as a JSON-able dict."""
    sizes = sets.sizes
    labels = sets.labels
    values, counts = np.unique(labels, return_counts=True)
    as_int = np.all(values == np.round(values))
    hist = {
        (str(int(v)) if as_int else f"{v:g}"): int(c) for v, c in zip(values, counts, strict=True)
    }
    positives = np.add.reduceat((labels > 0).astype(np.int64), sets.offsets[:-1])
    stats: dict[str, Any] = {
        "sets": sets.num_sets,
        "items": sets.num_items,
        "features": sets.num_features,
        "labels": hist,
        "set_size": {
            "min": int(sizes.min()),
            "mean": round(float(sizes.mean()), 2),
            "max": int(sizes.max()),
            **{f"p{p}": float(np.percentile(sizes, p)) for p in PERCENTILES},
        },
        "sets_without_relevant": int(np.sum(positives == 0)),
        "item_ids": sets.item_ids is not None,
    }
    if sets.relevance is not None:
        stats["relevance_mean"] = round(float(sets.relevance.mean()), 4)
    return stats


def _parts(path: str, seed: int) -> tuple[dict[str, ExampleSets], dict[str, Any]]:
    if path == "synthetic" or path.startswith("synthetic:"):
        ds = load_dataset(path, seed=seed)
        extra = {
            "student_columns": ds.student_columns.tolist(),
            "privileged_columns": ds.privileged_columns.tolist(),
            "notes": list(ds.notes),
        }
        return ds.splits, extra
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFormatError(f"{path}: no such file or folder")
    if p.is_file():
        return {p.name: read_letor(p)}, {}
    source, splits = resolve_letor(p)
    return splits, ({"read": source} if source != str(p) else {})


def _format(name: str, st: dict[str, Any]) -> list[str]:
    size = st["set_size"]
    hist = "  ".join(f"{k}: {v}" for k, v in st["labels"].items())
    no_rel = st["sets_without_relevant"]
    lines = [
        f"{name}: {st['sets']} sets, {st['items']} items, {st['features']} features",
        f"  labels: {hist}",
        "  set size: min {min}  p10 {p10:g}  p25 {p25:g}  median {p50:g}  mean {mean:g}  "
        "p75 {p75:g}  p90 {p90:g}  max {max}".format(**size),
        f"  sets with no relevant item: {no_rel} ({100.0 * no_rel / st['sets']:.1f}%)",
    ]
    if "relevance_mean" in st:
        lines.append(f"  mean true relevance: {st['relevance_mean']}")
    return lines


def stats_main(args: argparse.Namespace) -> int:
    parts, extra = _parts(args.path, args.seed)
    report = {name: describe(sets) for name, sets in parts.items()}
    if len(parts) > 1:
        report["all"] = describe(ExampleSets.concat(list(parts.values())))
    if args.json:
        print(json.dumps({"path": args.path, **extra, "parts": report}, indent=2))
        return 0
    print(f"data: {args.path}")
    if "read" in extra:
        print(f"read: {extra['read']}")
    for name, st in report.items():
        print("\n".join(_format(name, st)))
    if "privileged_columns" in extra:
        print(f"student columns: {extra['student_columns']}")
        print(f"privileged (teacher-only) columns: {extra['privileged_columns']}")
    return 0


def _letor_split(path: str, split: str) -> tuple[ExampleSets, str]:
    """The sets of a LETOR file, or of ``split`` of a fold folder (``all``: every split)."""
    src = Path(path).expanduser()
    if src.is_file():
        return read_letor(src), str(src)
    if not src.is_dir():
        raise DataFormatError(f"{path}: no such file or folder")
    if split == "all":
        _, splits = resolve_letor(src)
        return ExampleSets.concat([splits[n] for n in SPLIT_NAMES if n in splits]), str(src)
    found = find_split_file(src, split)
    if found is None:
        raise DataFormatError(f"{path}: folder has no {split}.txt or {split}.txt.gz (see --split)")
    return read_letor(found), str(found)


def qrels_main(args: argparse.Namespace) -> int:
    sets, source = _letor_split(args.path, args.split)
    lines = qrels_lines(sets, source)
    if args.out:
        text = "".join(lines)
        atomic_write_text(args.out, text)
        note = f"wrote qrels of {sets.num_sets} sets, {sets.num_items} items of {source}"
        print(f"{note} to {args.out}", file=sys.stderr)
    else:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.writelines(lines)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrank data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser(
        "stats", help="statistics of a LETOR file, fold folder or synthetic data"
    )
    stats.add_argument("path", help="LETOR file, fold folder, data root, or synthetic[:k=v,...]")
    stats.add_argument("--seed", type=int, default=0, help="seed for synthetic data (default 0)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    qrels = sub.add_parser(
        "qrels", help="TREC qrels (qid 0 docid label) of a LETOR file or fold folder"
    )
    qrels.add_argument("path", help="LETOR file (.txt/.gz) or fold folder")
    qrels.add_argument(
        "--split",
        default="test",
        choices=(*SPLIT_NAMES, "all"),
        help="split of a fold folder (default test; all: every split)",
    )
    qrels.add_argument("--out", help="file to write (atomically); default: standard output")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "stats":
        return stats_main(args)
    if args.command == "qrels":
        return qrels_main(args)
    return 2  # pragma: no cover - argparse rejects unknown commands
