"""``fedrank teacher``: train the teacher on a dataset and write its checkpoint and score table.

Writes into ``--out``:

- ``teacher.pt`` + ``teacher.json``: the model (state dict) with its spec, config and metrics;
- ``scores.npz``: the float32 teacher score table for every set of every split;
- ``metrics.json``: NDCG@1/5/10 per split, training time, score table sizes (float32 and
  float16) and version.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.atomic_io import atomic_write_json
from common.errors import ConfigError

SCORES_FILE = "scores.npz"
METRICS_FILE = "metrics.json"


def _parser() -> argparse.ArgumentParser:
    from server.teacher import TeacherConfig

    d = TeacherConfig()
    p = argparse.ArgumentParser(
        prog="fedrank teacher",
        description="Train the server-side teacher and write its checkpoint and score table.",
    )
    p.add_argument(
        "--data", required=True, help="'synthetic[:k=v,...]' or a LETOR fold folder/file"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--data-seed", type=int, default=0, help="seed for generated/split data")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed, help="training seed")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sets per batch")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--softmax-weight", type=float, default=d.label_softmax_weight)
    p.add_argument("--sigmoid-weight", type=float, default=d.label_sigmoid_ce_weight)
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this")
    p.add_argument("--threads", type=int, default=d.num_threads, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch log lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from common.datasets import load_dataset
    from server.teacher import (
        TeacherConfig,
        build_score_table,
        concat_splits,
        evaluate,
        save_teacher,
        train_teacher,
    )

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
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
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    dataset = load_dataset(args.data, seed=args.data_seed)
    splits = dataset.splits
    print(
        f"data {dataset.name}: "
        + ", ".join(f"{k} {v.num_sets} sets / {v.num_items} items" for k, v in splits.items())
        + f", {next(iter(splits.values())).num_features} features"
    )
    result = train_teacher(
        splits["train"], splits.get("vali"), config, progress=not args.no_progress
    )
    started = time.perf_counter()
    all_sets = concat_splits(splits)
    table = build_score_table(result.model, all_sets)
    score_seconds = time.perf_counter() - started
    split_metrics = {name: evaluate(result.model, sets) for name, sets in splits.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    table.save(args.out / SCORES_FILE)
    half = table.to_float16()
    sizes = {
        "version": table.version,
        "num_sets": table.num_sets,
        "num_items": table.num_items,
        "bytes_float32": table.nbytes,
        "bytes_float16": half.nbytes,
        "file": SCORES_FILE,
    }
    extra = {
        "config": config.to_dict(),
        "dataset": dataset.name,
        "score_table_version": table.version,
        "split_metrics": split_metrics,
    }
    save_teacher(result, args.out, extra=extra)
    metrics = {
        "dataset": dataset.name,
        "splits": split_metrics,
        "ndcg_empty": "zero",
        **result.metrics(),
        "score_seconds": round(score_seconds, 3),
        "score_table": sizes,
        "config": config.to_dict(),
    }
    atomic_write_json(args.out / METRICS_FILE, metrics)

    print(
        f"teacher: best epoch {result.best_epoch} of {len(result.history)} "
        f"({result.stopped}), trained in {result.seconds:.1f}s"
    )
    for name in ("vali", "test", "train"):
        if name in split_metrics:
            m = split_metrics[name]
            print(
                f"  {name:<5} NDCG@1 {m['ndcg@1']:.4f}  NDCG@5 {m['ndcg@5']:.4f}  "
                f"NDCG@10 {m['ndcg@10']:.4f}"
            )
    print(
        f"score table {table.version}: {table.num_sets} sets, {table.num_items} items, "
        f"{table.nbytes:,} bytes float32 ({half.nbytes:,} bytes as float16)"
    )
    print(f"wrote {args.out / 'teacher.pt'}, teacher.json, {SCORES_FILE}, {METRICS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
