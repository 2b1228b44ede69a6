"""Teachers side by side on MQ2008: the built-in set transformer vs LightGBM LambdaMART, and
the federated student distilled from each (plus a labels-only student for reference).

All folds and federations run in ONE start of Flower's simulation runtime; every federation
of a fold has the same clients, seed and settings except the teacher. Prints per fold and the
mean over folds (test split, NDCG@10) and writes ``teachers.json`` and ``teachers.png`` into
``--out``.

    python benchmarks/bench_teachers_mq2008.py              # 5 folds, 10 clients, 10 rounds
    python benchmarks/bench_teachers_mq2008.py --folds 1 --rounds 3 --clients 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedrank.simulations.simulate import DISTILL, LABELS_ONLY, _parse_set, run_federations  # noqa: E402

MQ2008 = ROOT / ".." / "shared" / "data" / "MQ2008"
KINDS = {"set-transformer": "set transformer", "lightgbm": "LightGBM LambdaMART"}


def _fmt(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _plot(folds: list[int], results: dict, labels_only: dict, path: Path) -> None:
    columns = [*(f"Fold{f}" for f in folds), "mean"]
    x = np.arange(len(columns))
    bars = []
    colors = {"set-transformer": ("#1f77b4", "#9ecae1"), "lightgbm": ("#d62728", "#fc9272")}
    for kind, name in KINDS.items():
        for role, shade in (("teacher", 0), ("student", 1)):
            values = [results[(f, kind)][role] for f in folds]
            bars.append(
                (f"{role}: {name}", [*values, statistics.mean(values)], colors[kind][shade])
            )
    if labels_only:
        values = [labels_only[f] for f in folds]
        bars.append(("student: labels only", [*values, statistics.mean(values)], "#7f7f7f"))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(columns)), 4.8))
    for i, (label, values, color) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label, color=color)
    low = min(min(v) for _, v, _ in bars)
    ax.set_ylim(max(0.0, low - 0.05), max(max(v) for _, v, _ in bars) + 0.03)
    ax.set_xticks(x, columns)
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title("MQ2008: each teacher and the federated student distilled from it")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", default="1,2,3,4,5", help="comma-separated fold numbers")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-labels-only", action="store_true", help="skip the reference")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config keys"
    )
    args = parser.parse_args(argv)
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-teachers-"))
    base = {
        "num-server-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "teacher-cache-dir": str(out / "teachers"),
        **_parse_set(args.set),
    }
    configs, keys = [], []
    for fold in folds:
        data = str(MQ2008 / f"Fold{fold}")
        for kind in KINDS:
            run = {**base, **DISTILL, "teacher-kind": kind, "data-path": data}
            configs.append({**run, "out-dir": str(out / f"Fold{fold}" / kind)})
            keys.append((fold, kind))
        if not args.no_labels_only:
            run = {**base, **LABELS_ONLY, "data-path": data}
            configs.append({**run, "out-dir": str(out / f"Fold{fold}" / "labels-only")})
            keys.append((fold, "labels-only"))
    print(
        f"MQ2008 folds {folds}: {args.clients} clients, {args.rounds} rounds, "
        f"{len(configs)} federations in one simulation runtime"
    )
    started = time.perf_counter()
    summaries = dict(zip(keys, run_federations(configs, num_clients=args.clients), strict=True))
    seconds = time.perf_counter() - started

    results, labels_only = {}, {}
    for fold in folds:
        for kind in KINDS:
            s = summaries[(fold, kind)]
            results[(fold, kind)] = {
                "teacher": float(s["teacher"]["metrics"]["ndcg@10"]),
                "student": float(s["student"]["metrics"]["ndcg@10"]),
                "agreement": float(s["student"]["metrics"].get("kendall_tau", float("nan"))),
                "teacher_parameters": int(s["teacher"]["parameters"]),
                "teacher_seconds": float(s["teacher"]["seconds"]),
            }
        if (fold, "labels-only") in summaries:
            labels_only[fold] = float(
                summaries[(fold, "labels-only")]["student"]["metrics"]["ndcg@10"]
            )

    head = f"{'fold':>5}"
    for name in KINDS.values():
        head += f" | {name + ': teacher':>28} {'student':>8}"
    head += f" | {'labels only':>11}"
    print("\nNDCG@10 on the test split (federated students distilled from each teacher)\n")
    print(head)
    print("-" * len(head))
    for fold in folds:
        line = f"{fold:>5}"
        for kind in KINDS:
            r = results[(fold, kind)]
            line += f" | {r['teacher']:>28.4f} {r['student']:>8.4f}"
        line += f" | {labels_only[fold]:>11.4f}" if fold in labels_only else f" | {'-':>11}"
        print(line)
    print(f"\nmean ± std over {len(folds)} fold(s):")
    for kind, name in KINDS.items():
        teacher = [results[(f, kind)]["teacher"] for f in folds]
        student = [results[(f, kind)]["student"] for f in folds]
        params = results[(folds[0], kind)]["teacher_parameters"]
        print(
            f"  {name:<20} teacher {_fmt(teacher)}   student {_fmt(student)}   "
            f"(teacher parameters {params:,} on Fold{folds[0]})"
        )
    if labels_only:
        print(f"  {'labels only':<20} {'':>24}   student {_fmt(list(labels_only.values()))}")
    st = [results[(f, "set-transformer")]["student"] for f in folds]
    lg = [results[(f, "lightgbm")]["student"] for f in folds]
    wins = sum(a > b for a, b in zip(lg, st, strict=True))
    diff = [a - b for a, b in zip(lg, st, strict=True)]
    print(
        f"\nstudent from LightGBM - student from set transformer: {_fmt(diff)} "
        f"(LightGBM's student better on {wins} of {len(folds)} folds); {seconds:.0f}s in all"
    )
    record = {
        "folds": folds,
        "clients": args.clients,
        "rounds": args.rounds,
        "results": {f"Fold{f}/{k}": v for (f, k), v in results.items()},
        "labels_only": {f"Fold{f}": v for f, v in labels_only.items()},
        "seconds": seconds,
    }
    (out / "teachers.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(folds, results, labels_only, out / "teachers.png")
    print(f"outputs: {out / 'teachers.json'}, {out / 'teachers.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
