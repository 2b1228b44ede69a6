"""Quality on MQ2008 folds: teacher, federated student with labels only, federated student
with rank distillation (mean and spread over the folds, test split of each fold).

All folds and both federations run in ONE start of Flower's simulation runtime (the clients
load each fold's data from the server's settings); one teacher is trained per fold.

    python benchmarks/bench_quality_mq2008.py          # 5 folds, 10 clients, 10 rounds
    python benchmarks/bench_quality_mq2008.py --folds 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MQ2008 = ROOT / ".." / "shared" / "data" / "MQ2008"
METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "map", "log_loss", "kendall_tau")


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", default="1,2,3,4,5", help="comma-separated fold numbers")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config keys"
    )
    args = parser.parse_args(argv)

    from fedrank.simulations.simulate import DISTILL, LABELS_ONLY, _parse_set, run_federations

    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-quality-"))
    base = {
        "num-server-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "teacher-cache-dir": str(out / "teacher"),
        **_parse_set(args.set),
    }
    configs, keys = [], []
    for fold in folds:
        data = str(MQ2008 / f"Fold{fold}")
        for name, overrides in (("labels-only", LABELS_ONLY), ("distill", DISTILL)):
            configs.append(
                {**base, **overrides, "data-path": data, "out-dir": str(out / f"Fold{fold}" / name)}
            )
            keys.append((fold, name))
    print(
        f"MQ2008 folds {folds}: {args.clients} clients, {args.rounds} rounds, "
        f"{len(configs)} federations in one simulation runtime"
    )
    summaries = dict(zip(keys, run_federations(configs, num_clients=args.clients), strict=True))

    per_model: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in METRICS} for m in ("teacher", "labels-only", "distill")
    }
    print(
        f"\n{'fold':>4} {'teacher':>9} {'labels-only':>12} {'distill':>9} {'gain':>8}"
        "  (NDCG@10, test)"
    )
    for fold in folds:
        teacher = summaries[(fold, "distill")]["teacher"]["metrics"]
        labels = summaries[(fold, "labels-only")]["student"]["metrics"]
        distill = summaries[(fold, "distill")]["student"]["metrics"]
        for name, metrics in (("teacher", teacher), ("labels-only", labels), ("distill", distill)):
            for k in METRICS:
                if k in metrics:
                    per_model[name][k].append(float(metrics[k]))
        gain = distill["ndcg@10"] - labels["ndcg@10"]
        print(
            f"{fold:>4} {teacher['ndcg@10']:>9.4f} {labels['ndcg@10']:>12.4f} "
            f"{distill['ndcg@10']:>9.4f} {gain:>+8.4f}"
        )

    print(f"\nmean ± std over {len(folds)} fold(s), test split:")
    print(f"{'model':<26}" + "".join(f"{k:>18}" for k in METRICS))
    names = {
        "teacher": "teacher (server)",
        "labels-only": "federated, labels only",
        "distill": "federated, distillation",
    }
    for model, label in names.items():
        cells = []
        for k in METRICS:
            values = per_model[model][k]
            cells.append(f"{_fmt(values):>18}" if values else f"{'-':>18}")
        print(f"{label:<26}" + "".join(cells))
    gains = [
        d - lo
        for d, lo in zip(
            per_model["distill"]["ndcg@10"], per_model["labels-only"]["ndcg@10"], strict=True
        )
    ]
    wins = sum(g > 0 for g in gains)
    teacher_params = summaries[(folds[0], "distill")]["teacher"]["parameters"]
    student_params = summaries[(folds[0], "distill")]["student"]["parameters"]
    print(
        f"\ndistillation - labels only, NDCG@10: {_fmt(gains)} (better on {wins} of "
        f"{len(gains)} folds); parameters: teacher {teacher_params:,}, student {student_params:,}"
    )
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
