"""``fedrank simulate``: the ServerApp and ClientApp in Flower's simulation runtime.

By default it compares, in one run of the simulation runtime, two federations on the same
simulated clients, next to the teacher:

- ``labels-only``: students trained on their labels only (teacher loss weights set to 0);
- ``distill``: students trained with rank distillation from the teacher's scores;

and next to the reference "central student, all labels": the same student (architecture,
device features, feature transform) trained on one machine on every client's labels
(:mod:`fedrank.simulations.central`). The table's "gap closed" is
``(distill - labels-only) / (central all labels - labels-only)`` on NDCG@10: the share of what
pooling every label would have added that distillation recovers without sharing a label.

``fedrank simulate`` runs the device setting the product is for (:data:`DEVICE_SCENARIO`):
many small clients (20, on :data:`DEVICE_DATA`: about 37 training sets each), non-IID
(Dirichlet 0.3 over the sets' positive rate), 10% of each client's sets labelled, the student
on device features; ``--set label-fraction=1.0`` gives every set its labels.

Each federation writes its own folder (``DIR/labels-only``, ``DIR/distill``) with
``config.json``, ``metrics.jsonl``, ``summary.json``, ``ndcg10.png`` and the student; ``DIR``
itself gets the comparison: ``config.json``, ``metrics.jsonl`` (rows tagged with ``run``),
``summary.json`` (teacher, reference and both students), ``comparison.json`` (the table) and
``ndcg10.png`` (NDCG@10 and log loss per round, teacher and reference as lines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrank.client.client_app import app as client_app
from fedrank.common.atomic_io import atomic_write_json
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError
from fedrank.common.run_folder import RunFolder, read_metrics
from fedrank.server.client_weights import make_policy
from fedrank.server.server_app import make_server_app
from fedrank.server.teacher import TeacherConfig, train_or_load_teacher
from fedrank.server.teachers import teacher_cache_dir
from fedrank.simulations.central import train_central_student
from fedrank.simulations.report import plot_comparison
from fedrank.simulations.runtime import RayOptions, add_ray_arguments, ray_options, start_simulation

__all__ = [
    "run_federation",
    "run_federations",
    "compare",
    "main",
    "gap_closed",
    "DEVICE_SCENARIO",
    "LABELS_ONLY",
    "DISTILL",
]

# overrides of the two compared federations
LABELS_ONLY: dict[str, Any] = {"score-weight": 0.0, "rank-weight": 0.0}
DISTILL: dict[str, Any] = {}
# what `fedrank simulate` runs unless told otherwise: the device setting (with the default
# --clients 20): non-IID clients, most sets without labels
DEVICE_SCENARIO: dict[str, Any] = {
    "partition-scheme": "dirichlet",
    "partition-alpha": 0.3,
    "label-fraction": 0.1,
}
DEFAULT_CLIENTS = 20
# the synthetic world of the device setting: 1,000 sets (750 for training), so each of the 20
# clients holds about 37 training sets of which about 4 carry labels
DEVICE_DATA = "synthetic:num_sets=1000"
REFERENCE = "central student, all labels"


def run_federations(
    configs: Sequence[Mapping[str, Any]],
    *,
    num_clients: int,
    verbose: bool = False,
    num_cpus: int | None = None,
    ray: RayOptions | None = None,
) -> list[dict[str, Any]]:
    """Run the federations ``configs`` (config dicts, each with its own ``out-dir``) one after
    the other in ONE start of Flower's simulation runtime with ``num_clients`` simulated
    clients (on a Ray started here with ``num_cpus`` CPUs, or where ``ray`` says); returns
    their summaries.

    Every config is validated first, so a bad key fails before the runtime starts.
    """
    if num_clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {num_clients}")
    resolved = []
    for config in configs:
        cfg = FedrankConfig.from_run_config({"min-available-nodes": num_clients, **dict(config)})
        cfg.check_data_path()

        make_policy(cfg)
        if cfg.min_available_nodes > num_clients:
            raise ConfigError(
                f"'min-available-nodes' is {cfg.min_available_nodes} but only {num_clients} "
                "clients are simulated"
            )
        resolved.append(cfg.to_dict())
    if ray is None:
        ray = RayOptions(num_cpus=num_cpus)
    start_simulation(make_server_app(resolved), client_app, num_clients, ray=ray, verbose=verbose)
    summaries = []
    for config in resolved:
        path = Path(config["out-dir"]) / "summary.json"
        with open(path, encoding="utf-8") as fh:
            summaries.append(json.load(fh))
    return summaries


def run_federation(
    config: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    num_clients: int,
    verbose: bool = False,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """One federation with ``config`` (keys of ``[tool.flwr.app.config]``) and
    ``num_clients`` simulated clients in Flower's simulation runtime; writes ``config.json``,
    ``metrics.jsonl``, ``summary.json`` and ``ndcg10.png`` into ``out_dir`` and returns the
    summary."""
    return run_federations(
        [{**dict(config), "out-dir": os.fspath(out_dir)}],
        num_clients=num_clients,
        verbose=verbose,
        ray=ray,
    )[0]


# ---- comparison ------------------------------------------------------------------------------
TABLE_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "map", "log_loss", "kendall_tau")


def gap_closed(student: float, labels_only: float, reference: float) -> float:
    """``(student - labels_only) / (reference - labels_only)``; NaN when the reference is not
    ahead of the labels-only student (nothing to close)."""
    gap = reference - labels_only
    return (student - labels_only) / gap if gap > 0 else math.nan


def format_table(rows: Sequence[tuple[str, Mapping[str, float], int, str]]) -> str:
    """A plain-text table: model, metrics, parameters, note.

    ``true_ndcg@10`` (NDCG@10 against the true relevance behind the labels) is shown when the
    data has it (synthetic data), ``gap closed`` when a row has ``gap_closed``.
    """
    metrics_shown = list(TABLE_METRICS)
    if any("true_ndcg@10" in metrics for _, metrics, _, _ in rows):
        metrics_shown.append("true_ndcg@10")
    gaps = any("gap_closed" in metrics for _, metrics, _, _ in rows)
    head = ["model", *metrics_shown, *(["gap closed"] if gaps else []), "params", ""]
    lines = [head]
    for name, metrics, params, note in rows:
        cells = [name]
        for k in metrics_shown:
            v = metrics.get(k)
            cells.append("-" if v is None else f"{v:.4f}")
        if gaps:
            v = metrics.get("gap_closed")
            cells.append("-" if v is None or math.isnan(v) else f"{v:.0%}")
        cells += [f"{params:,}", note]
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = []
    for j, r in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
            ).rstrip()
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def central_reference(config: Mapping[str, Any]) -> dict[str, Any]:
    """The "central student, all labels" reference of a comparison with ``config``: the same
    student trained centrally on every training set's labels (labels-only loss), evaluated on
    the run's evaluation split with the teacher's scores (from the run's teacher cache)."""

    cfg = FedrankConfig.from_run_config(
        {**dict(config), **LABELS_ONLY, "label-fraction": 1.0, "out-dir": "unused"}
    )
    dataset = load_dataset(cfg.data_path, seed=cfg.seed)
    _, table = train_or_load_teacher(
        dataset, TeacherConfig.from_config(cfg), teacher_cache_dir(cfg)
    )
    scores = {"eval": table.align(dataset.splits[cfg.eval_split])}
    result = train_central_student(
        cfg.to_dict(), labels="all", teacher_scores=scores, dataset=dataset
    )
    return {
        "metrics": result.metrics,
        "parameters": result.parameters,
        "epochs": result.epochs,
        "label_sets": result.label_sets,
    }


def compare(
    config: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    num_clients: int,
    verbose: bool = False,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Labels-only vs rank-distillation federations (same clients, same seed, one teacher),
    next to the teacher and the central all-labels reference."""

    out = Path(out_dir)
    base = dict(config)
    runs = {
        "labels-only": {**base, **LABELS_ONLY, "out-dir": os.fspath(out / "labels-only")},
        "distill": {**base, **DISTILL, "out-dir": os.fspath(out / "distill")},
    }
    summaries = dict(
        zip(
            runs,
            run_federations(list(runs.values()), num_clients=num_clients, verbose=verbose, ray=ray),
            strict=True,
        )
    )
    reference = central_reference({**base, "out-dir": os.fspath(out)})
    teacher = summaries["distill"]["teacher"]
    labels_only = summaries["labels-only"]["student"]["metrics"]
    distill = dict(summaries["distill"]["student"]["metrics"])
    gap = gap_closed(distill["ndcg@10"], labels_only["ndcg@10"], reference["metrics"]["ndcg@10"])
    distill["gap_closed"] = gap
    log_loss_change = distill["log_loss"] / labels_only["log_loss"] - 1.0
    rounds = summaries["distill"]["student"]["rounds"]
    rows = [
        ("teacher (server)", teacher["metrics"], teacher["parameters"], "full features"),
        (
            REFERENCE,
            reference["metrics"],
            reference["parameters"],
            f"{reference['epochs']} epochs, every set labelled",
        ),
        (
            "student: labels-only",
            labels_only,
            summaries["labels-only"]["student"]["parameters"],
            f"{rounds} rounds",
        ),
        (
            "student: distill",
            distill,
            summaries["distill"]["student"]["parameters"],
            f"{rounds} rounds",
        ),
    ]
    table = format_table(rows)

    report = RunFolder(out)
    report.write_config({name: summary["config"] for name, summary in summaries.items()})
    all_rows = []
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in runs:
        metrics = read_metrics(out / name / "metrics.jsonl")
        series[f"federated: {name}"] = {
            k: [(r["round"], r[k]) for r in metrics if k in r] for k in ("ndcg@10", "log_loss")
        }
        all_rows += [{"run": name, **r} for r in metrics]
    report.reset_metrics(all_rows)
    first = summaries["distill"]
    cfg = summaries["distill"]["config"]
    scenario = (
        f"{num_clients} clients, {cfg.get('partition-scheme')}"
        + (f" {cfg.get('partition-alpha')}" if cfg.get("partition-scheme") == "dirichlet" else "")
        + f", {float(cfg.get('label-fraction', 1.0)):.0%} of sets labelled"
    )
    summary = {
        "teacher": teacher,
        "reference": reference,
        "students": {name: s["student"] for name, s in summaries.items()},
        "federation": {name: s["federation"] for name, s in summaries.items()},
        "data": first["data"],
        "config": {name: s["config"] for name, s in summaries.items()},
        "clients": num_clients,
        "scenario": scenario,
        "gap_closed": gap,
        "log_loss_change": log_loss_change,
        "table": table,
    }
    report.write_summary(summary)
    plot_comparison(
        series,
        out / "ndcg10.png",
        title=f"{first['data']['name']}: {scenario}",
        references={
            "teacher (server, all features)": teacher["metrics"],
            REFERENCE: reference["metrics"],
        },
    )
    atomic_write_json(
        out / "comparison.json",
        {
            "table": table,
            "scenario": scenario,
            "gap_closed": gap,
            "log_loss_change": log_loss_change,
            "rows": [
                {"model": n, "parameters": p, **{k: m.get(k) for k in TABLE_METRICS}}
                for n, m, p, _ in rows
            ],
        },
    )
    return summary


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parsed as TOML scalars (true, 3, 0.5, "text"), else text."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, as a package (a dependency of flwr)
        import tomli as tomllib

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrank simulate",
        description="Federated students (labels only vs rank distillation) next to the "
        "teacher and a central all-labels student, in Flower's simulation runtime. Default "
        "scenario: 20 non-IID clients (Dirichlet 0.3), 10%% of the sets labelled "
        "(--set label-fraction=1.0 labels every set).",
    )
    parser.add_argument(
        "--data",
        default=DEVICE_DATA,
        help=f"'synthetic[:key=value,...]' or a LETOR fold folder (default {DEVICE_DATA})",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=DEFAULT_CLIENTS,
        help=f"simulated clients (default {DEFAULT_CLIENTS})",
    )
    parser.add_argument("--rounds", type=int, default=None, help="server rounds (default 5)")
    parser.add_argument("--out", default="runs/simulate", help="output folder")
    parser.add_argument(
        "--only",
        choices=("compare", "distill", "labels-only"),
        default="compare",
        help="run both federations (default) or one",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='any [tool.flwr.app.config] key, e.g. --set score-mode="broadcast"',
    )
    add_ray_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    args = parser.parse_args(list(argv) if argv is not None else None)
    ray = ray_options(args)
    # the console shows one line per round; each client's results are in the run folders
    # (metrics.jsonl, summary.json, `fedrank report`); `--set per-node-log=true` logs them too
    config = {
        **DEVICE_SCENARIO,
        "per-node-log": False,
        "data-path": args.data,
        **_parse_set(args.set),
    }
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    if args.only == "compare":
        summary = compare(config, args.out, num_clients=args.clients, verbose=args.verbose, ray=ray)
        print(f"\n{summary['data']['name']}: {summary['scenario']}")
        print(summary["table"])
        print(
            f"gap closed = (distill - labels-only) / ({REFERENCE} - labels-only) on NDCG@10: "
            + ("-" if math.isnan(summary["gap_closed"]) else f"{summary['gap_closed']:.0%}")
            + f"; log loss of distill vs labels-only: {summary['log_loss_change']:+.1%}"
        )
    else:
        overrides = LABELS_ONLY if args.only == "labels-only" else DISTILL
        summary = run_federation(
            {**config, **overrides},
            args.out,
            num_clients=args.clients,
            verbose=args.verbose,
            ray=ray,
        )
        rows = [
            (
                "teacher (server)",
                summary["teacher"]["metrics"],
                summary["teacher"]["parameters"],
                "",
            ),
            (
                f"student: {args.only}",
                summary["student"]["metrics"],
                summary["student"]["parameters"],
                "",
            ),
        ]
        print()
        print(format_table(rows))
    print(f"\noutputs: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
