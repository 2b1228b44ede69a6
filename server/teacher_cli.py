"""``fedrank teacher``: build a teacher and its versioned score table for a dataset.

Three kinds of teacher:

- ``fedrank teacher --data PATH`` trains the built-in set-transformer teacher;
- ``fedrank teacher --kind lightgbm --data PATH`` trains LightGBM LambdaMART;
- ``fedrank teacher --scores FILE --data PATH`` imports the scores of a ranker you already
  have (a TREC run, CSV or Parquet file; :mod:`fedrank.server.imported_scores`).

Writes into ``--out`` (default ``runs/teacher``):

- ``scores/``: the float32 score table for every set of every split (a table folder,
  :mod:`fedrank.common.score_table`); ``teacher-kind = "imported"`` with ``teacher-scores`` = the
  ``--out`` folder distils it in a federation;
- ``teacher.json``: what the teacher is (kind, settings or source file and its SHA-256,
  metrics per split, table version); ``teacher.pt`` (set transformer) or ``model.txt``
  (LightGBM's text model format) beside it;
- ``metrics.json``: NDCG@1/5/10 per split, time, score table version and size (float32 and
  float16).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrank.common.atomic_io import atomic_write_json, sha256_file
from fedrank.common.datasets import Dataset, load_dataset
from fedrank.common.errors import ConfigError
from fedrank.common.score_table import ScoreTable
from fedrank.server.imported_scores import FORMATS, detect_format, import_score_table
from fedrank.server.lightgbm_teacher import (
    LightGBMConfig,
    save_lightgbm_teacher,
    train_lightgbm,
)
from fedrank.server.teacher import (
    TeacherConfig,
    build_score_table,
    concat_splits,
    save_teacher,
    train_teacher,
)
from fedrank.server.teacher_scoring import score_to_table, split_metrics, table_path

METRICS_FILE = "metrics.json"
INFO_FILE = "teacher.json"
IMPORTED_FORMAT = "fedrank-imported-teacher-v1"
KINDS = ("set-transformer", "lightgbm")


def _parser() -> argparse.ArgumentParser:
    d = TeacherConfig()
    g = LightGBMConfig()
    p = argparse.ArgumentParser(
        prog="fedrank teacher",
        description="Build a teacher (set transformer, LightGBM or imported scores) and write "
        "its versioned score table.",
    )
    p.add_argument(
        "--data", required=True, help="'synthetic[:k=v,...]' or a LETOR fold folder/file"
    )
    p.add_argument("--out", type=Path, default=Path("runs/teacher"), help="output folder")
    p.add_argument("--data-seed", type=int, default=0, help="seed for generated/split data")
    p.add_argument("--kind", choices=KINDS, default=KINDS[0], help="teacher to train")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch log lines")
    imp = p.add_argument_group("imported scores (distil the ranker you already have)")
    imp.add_argument(
        "--scores", type=Path, help="a TREC run, CSV or Parquet file scoring every item"
    )
    imp.add_argument(
        "--format", choices=FORMATS, help="format of --scores (default: from its file name)"
    )
    st = p.add_argument_group("set transformer (--kind set-transformer)")
    st.add_argument("--epochs", type=int, default=d.epochs)
    st.add_argument("--seed", type=int, default=d.seed, help="training seed")
    st.add_argument("--lr", type=float, default=d.lr)
    st.add_argument("--weight-decay", type=float, default=d.weight_decay)
    st.add_argument("--batch-size", type=int, default=d.batch_size, help="sets per batch")
    st.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs")
    st.add_argument("--d-model", type=int, default=d.d_model)
    st.add_argument("--heads", type=int, default=d.num_heads)
    st.add_argument("--layers", type=int, default=d.num_layers)
    st.add_argument("--dropout", type=float, default=d.dropout)
    st.add_argument("--softmax-weight", type=float, default=d.label_softmax_weight)
    st.add_argument("--sigmoid-weight", type=float, default=d.label_sigmoid_ce_weight)
    st.add_argument("--max-seconds", type=float, default=None, help="stop training after this")
    st.add_argument("--threads", type=int, default=d.num_threads, help="torch/LightGBM threads")
    lg = p.add_argument_group("LightGBM LambdaMART (--kind lightgbm)")
    lg.add_argument("--trees", type=int, default=g.trees, help="most boosting rounds")
    lg.add_argument("--leaves", type=int, default=g.leaves, help="leaves per tree")
    lg.add_argument("--learning-rate", type=float, default=g.learning_rate)
    lg.add_argument("--min-data-in-leaf", type=int, default=g.min_data_in_leaf)
    lg.add_argument(
        "--early-stopping",
        type=int,
        default=g.early_stopping,
        help="stop after this many trees without a better vali NDCG@10 (0: off)",
    )
    return p


def _set_transformer(args: argparse.Namespace, dataset: Dataset) -> tuple[ScoreTable, dict]:
    config = TeacherConfig(
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        dropout=args.dropout,
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
        label_softmax_weight=args.softmax_weight,
        label_sigmoid_ce_weight=args.sigmoid_weight,
        max_seconds=args.max_seconds,
        num_threads=args.threads,
    )
    splits = dataset.splits
    result = train_teacher(
        splits["train"], splits.get("vali"), config, progress=not args.no_progress
    )
    table = build_score_table(
        result.model,
        concat_splits(splits),
        path=table_path(args.out),
        progress=not args.no_progress,
    )
    extra = {
        "kind": "set-transformer",
        "config": config.to_dict(),
        "dataset": dataset.name,
        "score_table_version": table.version,
        "split_metrics": split_metrics(splits, table),
    }
    save_teacher(result, args.out, extra=extra)
    note = (
        f"teacher: best epoch {result.best_epoch} of {len(result.history)} "
        f"({result.stopped}), trained in {result.seconds:.1f}s"
    )
    return table, {**result.metrics(), "config": config.to_dict(), "note": note}


def _lightgbm(args: argparse.Namespace, dataset: Dataset) -> tuple[ScoreTable, dict]:
    config = LightGBMConfig(
        trees=args.trees,
        leaves=args.leaves,
        learning_rate=args.learning_rate,
        min_data_in_leaf=args.min_data_in_leaf,
        early_stopping=args.early_stopping,
        seed=args.seed,
        num_threads=args.threads or 0,
    )
    splits = dataset.splits
    teacher = train_lightgbm(
        splits["train"], splits.get("vali"), config, progress=not args.no_progress
    )
    table = score_to_table(
        concat_splits(splits),
        teacher.score,
        table_path(args.out),
        progress=not args.no_progress,
        desc="lightgbm scores",
    )
    extra = {
        "config": config.to_dict(),
        "dataset": dataset.name,
        "score_table_version": table.version,
        "split_metrics": split_metrics(splits, table),
    }
    save_lightgbm_teacher(teacher, args.out, extra)
    info = teacher.info
    note = (
        f"lightgbm teacher: {info['best_iteration']} of {info['trees_trained']} trees kept "
        f"({info['stopped']}), trained in {info['train_seconds']:.1f}s"
    )
    return table, {**info, "config": config.to_dict(), "note": note}


def _imported(args: argparse.Namespace, dataset: Dataset) -> tuple[ScoreTable, dict]:
    started = time.perf_counter()
    fmt = args.format or detect_format(args.scores)
    splits = dataset.splits
    table = import_score_table(args.scores, concat_splits(splits), table_path(args.out), fmt)
    seconds = time.perf_counter() - started
    info = {
        "format": IMPORTED_FORMAT,
        "kind": "imported",
        "source": str(args.scores),
        "source_format": fmt,
        "source_sha256": sha256_file(args.scores),
        "dataset": dataset.name,
        "score_table_version": table.version,
        "split_metrics": split_metrics(splits, table),
    }
    atomic_write_json(args.out / INFO_FILE, info)
    note = f"imported {table.num_items} scores from {args.scores} ({fmt}) in {seconds:.1f}s"
    keep = ("source", "source_format", "source_sha256")
    return table, {**{k: info[k] for k in keep}, "import_seconds": round(seconds, 3), "note": note}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    if args.scores is not None and args.kind != KINDS[0]:
        raise ConfigError("--scores imports a teacher's scores; it does not go with --kind")
    if args.format is not None and args.scores is None:
        raise ConfigError("--format describes --scores; give --scores FILE")
    kind = "imported" if args.scores is not None else args.kind
    dataset = load_dataset(args.data, seed=args.data_seed)
    splits = dataset.splits
    print(
        f"data {dataset.name}: "
        + ", ".join(f"{k} {v.num_sets} sets / {v.num_items} items" for k, v in splits.items())
        + f", {next(iter(splits.values())).num_features} features"
    )
    build = {"set-transformer": _set_transformer, "lightgbm": _lightgbm, "imported": _imported}
    started = time.perf_counter()
    table, details = build[kind](args, dataset)
    seconds = time.perf_counter() - started
    note = details.pop("note")
    metrics = _write_metrics(args.out, kind, dataset, table, details, seconds)

    print(note)
    for name in ("vali", "test", "train"):
        if name in metrics["splits"]:
            m = metrics["splits"][name]
            print(
                f"  {name:<5} NDCG@1 {m['ndcg@1']:.4f}  NDCG@5 {m['ndcg@5']:.4f}  "
                f"NDCG@10 {m['ndcg@10']:.4f}"
            )
    sizes = metrics["score_table"]
    print(
        f"score table {table.version}: {table.num_sets} sets, {table.num_items} items, "
        f"{sizes['bytes_float32']:,} bytes float32 ({sizes['bytes_float16']:,} bytes as float16)"
    )
    model_file = {"set-transformer": "teacher.pt, ", "lightgbm": "model.txt, "}.get(kind, "")
    print(f"wrote {args.out}/: {model_file}{INFO_FILE}, scores/, {METRICS_FILE}")
    if kind == "imported":
        print(
            f'distil it: teacher-kind = "imported", teacher-scores = "{args.out}" '
            "(fedrank simulate --set ... or [tool.flwr.app.config])"
        )
    return 0


def _write_metrics(
    out: Path, kind: str, dataset: Dataset, table: ScoreTable, details: dict, seconds: float
) -> dict[str, Any]:
    metrics = {
        "kind": kind,
        "dataset": dataset.name,
        "splits": split_metrics(dataset.splits, table),
        "ndcg_empty": "zero",
        "seconds": round(seconds, 3),
        **details,
        "score_table": {
            "version": table.version,
            "num_sets": table.num_sets,
            "num_items": table.num_items,
            "bytes_float32": table.nbytes,
            "bytes_float16": table.num_items * 2 + table.nbytes - table.num_items * 4,
            "folder": "scores",
        },
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    return metrics


if __name__ == "__main__":
    raise SystemExit(main())
