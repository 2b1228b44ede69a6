"""``fedrank simulate``: the ServerApp and ClientApp in Flower's simulation runtime.

By default it compares, in one run of the simulation runtime, two federations on the same
simulated clients, next to the teacher:

- ``labels-only``: students trained on their labels only (teacher loss weights set to 0);
- ``distill``: students trained with rank distillation from the teacher's scores.

Each federation writes its own folder (``DIR/labels-only``, ``DIR/distill``) with
``config.json``, ``metrics.jsonl``, ``summary.json``, ``ndcg10.png`` and the student; ``DIR``
itself gets the comparison: ``config.json``, ``metrics.jsonl`` (rows tagged with ``run``),
``summary.json`` (teacher and both students) and ``ndcg10.png`` (both curves).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import FedrankConfig
from common.errors import ConfigError

__all__ = ["run_federation", "run_federations", "compare", "main", "LABELS_ONLY", "DISTILL"]

# overrides of the two compared federations
LABELS_ONLY: dict[str, Any] = {"score-weight": 0.0, "rank-weight": 0.0}
DISTILL: dict[str, Any] = {}

SIMULATION_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)


def run_federations(
    configs: Sequence[Mapping[str, Any]],
    *,
    num_clients: int,
    verbose: bool = False,
    num_cpus: int | None = None,
) -> list[dict[str, Any]]:
    """Run the federations ``configs`` (config dicts, each with its own ``out-dir``) one after
    the other in ONE start of Flower's simulation runtime with ``num_clients`` simulated
    clients; returns their summaries.

    Every config is validated first, so a bad key fails before the runtime starts.
    """
    import json

    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import make_server_app

    if num_clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {num_clients}")
    resolved = []
    for config in configs:
        cfg = FedrankConfig.from_run_config({"min-available-nodes": num_clients, **dict(config)})
        cfg.check_data_path()
        from server.client_policy import make_policy

        make_policy(cfg)
        if cfg.min_available_nodes > num_clients:
            raise ConfigError(
                f"'min-available-nodes' is {cfg.min_available_nodes} but only {num_clients} "
                "clients are simulated"
            )
        resolved.append(cfg.to_dict())
    for key, value in SIMULATION_ENV.items():
        os.environ.setdefault(key, value)
    _quiet_flower(verbose)
    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "logging_level": "info" if verbose else "error",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    run_simulation(
        server_app=make_server_app(resolved),
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
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
) -> dict[str, Any]:
    """One federation with ``config`` (keys of ``[tool.flwr.app.config]``) and
    ``num_clients`` simulated clients in Flower's simulation runtime; writes ``config.json``,
    ``metrics.jsonl``, ``summary.json`` and ``ndcg10.png`` into ``out_dir`` and returns the
    summary."""
    return run_federations(
        [{**dict(config), "out-dir": os.fspath(out_dir)}], num_clients=num_clients, verbose=verbose
    )[0]


# ---- comparison ------------------------------------------------------------------------------
TABLE_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "map", "log_loss", "kendall_tau")


def format_table(rows: Sequence[tuple[str, Mapping[str, float], int, str]]) -> str:
    """A plain-text table: model, metrics, parameters, note.

    ``true-ndcg@10`` (NDCG@10 against the true relevance behind the labels) is shown when the
    data has it (synthetic data).
    """
    metrics_shown = list(TABLE_METRICS)
    if any("true-ndcg@10" in metrics for _, metrics, _, _ in rows):
        metrics_shown.append("true-ndcg@10")
    head = ["model", *metrics_shown, "params", ""]
    lines = [head]
    for name, metrics, params, note in rows:
        cells = [name]
        for k in metrics_shown:
            v = metrics.get(k)
            cells.append("-" if v is None else f"{v:.4f}")
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


def compare(
    config: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    num_clients: int,
    verbose: bool = False,
) -> dict[str, Any]:
    """Labels-only vs rank-distillation federations (same clients, same seed, one teacher)."""
    from common.atomic_io import atomic_write_json
    from server.run_output import RunOutput, plot_ndcg, read_metrics

    out = Path(out_dir)
    base = dict(config)
    base.setdefault("teacher-cache-dir", os.fspath(out / "teacher"))
    runs = {
        "labels-only": {**base, **LABELS_ONLY, "out-dir": os.fspath(out / "labels-only")},
        "distill": {**base, **DISTILL, "out-dir": os.fspath(out / "distill")},
    }
    summaries = dict(
        zip(
            runs,
            run_federations(list(runs.values()), num_clients=num_clients, verbose=verbose),
            strict=True,
        )
    )
    teacher = summaries["distill"]["teacher"]
    rows = [
        ("teacher (server)", teacher["metrics"], teacher["parameters"], "full features"),
    ]
    for name, summary in summaries.items():
        s = summary["student"]
        rows.append((f"student: {name}", s["metrics"], s["parameters"], f"{s['rounds']} rounds"))
    table = format_table(rows)

    report = RunOutput(out)
    report.write_config({name: summary["config"] for name, summary in summaries.items()})
    all_rows = []
    series = {}
    for name in runs:
        metrics = read_metrics(out / name / "metrics.jsonl")
        series[f"student: {name}"] = [(r["round"], r["ndcg@10"]) for r in metrics]
        all_rows += [{"run": name, **r} for r in metrics]
    report.reset_metrics(all_rows)
    first = summaries["distill"]
    summary = {
        "teacher": teacher,
        "students": {name: s["student"] for name, s in summaries.items()},
        "federation": {name: s["federation"] for name, s in summaries.items()},
        "data": first["data"],
        "config": {name: s["config"] for name, s in summaries.items()},
        "clients": num_clients,
        "table": table,
    }
    report.write_summary(summary)
    plot_ndcg(
        series,
        out / "ndcg10.png",
        title=f"{first['data']['name']}: {num_clients} clients",
        references={"teacher": teacher["metrics"]["ndcg@10"]},
    )
    atomic_write_json(
        out / "comparison.json",
        {
            "table": table,
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
        "teacher, in Flower's simulation runtime.",
    )
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a LETOR fold folder")
    parser.add_argument("--clients", type=int, default=5, help="simulated clients (default 5)")
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
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    args = parser.parse_args(list(argv) if argv is not None else None)
    config = {"data-path": args.data, **_parse_set(args.set)}
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    if args.only == "compare":
        summary = compare(config, args.out, num_clients=args.clients, verbose=args.verbose)
        print()
        print(summary["table"])
    else:
        overrides = LABELS_ONLY if args.only == "labels-only" else DISTILL
        summary = run_federation(
            {**config, **overrides}, args.out, num_clients=args.clients, verbose=args.verbose
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
