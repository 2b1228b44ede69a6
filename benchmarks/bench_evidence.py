"""The evidence that rank distillation pays: teacher vs central vs federated students.

For every *unit* (a data set fold and a seed) and scenario it measures, on the held-out test
sets:

- the **teacher** (set-aware, every feature, trained centrally on all labels);
- the student trained **centrally** on every set's labels ("central all-labels": what pooling
  every client's labels would give the same student, the recoverable-gap reference), and
  centrally on the scenario's labels only and with rank distillation;
- the **federated** student (``--clients`` clients, non-IID: Dirichlet over positive rate) with
  labels only, with score distillation (``score_sigmoid_ce``), with each rank-distillation
  loss (``rank_l2``, ``rank_pairwise_ce``, ``rank_softmax_ce``, ``rank_conditional``,
  ``rank_spearman``), and with all four loss families;

reporting NDCG@10, MAP, log loss and teacher-student Kendall tau as mean and spread over the
units, with a paired test against the label-only federated student (paired t-test and an
exact sign-flip permutation test over units), the share of the label-only student's NDCG@10
gap that is closed against both references (``(student - fed labels-only) / (reference - fed
labels-only)`` with the reference the central all-labels student, and the teacher), and the
change in log loss. The goal column: >= 75% of the recoverable gap (to central all-labels)
closed with log loss at most 2% worse than the federated labels-only student.

Scenarios: ``label-scarce`` (``--label-fraction`` of each client's sets carry labels, all carry
teacher scores) and ``privileged`` (the student sees only the device's features; needs data
with privileged columns, i.e. the synthetic data, or a ``device-features`` configuration key).

Weights of the teacher losses: the weight of each rank loss and of ``score_sigmoid_ce`` is
set so that its gradient norm with respect to the student scores, at the untrained student on
the training sets, equals that of ``rank_softmax_ce`` with weight 1 (printed per unit); the
label terms keep the run's weights.

Runs are resumable: every federation writes ``OUT/runs/<unit>-<scenario>-<method>`` and is
skipped when its ``summary.json`` exists; central results are kept in ``OUT/central``.

    python benchmarks/bench_evidence.py --quick          # reduced: ~10-20 minutes on 2 cores
    python benchmarks/bench_evidence.py                  # full: 5 folds x 3 seeds + synthetic

Local training uses the product's defaults (``local-epochs``, ``min-local-steps``,
``learning-rate``) unless ``--local-epochs`` / ``--lr`` are given.

Outputs in ``--out``: ``evidence_runs.csv`` (every unit and method), ``evidence.csv`` and
``evidence.md`` (the table), ``evidence.png`` (NDCG@10 per method, mean and spread).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrank.common.atomic_io import atomic_write_json, atomic_write_text  # noqa: E402

MQ2008 = ROOT / ".." / "shared" / "data" / "MQ2008"
RANK_LOSSES = (
    "rank_l2",
    "rank_pairwise_ce",
    "rank_softmax_ce",
    "rank_conditional",
    "rank_spearman",
)
METHODS = ("labels-only", "score", *RANK_LOSSES, "all-four")
# --adaptive: Exp3 per client over these rank_softmax_ce weights vs each of them fixed
ADAPTIVE_CANDIDATES = (0.25, 1.0, 4.0)
ADAPTIVE_METHODS = ("rank_softmax_ce@0.25", "rank_softmax_ce@4", "adaptive")
ADAPTIVE_SPEC = {
    "policy": "adaptive",
    "candidates": [{"rank-weight": w} for w in ADAPTIVE_CANDIDATES],
    "scale": 0.05,
}
METRICS = ("ndcg@10", "map", "log_loss", "kendall_tau")
REFERENCE_NAME = "central all-labels"  # the recoverable-gap reference
GOAL_GAP = 0.75  # share of the recoverable gap a distilled federated student closes
GOAL_LOG_LOSS = 0.02  # at most this much worse log loss than the labels-only federation


# ---- statistics (numpy only) ---------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
    front = math.exp(ln + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def paired_t(diffs: Sequence[float]) -> tuple[float, float]:
    """Paired t-test on differences: ``(t, two-sided p)``; ``(nan, nan)`` below 2 pairs."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n < 2:
        return math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return (math.inf if d.mean() else 0.0), (0.0 if d.mean() else 1.0)
    t = d.mean() / (sd / math.sqrt(n))
    df = n - 1
    p = betainc(df / 2.0, 0.5, df / (df + t * t))
    return float(t), float(p)


def sign_flip_p(diffs: Sequence[float], samples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean difference 0 (exact up to 16 pairs)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    if n <= 16:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(samples, n))
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= observed - 1e-12))


# ---- configuration -------------------------------------------------------------------------------
def base_config(args: argparse.Namespace, data: str, scenario: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "data-path": data,
        "num-server-rounds": args.rounds,
        "partition-scheme": "dirichlet",
        "partition-alpha": args.alpha,
        "student-hidden": args.hidden,
        "batch-size": 16,
        "label-loss": "label_sigmoid_ce",
        "label-weight": args.label_weight,
        "rank-label-loss": "label_softmax",
        "rank-label-weight": 1.0,
        "score-loss": "score_sigmoid_ce",
        "score-weight": 0.0,
        "rank-loss": "rank_softmax_ce",
        "rank-weight": 0.0,
        "teacher-epochs": args.teacher_epochs,
        "fraction-evaluate": 0.0,
        "eval-split": "test",
        "student-features": "device",
    }
    if args.local_epochs is not None:
        config["local-epochs"] = args.local_epochs
    if args.lr is not None:
        config["learning-rate"] = args.lr
    if scenario == "label-scarce":
        config["label-fraction"] = args.label_fraction
    return config


def method_overrides(method: str, rank_weights: dict[str, float]) -> dict[str, Any]:
    if method == "labels-only":
        return {}
    score = rank_weights.get("score_sigmoid_ce", 1.0)
    if method == "score":
        return {"score-weight": score}
    if method == "all-four":
        return {"score-weight": score, "rank-loss": "rank_softmax_ce", "rank-weight": 1.0}
    if method == "adaptive":
        from fedrank.server.client_weights import policy_config

        return {"rank-loss": "rank_softmax_ce", "rank-weight": 1.0, **policy_config(ADAPTIVE_SPEC)}
    if "@" in method:
        loss, weight = method.split("@")
        return {"rank-loss": loss, "rank-weight": float(weight)}
    return {"rank-loss": method, "rank-weight": rank_weights[method]}


# ---- one unit: teacher, central students, weights ------------------------------------------------
def prepare_unit(
    args: argparse.Namespace, data: str, seed: int, scenarios: Sequence[str], out: Path
) -> dict[str, Any]:
    """Teacher (cached), rank-loss weights and central students for one unit; cached as JSON."""
    import torch

    from fedrank.common.config import FedrankConfig
    from fedrank.common.datasets import load_dataset
    from fedrank.common.evaluation import evaluate_model
    from fedrank.common.losses import LOSSES, reduce_sets
    from fedrank.server.student_setup import build_student
    from fedrank.server.teacher import TeacherConfig, train_or_load_teacher
    from fedrank.simulations.central import train_central_student

    cache = out / "central" / f"{unit_name(data, seed)}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        # a cache from a run with fewer scenarios (or an older layout) is computed again
        if all(s in cached.get("central", {}) for s in scenarios) and all(
            "central all-labels" in cached["central"][s] for s in scenarios
        ):
            return cached
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = FedrankConfig.from_run_config({**base_config(args, data, "privileged"), "seed": seed})
    dataset = load_dataset(data, seed=seed)
    t0 = time.perf_counter()
    teacher, table = train_or_load_teacher(dataset, TeacherConfig.from_config(cfg), out / "teacher")
    print(f"  teacher ready in {time.perf_counter() - t0:.0f}s", flush=True)
    train, test = dataset.splits["train"], dataset.splits["test"]
    t_train, t_test = table.align(train), table.align(test)
    teacher_metrics = evaluate_model(teacher, test)

    # rank-loss weights: equal gradient norm at the untrained student (see the docstring)
    probe = build_student(cfg, dataset)
    batch = train.pad(np.arange(min(train.num_sets, 256)), extra={"teacher": t_train})
    norms = {}
    for name in (*RANK_LOSSES, "score_sigmoid_ce"):
        scores = probe(batch.features, batch.mask).detach().requires_grad_(True)
        value = reduce_sets(LOSSES[name](scores, batch.extra["teacher"], batch.mask), batch.mask)
        (grad,) = torch.autograd.grad(value, scores)
        norms[name] = float(grad.norm())
    ref = norms["rank_softmax_ce"]
    rank_weights = {k: round(ref / v, 6) if v > 0 else 1.0 for k, v in norms.items()}

    central: dict[str, dict[str, dict[str, float]]] = {}
    scores = {"train": t_train, "eval": t_test}
    for scenario in scenarios:
        central[scenario] = {}
        for method, labels, extra in (
            ("central all-labels", "all", {}),
            ("central labels-only", "scarce", {}),
            ("central rank-distilled", "scarce", {"rank-weight": 1.0}),
        ):
            config = {**base_config(args, data, scenario), **extra, "seed": seed}
            result = train_central_student(
                config, labels=labels, teacher_scores=scores, dataset=dataset
            )
            central[scenario][method] = {
                k: result.metrics[k] for k in METRICS if k in result.metrics
            }
    result = {
        "teacher": {k: teacher_metrics[k] for k in METRICS if k in teacher_metrics},
        "rank_weights": rank_weights,
        "central": central,
        "privileged_columns": int(len(dataset.privileged_columns)),
    }
    atomic_write_json(cache, result)
    return result


def unit_name(data: str, seed: int) -> str:
    if data.startswith("synthetic"):
        return f"synthetic-s{seed}"
    return f"mq2008-{Path(data).name.lower()}-s{seed}"


def run_federations(
    args: argparse.Namespace,
    data: str,
    seed: int,
    scenarios: Sequence[str],
    rank_weights: dict[str, float],
    out: Path,
) -> dict[tuple[str, str], Path]:
    """Every federated method of a unit in one start of the simulation runtime (a separate
    process, see ``fedrank.simulations.run_batch``); returns the run folders."""
    from fedrank.common.config import FedrankConfig
    from fedrank.simulations.run_batch import summary_complete

    dirs: dict[tuple[str, str], Path] = {}
    todo: list[Path] = []
    for scenario in scenarios:
        extra = list(ADAPTIVE_METHODS) if args.adaptive and scenario == "label-scarce" else []
        for method in [*args.methods, *extra]:
            run_dir = out / "runs" / f"{unit_name(data, seed)}-{scenario}-{method}"
            dirs[(scenario, method)] = run_dir
            if summary_complete(run_dir):
                continue
            config = {
                **base_config(args, data, scenario),
                **method_overrides(method, rank_weights),
                "seed": seed,
                "out-dir": os.fspath(run_dir),
                "teacher-cache-dir": os.fspath(out / "teacher"),
                "resume": True,
            }
            FedrankConfig.from_run_config(config)  # fail early on a bad key
            run_dir.mkdir(parents=True, exist_ok=True)
            meta = {"clients": args.clients, "threads": os.cpu_count() or 1, "config": config}
            if method == "adaptive":
                meta["client-weights"] = ADAPTIVE_SPEC  # the worker registers the policy
            atomic_write_json(run_dir / "sweep.json", {**meta, "label": f"{scenario} {method}"})
            todo.append(run_dir)
    if todo:
        t0 = time.perf_counter()
        log_path = out / "logs" / f"{unit_name(data, seed)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fedrank.simulations.run_batch", *map(os.fspath, todo)]
        env = {**os.environ, "PYTHONPATH": os.fspath(ROOT)}
        with open(log_path, "ab") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        done = sum(summary_complete(d) for d in todo)
        print(
            f"  {done}/{len(todo)} federations in {time.perf_counter() - t0:.0f}s"
            + (f" (exit {code}; see {log_path})" if code else ""),
            flush=True,
        )
    return dirs


def read_federated(run_dir: Path) -> dict[str, float] | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    metrics = summary["student"]["metrics"]
    return {k: float(metrics[k]) for k in METRICS if k in metrics}


# ---- the table -----------------------------------------------------------------------------------
def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate per (dataset, scenario, method) with paired tests against labels-only."""
    table = []
    keys = sorted({(r["dataset"], r["scenario"]) for r in rows})
    order = ["teacher", "central all-labels", "central labels-only", "central rank-distilled"]
    order += [f"federated {m}" for m in (*METHODS, *ADAPTIVE_METHODS)]
    for dataset, scenario in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["scenario"] == scenario]
        by_unit: dict[str, dict[str, dict[str, float]]] = {}
        for r in group:
            by_unit.setdefault(r["unit"], {})[r["method"]] = r
        base_name, teacher_name = "federated labels-only", "teacher"
        for method in order:
            units = [u for u, ms in by_unit.items() if method in ms]
            if not units:
                continue
            entry: dict[str, Any] = {
                "dataset": dataset,
                "scenario": scenario,
                "method": method,
                "n": len(units),
            }
            for m in METRICS:
                vals = np.array([by_unit[u][method].get(m, math.nan) for u in units], dtype=float)
                vals = vals[~np.isnan(vals)]
                entry[f"{m}_mean"] = float(vals.mean()) if vals.size else math.nan
                entry[f"{m}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            refs = (teacher_name, REFERENCE_NAME)
            paired = [u for u in units if all(n in by_unit[u] for n in (base_name, *refs))]
            if method not in (base_name, *refs) and paired:
                mine = np.array([by_unit[u][method]["ndcg@10"] for u in paired])
                base = np.array([by_unit[u][base_name]["ndcg@10"] for u in paired])
                diffs = mine - base
                t, p = paired_t(diffs)
                entry["delta_ndcg@10"] = float(diffs.mean())
                entry["p_t"] = p
                entry["p_signflip"] = sign_flip_p(diffs)
                for key, ref_name in (
                    ("gap_closed", REFERENCE_NAME),
                    ("gap_teacher", teacher_name),
                ):
                    ref = np.array([by_unit[u][ref_name]["ndcg@10"] for u in paired])
                    gap = ref.mean() - base.mean()
                    entry[key] = float(diffs.mean() / gap) if gap > 0 else math.nan
                ll = np.array([by_unit[u][method]["log_loss"] for u in paired])
                ll_base = np.array([by_unit[u][base_name]["log_loss"] for u in paired])
                entry["log_loss_change"] = float(ll.mean() / ll_base.mean() - 1.0)
                if method.startswith("federated ") and method != base_name:
                    met = (
                        entry["gap_closed"] >= GOAL_GAP
                        and entry["log_loss_change"] <= GOAL_LOG_LOSS
                    )
                    entry["goal"] = "met" if met else "NOT met"
            table.append(entry)
    return table


COLUMNS = [
    ("dataset", "data"),
    ("scenario", "scenario"),
    ("method", "model"),
    ("n", "n"),
    ("ndcg@10", "NDCG@10"),
    ("map", "MAP"),
    ("log_loss", "log loss"),
    ("kendall_tau", "tau"),
    ("delta_ndcg@10", "dNDCG@10 vs fed labels"),
    ("p_t", "p (t)"),
    ("p_signflip", "p (sign-flip)"),
    ("gap_closed", "gap closed (central all-labels)"),
    ("gap_teacher", "gap closed (teacher)"),
    ("log_loss_change", "log loss change"),
    ("goal", "goal"),
]


def _cell(entry: dict[str, Any], key: str) -> str:
    if f"{key}_mean" in entry:
        mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
        if math.isnan(mean):
            return ""
        return f"{mean:.4f} ± {std:.4f}" if entry["n"] > 1 else f"{mean:.4f}"
    value = entry.get(key, "")
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if key in ("gap_closed", "gap_teacher", "log_loss_change"):
            return f"{value:+.0%}" if key == "log_loss_change" else f"{value:.0%}"
        if key.startswith("p_"):
            return f"{value:.3f}"
        return f"{value:+.4f}"
    return str(value)


def to_markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in table:
        lines.append("| " + " | ".join(_cell(entry, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, Any]]) -> str:
    import csv
    import io

    keys = ["dataset", "scenario", "method", "n"]
    for m in METRICS:
        keys += [f"{m}_mean", f"{m}_std"]
    keys += ["delta_ndcg@10", "p_t", "p_signflip", "gap_closed", "gap_teacher"]
    keys += ["log_loss_change", "goal"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in table:
        writer.writerow({k: entry.get(k, "") for k in keys})
    return buf.getvalue()


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["dataset"], e["scenario"]) for e in table})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (dataset, scenario) in zip(axes[:, 0], panels, strict=True):
        entries = [e for e in table if e["dataset"] == dataset and e["scenario"] == scenario]
        names = [e["method"].replace("federated ", "fed ") for e in entries]
        means = [e["ndcg@10_mean"] for e in entries]
        stds = [e["ndcg@10_std"] for e in entries]
        colors = [
            "black"
            if e["method"] == "teacher"
            else "tab:gray"
            if "labels-only" in e["method"]
            else "tab:blue"
            if e["method"].startswith("central")
            else "tab:orange"
            for e in entries
        ]
        ax.bar(range(len(entries)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(entries)), names, rotation=30, ha="right", fontsize=8)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0.0, low - 0.05), max(means) + 0.05)
        ax.set_ylabel("NDCG@10 (test)")
        ax.set_title(f"{dataset}, {scenario}: n = {entries[0]['n']} (folds x seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mq2008,synthetic", help="mq2008 and/or synthetic")
    parser.add_argument("--folds", default="1,2,3,4,5", help="MQ2008 folds")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (each fold and the synthetic data)")
    parser.add_argument("--scenarios", default="label-scarce,privileged")
    parser.add_argument("--methods", default=",".join(METHODS), help="federated methods")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha (non-IID)")
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--label-weight", type=float, default=0.2)
    parser.add_argument("--local-epochs", type=int, default=None, help="default: the product's")
    parser.add_argument("--lr", type=float, default=None, help="default: the product's")
    parser.add_argument("--hidden", default="16")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--synthetic", default="synthetic", help="synthetic data spec")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="label-scarce: also Exp3 per-client weights vs each candidate weight fixed",
    )
    parser.add_argument("--out", default="runs/bench-evidence")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced: MQ2008 folds 1-5 and synthetic, seed 0, 5 rounds, teacher 10 epochs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.teacher_epochs = "0", 5, 10
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or "labels-only" not in args.methods:
        parser.error(f"--methods must include labels-only; valid: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    units: list[str] = []
    for name in args.data.split(","):
        if name == "mq2008":
            units += [os.fspath(MQ2008 / f"Fold{f}") for f in args.folds.split(",") if f]
        elif name == "synthetic":
            units.append(args.synthetic)
        elif name:
            parser.error(f"--data: unknown {name!r} (mq2008, synthetic)")
    from fedrank.common.config import FedrankConfig

    has_device_key = "device-features" in set(FedrankConfig.keys())
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    started = time.perf_counter()
    for data in units:
        dataset_name = "synthetic" if data.startswith("synthetic") else "MQ2008"
        for seed in seeds:
            print(f"{unit_name(data, seed)}:", flush=True)
            unit_scenarios = list(scenarios)
            if "privileged" in scenarios and dataset_name == "MQ2008" and not has_device_key:
                unit_scenarios.remove("privileged")
                note = (
                    "MQ2008 privileged-feature scenario not run: LETOR data has no privileged "
                    "columns and the configuration has no 'device-features' key to hide some "
                    "from the student"
                )
                if note not in notes:
                    notes.append(note)
            if not unit_scenarios:
                continue
            prepared = prepare_unit(args, data, seed, unit_scenarios, out)
            weights = prepared["rank_weights"]
            print(f"  rank-loss weights: {weights}", flush=True)
            dirs = run_federations(args, data, seed, unit_scenarios, weights, out)
            unit = unit_name(data, seed)
            for scenario in unit_scenarios:
                base = {"dataset": dataset_name, "scenario": scenario, "unit": unit}
                rows.append({**base, "method": "teacher", **prepared["teacher"]})
                for method, metrics in prepared["central"][scenario].items():
                    rows.append({**base, "method": method, **metrics})
                for method in [m for m in (*METHODS, *ADAPTIVE_METHODS) if (scenario, m) in dirs]:
                    metrics = read_federated(dirs[(scenario, method)])
                    if metrics is None:
                        notes.append(f"{unit} {scenario} {method}: the federation failed")
                        continue
                    rows.append({**base, "method": f"federated {method}", **metrics})
    table = summarise(rows)
    raw_keys = ["dataset", "scenario", "unit", "method", *METRICS]
    raw = (
        ",".join(raw_keys)
        + "\n"
        + "".join(",".join(str(r.get(k, "")) for k in raw_keys) + "\n" for r in rows)
    )
    atomic_write_text(out / "evidence_runs.csv", raw)
    atomic_write_text(out / "evidence.csv", to_csv(table))
    md = to_markdown(table)
    settings = (
        f"rounds {args.rounds}, {args.clients} clients, Dirichlet alpha {args.alpha} over "
        f"positive rate, label fraction {args.label_fraction} (label-scarce), seeds {args.seeds}, "
        f"teacher epochs {args.teacher_epochs}; n = units (folds x seeds); p against the "
        "federated label-only student (paired t-test / exact sign-flip test); gap closed = "
        "(student - fed labels-only) / (reference - fed labels-only) on mean NDCG@10, the "
        "reference the central all-labels student (the recoverable gap) or the teacher; goal: "
        f"gap closed (central all-labels) >= {GOAL_GAP:.0%} and log loss at most "
        f"{GOAL_LOG_LOSS:.0%} worse than fed labels-only"
    )
    text = md + "\n" + settings + "\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    atomic_write_text(out / "evidence.md", text)
    if table:
        plot(table, out / "evidence.png")
    print()
    print(text)
    print(f"{len(rows)} results in {time.perf_counter() - started:.0f}s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
