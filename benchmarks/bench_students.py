"""Students on the data users bring: before/after figures measured in one run.

1. **Feature transform** (central students, all labels): the same student with and without the
   server-fitted feature transform on the synthetic data and MQ2008 Fold1, as they are and with
   every column rescaled to raw-like, heavy-tailed values (``raw_scale`` / ``RawScaling``).
2. **Pointwise rule** (central students, 10% of the sets labelled): ``label_sigmoid_ce``
   dropping sets whose labels are all equal (the old rule, ``uniform_sets="zero"``) vs
   counting every item (DESIGN.md's rule, the default), labels-only and with rank
   distillation: the effect on log loss.
3. **Federated defaults** (``--clients`` simulated clients, default settings, test split):
   MQ2008 folds with raw-like features, full training split and a ~60-query subset, with the
   defaults ("after") and with the old ones ("before": no feature transform,
   ``min-local-steps = 0``); the student's share of its teacher's NDCG@10.

    python benchmarks/bench_students.py                 # all three, MQ2008 folds 1-5
    python benchmarks/bench_students.py --folds 1 --parts transform,pointwise
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedrank.client.trainer import TrainSettings, train_student  # noqa: E402
from fedrank.common.config import FedrankConfig  # noqa: E402
from fedrank.common.datasets import Dataset, load_dataset  # noqa: E402
from fedrank.common.evaluation import evaluate_model  # noqa: E402
from fedrank.common.losses import CompositeLoss, LossTerm  # noqa: E402
from fedrank.common.partitioners import label_availability  # noqa: E402
from fedrank.server.student_setup import build_student  # noqa: E402
from fedrank.server.teacher import TeacherConfig, train_or_load_teacher  # noqa: E402
from fedrank.simulations.central import train_central_student  # noqa: E402
from fedrank.simulations.derived_data import write_derived_fold  # noqa: E402
from fedrank.simulations.simulate import LABELS_ONLY, run_federations  # noqa: E402

MQ2008 = ROOT / ".." / "shared" / "data" / "MQ2008"
PARTS = ("transform", "pointwise", "federated")
BEFORE = {"feature-transform": False, "min-local-steps": 0}


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(_row(head, widths))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(_row(r, widths))


# ---- 1. feature transform ----------------------------------------------------------------------
def part_transform(args: argparse.Namespace, work: Path) -> None:
    folds = [int(f) for f in args.folds.split(",") if f]
    units: dict[str, list[tuple[str, int]]] = {
        "synthetic": [("synthetic", seed) for seed in (0, 1, 2)],
        "synthetic, raw_scale=1e5": [("synthetic:raw_scale=1e5", seed) for seed in (0, 1, 2)],
        "MQ2008": [(os.fspath(MQ2008 / f"Fold{f}"), seed) for f in folds for seed in (0, 1)],
        "MQ2008, raw-like": [
            (os.fspath(write_derived_fold(MQ2008 / f"Fold{f}", work / f"fold{f}-raw", raw=True)), s)
            for f in folds
            for s in (0, 1)
        ],
    }
    print(
        "\n1. feature transform: central student, every set labelled, labels-only loss, test "
        f"split; mean over units (synthetic: 3 seeds; MQ2008: folds {folds} x 2 seeds)"
    )
    rows = []
    for name, specs in units.items():
        result: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for spec, seed in specs:
            dataset = load_dataset(spec, seed=seed)
            for use in (False, True):
                config = {"data-path": spec, "seed": seed, "feature-transform": use}
                config.update(LABELS_ONLY, **{"num-server-rounds": args.rounds})
                metrics = train_central_student(config, labels="all", dataset=dataset).metrics
                result[use].append(metrics)
        off = {k: statistics.mean(m[k] for m in result[False]) for k in ("ndcg@10", "log_loss")}
        on = {k: statistics.mean(m[k] for m in result[True]) for k in ("ndcg@10", "log_loss")}
        diffs = [
            b["ndcg@10"] - a["ndcg@10"] for a, b in zip(result[False], result[True], strict=True)
        ]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        rows.append(
            [
                f"{name} (n={len(specs)})",
                f"{off['ndcg@10']:.4f}",
                f"{on['ndcg@10']:.4f}",
                f"{statistics.mean(diffs):+.4f} ± {se:.4f}",
                f"{off['log_loss']:.4g}",
                f"{on['log_loss']:.4f}",
            ]
        )
    _print_table(
        ["data", "NDCG@10 off", "NDCG@10 on", "change ± se", "log loss off", "log loss on"], rows
    )


# ---- 2. pointwise rule -------------------------------------------------------------------------
def _loss(cfg: FedrankConfig, uniform_sets: str) -> CompositeLoss:
    terms = []
    for term in cfg.loss_terms():
        options = dict(term.options)
        if term.loss == "label_sigmoid_ce":
            options["uniform_sets"] = uniform_sets
        terms.append(LossTerm(term.family, term.loss, term.weight, options))
    return CompositeLoss(terms)


def _central(
    cfg: FedrankConfig, dataset: Dataset, loss: CompositeLoss, teacher: Any, mask: Any
) -> dict[str, float]:
    model = build_student(cfg, dataset)
    settings = TrainSettings(
        epochs=cfg.num_server_rounds * cfg.local_epochs,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    train_student(model, dataset.train, loss, settings, teacher=teacher["train"], label_mask=mask)
    return evaluate_model(model, dataset.test, teacher=teacher["test"])


def part_pointwise(args: argparse.Namespace, work: Path) -> None:
    print(
        "\n2. pointwise rule: central student, 10% of the sets labelled, test split; "
        "label_sigmoid_ce dropping all-equal sets (before) vs counting every item (after)"
    )
    rows = []
    for name, spec in (("synthetic", "synthetic"), ("MQ2008 Fold1", os.fspath(MQ2008 / "Fold1"))):
        dataset = load_dataset(spec)
        base = FedrankConfig.from_run_config({"data-path": spec, "num-server-rounds": args.rounds})
        _, table = train_or_load_teacher(dataset, TeacherConfig.from_config(base), work / "teacher")
        teacher = {k: table.align(dataset.splits[k]) for k in ("train", "test")}
        mask = label_availability(dataset.train.num_sets, 0.1, seed=0)
        uniform = 1.0 - float(
            sum(
                len(set(dataset.train.labels[a:b] > 0)) > 1
                for a, b in zip(dataset.train.offsets[:-1], dataset.train.offsets[1:], strict=True)
            )
            / dataset.train.num_sets
        )
        for method, extra in (("labels-only", LABELS_ONLY), ("distill", {})):
            cfg = base.replace(**extra)
            before = _central(cfg, dataset, _loss(cfg, "zero"), teacher, mask)
            after = _central(cfg, dataset, _loss(cfg, "keep"), teacher, mask)
            rows.append(
                [
                    f"{name} ({uniform:.0%} sets all-equal), {method}",
                    f"{before['log_loss']:.4f}",
                    f"{after['log_loss']:.4f}",
                    f"{after['log_loss'] / before['log_loss'] - 1:+.1%}",
                    f"{before['ndcg@10']:.4f}",
                    f"{after['ndcg@10']:.4f}",
                ]
            )
    _print_table(
        ["data, student", "log loss before", "after", "change", "NDCG@10 before", "after"], rows
    )


# ---- 3. federated defaults ---------------------------------------------------------------------
def part_federated(args: argparse.Namespace, work: Path) -> None:
    folds = [int(f) for f in args.folds.split(",") if f]
    configs, keys = [], []
    for fold in folds:
        src = MQ2008 / f"Fold{fold}"
        data = {
            "raw-like": write_derived_fold(src, work / f"fold{fold}-raw", raw=True, seed=fold),
            "60 queries, raw-like": write_derived_fold(
                src, work / f"fold{fold}-60", train_sets=60, raw=True, seed=fold
            ),
        }
        for name, path in data.items():
            for when, overrides in (("before", BEFORE), ("after", {})):
                configs.append(
                    {
                        "data-path": os.fspath(path),
                        "fraction-evaluate": 0.0,
                        "teacher-cache-dir": os.fspath(work / "teacher"),
                        "out-dir": os.fspath(work / "runs" / f"fold{fold}-{name}-{when}"),
                        **overrides,
                    }
                )
                keys.append((fold, name, when))
    print(
        f"\n3. federated students, defaults, {args.clients} clients, MQ2008 folds {folds}: "
        f"{len(configs)} federations in one simulation runtime ..."
    )
    t0 = time.perf_counter()
    summaries = dict(zip(keys, run_federations(configs, num_clients=args.clients), strict=True))
    print(f"   ({time.perf_counter() - t0:.0f}s)")
    rows, shares = [], {}
    for (fold, name, when), summary in summaries.items():
        student = summary["student"]["metrics"]
        teacher = summary["teacher"]["metrics"]["ndcg@10"]
        share = student["ndcg@10"] / teacher
        shares.setdefault((name, when), []).append(share)
        rows.append(
            [
                f"Fold{fold} {name} ({when})",
                f"{teacher:.4f}",
                f"{student['ndcg@10']:.4f}",
                f"{share:.0%}",
                f"{student['log_loss']:.4g}",
                f"{student.get('kendall_tau', float('nan')):.3f}",
            ]
        )
    _print_table(["data", "teacher", "student", "share", "log loss", "tau"], rows)
    print("\nmean share of the teacher's NDCG@10 (min over folds); target >= 85%:")
    for (name, when), values in shares.items():
        print(
            f"  {name:<22} {when:<6} {statistics.mean(values):.0%} (min {min(values):.0%}, "
            f"{sum(v >= 0.85 for v in values)}/{len(values)} folds >= 85%)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--folds", default="1,2,3,4,5", help="MQ2008 folds (part 3)")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="central epochs = 2 x rounds")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; valid: {', '.join(PARTS)}")
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-students-"))
    torch.set_num_threads(1)
    started = time.perf_counter()
    if "transform" in parts:
        part_transform(args, work)
    if "pointwise" in parts:
        part_pointwise(args, work)
    if "federated" in parts:
        part_federated(args, work)
    print(f"\n{time.perf_counter() - started:.0f}s; work folder {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
