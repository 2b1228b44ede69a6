"""One federation on a Flower grid, round by round: :class:`Federation`.

:meth:`Federation.setup` validates nothing twice (the configuration is checked before) and
builds the run: data, the teacher of ``teacher-kind`` (trained, cached or imported) and its
score table, the student with the server's feature transform, the node registry, the teacher
score distributor, the strategy (inside the DP wrapper when DP is on) and, with ``resume``,
the state of the last checkpoint. :meth:`Federation.run_round` runs one round like Flower's
``Strategy.start`` (configure, send and receive, aggregate, evaluate) and returns a
:class:`RoundReport`; :meth:`Federation.record` logs it, appends it to ``metrics.jsonl`` and
checkpoints; :meth:`Federation.finish` saves the student for devices and writes
``summary.json`` and the plot.

Failing, late or malformed nodes cost themselves (a ``rejected`` entry in the round's row)
while at least ``min-replies`` replies remain; below that the run stops with one line saying
why (:class:`~fedrank.server.nodes.NotEnoughNodes`,
:class:`~fedrank.server.update_validation.NotEnoughReplies`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.common.evaluation import evaluate_scores
from fedrank.common.models import count_parameters
from fedrank.common.per_node import node_round_line, per_node_summary
from fedrank.common.records import (
    array_numpy,
    load_arrays,
    model_to_arrays,
    record_nbytes,
    restore_transform,
)
from fedrank.common.run_folder import RunFolder
from fedrank.common.student_folder import save_student
from fedrank.server.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedrank.server.client_weights import make_policy
from fedrank.server.defences import check_sample_size
from fedrank.server.evaluation import make_evaluate_fn
from fedrank.server.nodes import NodeRegistry, NotEnoughNodes, exchange
from fedrank.server.privacy import DPSettings, wrap_strategy
from fedrank.server.run_plot import plot_rounds
from fedrank.server.score_distribution import ScoreDistributor
from fedrank.server.strategy import (
    EvaluationResult,
    TrainPlan,
    TrainResult,
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from fedrank.server.student_setup import build_student
from fedrank.server.teachers import run_teacher, teacher_cache_dir, teacher_parameters
from fedrank.server.update_validation import NotEnoughReplies, Rejection, not_enough

__all__ = ["Federation", "RoundReport"]

log = logging.getLogger("fedrank")


def _resolve_path(path: str) -> str:
    if path == "synthetic" or path.startswith("synthetic:"):
        return path
    return str(Path(path).expanduser().resolve())


def _json_number(value: Any) -> Any:
    """``value``, with a non-finite float (a metric undefined on that node) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RoundReport:
    """What one round did: its plan, its aggregate, its evaluations and its timing."""

    round: int
    plan: TrainPlan
    train: TrainResult
    server: dict[str, float]  # the global model on the server's held-out sets
    evaluation: EvaluationResult | None  # federated evaluation (None: fraction-evaluate 0)
    problems: list[Rejection] = field(default_factory=list)  # before training (hello, scores)
    seconds: float = 0.0
    seconds_train: float = 0.0
    nodes_excluded: int = 0

    def row(self) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` row."""
        plan, train = self.plan, self.train
        per_client = {
            str(n): int(plan.weight_bytes.get(n, 0) + plan.score_bytes.get(n, 0))
            for n in plan.sampled
        }
        slowest = max((float(r.get("train_seconds", 0.0)) for r in train.clients), default=0.0)
        row: dict[str, Any] = {
            "round": self.round,
            **self.server,
            "bytes_to_clients": int(sum(per_client.values())),
            "bytes_weights_to_clients": int(sum(plan.weight_bytes.values())),
            "bytes_scores_to_clients": int(sum(plan.score_bytes.values())),
            "bytes_per_client": per_client,
            "bytes_from_clients": int(train.bytes_received),
            "score_deliveries": int(sum(1 for b in plan.score_bytes.values() if b)),
            "clients": len(train.clients),  # usable replies, aggregated
            "clients_sampled": len(plan.sampled),
            "seconds": self.seconds,
            "seconds_train_phase": self.seconds_train,
            "seconds_slowest_client_train": slowest,
            "seconds_server_eval": self.server.get("eval_seconds", 0.0),
            "train": {k: float(v) for k, v in train.metrics.items()},
            "clients_train": [
                {k: _json_number(v) for k, v in r.items() if isinstance(v, (int, float, str))}
                for r in train.clients
            ],
        }
        if train.budget is not None:
            row["dp_epsilon"] = float(train.budget["epsilon"])
            row["dp_delta"] = float(train.budget["delta"])
            row["dp_noise_std"] = float(train.budget.get("noise_std", 0.0))
        row["rejected"] = [r.to_dict() for r in self.problems + train.rejected]
        row["defences"] = list(train.notes)
        row["nodes_excluded"] = self.nodes_excluded
        if self.evaluation is not None:
            if self.evaluation.metrics is not None:
                row["client_eval"] = {k: float(v) for k, v in self.evaluation.metrics.items()}
                row["clients_evaluated"] = list(self.evaluation.evaluated)
            row["clients_evaluate"] = [
                {k: _json_number(v) for k, v in r.items() if isinstance(v, (int, float, str))}
                for r in self.evaluation.clients
            ]
            if self.evaluation.rejected:
                row["rejected_evaluate"] = [r.to_dict() for r in self.evaluation.rejected]
        return row


class Federation:
    """One federation of ``cfg`` on ``grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: FedrankConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    # ---- setup -----------------------------------------------------------------------------
    def setup(self) -> int:
        """Build the run (data, teacher, student, nodes, strategy, resume); returns the first
        round to run."""
        cfg = self.cfg
        self.policy = make_policy(cfg)
        self.dp = DPSettings.from_config(cfg)
        cfg.check_data_path()
        self.out = RunFolder(cfg.out_dir)
        self.out.write_config(cfg.to_dict())
        loss = cfg.composite_loss()
        self.uses_teacher = bool(loss.needs_teacher)
        log.info(
            "run: data %s, strategy %s, %d rounds, loss %s",
            cfg.data_path,
            cfg.strategy,
            cfg.num_server_rounds,
            loss,
        )
        self._setup_teacher()
        self._setup_student()
        self._setup_federation()
        first = self._resume()
        connected = self._wait("start")
        # nodes a round samples (Flower's rule: a fraction of the connected nodes, at least one)
        self.n_sampled = max(int(len(connected) * cfg.fraction_train), 1)
        options = {"num-malicious-nodes": cfg.num_malicious_nodes, "trim-beta": cfg.trim_beta}
        check_sample_size(cfg.strategy, options, self.n_sampled)
        self.strategy = wrap_strategy(self.inner, self.dp, self.n_sampled)
        if self.dp.enabled:
            released = int(self.history[-1].get("dp_rounds", 0)) if self.history else 0
            self.strategy.rounds_released = released
            log.info(
                "differential privacy: noise multiplier %g, clipping norm %g, delta %g, "
                "%d sampled clients per round",
                self.dp.noise_multiplier,
                self.dp.clipping_norm,
                self.dp.delta,
                self.n_sampled,
            )
        return first

    def _setup_teacher(self) -> None:
        cfg = self.cfg
        self.data_spec = _resolve_path(cfg.data_path)
        self.dataset = load_dataset(self.data_spec, seed=cfg.seed)
        cache_dir = teacher_cache_dir(cfg)
        t0 = time.perf_counter()
        # the teacher of `teacher-kind`; its metrics come from its scores (any kind, no model)
        self.teacher = run_teacher(cfg, self.dataset, cache_dir)
        self.teacher_seconds = time.perf_counter() - t0
        table = self.teacher.table
        log.info(
            "teacher %s %s in %.1fs (table %s, %d sets)",
            cfg.teacher_kind,
            "loaded" if getattr(self.teacher, "cached", False) else "built",
            self.teacher_seconds,
            table.version,
            table.num_sets,
        )
        splits = self.dataset.splits
        self.eval_sets = splits[cfg.eval_split]
        self.eval_teacher = table.align(self.eval_sets)
        self.teacher_metrics = evaluate_scores(self.eval_sets, self.eval_teacher)
        device_ids = np.concatenate([splits[s].set_ids for s in ("train", "vali") if s in splits])
        self.device_table = table.subset(device_ids)

    def _setup_student(self) -> None:
        # device columns (or what `device-features` picks) and the feature transform fitted on
        # the server's train + vali features, inside the student; its `transform.*` arrays are
        # the server's and are put back after every aggregation
        self.student = build_student(self.cfg, self.dataset)
        if self.student.transform is not None:
            log.info("feature transform: %s", self.student.transform.describe())
        self.arrays = model_to_arrays(self.student)
        self.server_transform = model_to_arrays(self.student)  # authoritative transform.*
        self.evaluate_fn = make_evaluate_fn(self.student, self.eval_sets, self.eval_teacher)

    def _setup_federation(self) -> None:
        cfg = self.cfg
        client_settings = {**cfg.client_dict(), "data-path": self.data_spec}
        self.nodes = NodeRegistry(
            client_settings,
            cfg.score_mode,
            timeout=cfg.round_timeout,
            student_parameters=count_parameters(self.student),
        )
        self.distributor = ScoreDistributor(
            self.device_table, cfg.score_mode, cfg.score_dtype, self.nodes, cfg.round_timeout
        )
        # no node carries more example weight than the sets the server holds for devices
        # (-1: no cap at all, for comparisons)
        max_examples = cfg.max_examples_per_node or int(self.device_table.num_sets)
        # `inner` keeps the optimiser state; `strategy` (set up once the nodes are known) is
        # `inner`, or `inner` inside the DP wrapper
        self.inner = build_strategy(
            cfg, self.policy, self.nodes, max_examples=max_examples, scores=self.distributor
        )
        self.train_config = ConfigRecord(
            {
                **client_settings,
                "model-spec": json.dumps(self.student.spec),
                "teacher-version": self.distributor.version or "none",
                # clients add val_ndcg@10_start / val_ndcg@10 (two evaluations) when the
                # policy rewards them (e.g. the adaptive weights)
                "report-validation": bool(getattr(self.policy, "wants_validation", False)),
            }
        )

    def _resume(self) -> int:
        cfg = self.cfg
        checkpoint = load_checkpoint(cfg.out_dir) if cfg.resume else None
        if checkpoint is not None:
            check_compatible(checkpoint, cfg.to_dict(), Path(cfg.out_dir))
            arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.weights.items()})
            self.arrays = restore_transform(arrays, self.server_transform)
            load_strategy_state(self.inner, checkpoint.strategy)
            self.policy.load_state(checkpoint.meta.get("policy", {}))
            self.history = list(checkpoint.meta.get("metrics", []))
            self.out.reset_metrics(self.history)
            log.info("resuming from %s after round %d", cfg.out_dir, checkpoint.round)
            return checkpoint.round + 1
        if cfg.resume:
            log.info("resume requested but %s holds no checkpoint: starting afresh", cfg.out_dir)
        self.out.reset_metrics()
        first = {k: float(v) for k, v in self.evaluate_fn(0, self.arrays).items()}
        row0 = {
            "round": 0,
            **first,
            "bytes_to_clients": 0,
            "bytes_weights_to_clients": 0,
            "bytes_scores_to_clients": 0,
            "bytes_from_clients": 0,
            "score_deliveries": 0,
            "seconds": 0.0,
        }
        self.history.append(row0)
        self.out.append_round(row0)
        log.info(
            "round 0 (start): ndcg@10 %.4f  log_loss %.4f", first["ndcg@10"], first["log_loss"]
        )
        return 1

    def _wait(self, what: str) -> list[int]:
        cfg = self.cfg
        return self.nodes.wait_for_nodes(
            self.grid, cfg.min_available_nodes, cfg.node_wait_timeout, cfg.min_replies, what
        )

    # ---- one round ---------------------------------------------------------------------------
    def run_round(self, rnd: int) -> RoundReport:
        """One round (see the module docstring); the global model moves to its aggregate."""
        cfg, grid, strategy = self.cfg, self.grid, self.strategy
        t_round = time.perf_counter()
        # a bounded wait for nodes; then nodes the server has not heard from (new, restarted
        # or failed) report their client key and sets, once per round
        problems = list(self.nodes.hello(grid, self._wait(f"round {rnd}"), rnd))
        plan = strategy.configure_round(
            rnd, self.arrays, ConfigRecord(dict(self.train_config)), grid
        )
        problems += plan.unserved
        if len(plan.messages) < cfg.min_replies:
            raise NotEnoughNodes(
                not_enough(rnd, len(plan.messages), cfg.min_replies, "train", problems)
            )
        t_train = time.perf_counter()
        replies = exchange(grid, plan.messages, cfg.round_timeout)
        try:
            train = strategy.aggregate_round(plan, replies)
        except NotEnoughReplies as err:
            if not problems:
                raise
            earlier = "; ".join(f"node {r.node_id}: {r.kind}: {r.reason}" for r in problems)
            raise NotEnoughReplies(f"{err}; before training: {earlier}") from None
        if train.arrays is None:
            log.warning("round %d: no aggregate this round; the global model is kept", rnd)
        else:
            self.arrays = restore_transform(train.arrays, self.server_transform)
        _warn_short_training(rnd, train.clients)
        seconds_train = time.perf_counter() - t_train
        evaluation = None
        if cfg.fraction_evaluate > 0:
            config = ConfigRecord(dict(self.train_config))
            sent = list(strategy.configure_evaluate(rnd, self.arrays, config, grid))
            got = exchange(grid, sent, cfg.round_timeout) if sent else []
            evaluation = strategy.aggregate_evaluation(rnd, sent, got)
        server = {k: float(v) for k, v in self.evaluate_fn(rnd, self.arrays).items()}
        return RoundReport(
            rnd,
            plan,
            train,
            server,
            evaluation,
            problems,
            seconds=time.perf_counter() - t_round,
            seconds_train=seconds_train,
            nodes_excluded=len(self.nodes.excluded()),
        )

    def record(self, report: RoundReport) -> None:
        """Log the round, append its row to ``metrics.jsonl`` and checkpoint."""
        cfg = self.cfg
        row = report.row()
        if self.dp.enabled:
            row["dp_rounds"] = int(self.strategy.rounds_released)
        self.history.append(row)
        self.out.append_round(row)
        save_checkpoint(
            cfg.out_dir,
            server_round=report.round,
            weights={k: array_numpy(v) for k, v in self.arrays.items()},
            strategy=strategy_state(self.inner),
            meta={
                "config": cfg.to_dict(),
                "metrics": self.history,
                "policy": self.policy.state(),
                "teacher_version": self.distributor.version,
            },
        )
        server = report.server
        log.info(
            "round %d/%d: ndcg@10 %.4f  map %.4f  log_loss %.4f  tau %.3f  train loss %.4f  "
            "%d/%d clients  %s bytes out (%s scores)  %.1fs%s",
            report.round,
            cfg.num_server_rounds,
            server["ndcg@10"],
            server["map"],
            server["log_loss"],
            server.get("kendall_tau", float("nan")),
            row["train"].get("loss_total", float("nan")),
            row["clients"],
            len(report.plan.sampled),
            f"{row['bytes_to_clients']:,}",
            f"{row['bytes_scores_to_clients']:,}",
            report.seconds,
            f"  dp epsilon {row['dp_epsilon']:.3g}" if "dp_epsilon" in row else "",
        )
        self._log_nodes(row)

    def _log_nodes(self, row: Mapping[str, Any]) -> None:
        """One line per node that took part in the round (``per-node-log`` off: none)."""
        if not self.cfg.per_node_log:
            return
        train = {int(r["node"]): r for r in row.get("clients_train", ())}
        evaluation = {int(r["node"]): r for r in row.get("clients_evaluate", ())}
        problems: dict[int, list[Mapping[str, Any]]] = {}
        for p in [*row.get("rejected", ()), *row.get("rejected_evaluate", ())]:
            problems.setdefault(int(p["node"]), []).append(p)
        for node in sorted(set(train) | set(evaluation) | set(problems)):
            log.info(
                "round %d: %s",
                row["round"],
                node_round_line(
                    node, train.get(node), evaluation.get(node), problems.get(node, ())
                ),
            )

    # ---- the end ------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Save the student for devices, write ``summary.json`` and the plot; the summary."""
        cfg, dataset, history = self.cfg, self.dataset, self.history
        load_arrays(self.student, self.arrays)
        final = dict(history[-1])
        student_metrics = {
            k: v
            for k, v in final.items()
            if isinstance(v, float) and not k.startswith(("seconds", "bytes"))
        }
        student_metrics.pop("eval_seconds", None)
        student_folder = save_student(
            self.student,
            Path(cfg.out_dir),
            {"round": final["round"], "metrics": student_metrics, "data": dataset.name},
        )
        table = self.teacher.table
        summary = {
            "teacher": {
                "kind": cfg.teacher_kind,
                "metrics": self.teacher_metrics,
                "parameters": teacher_parameters(self.teacher),
                "cached": bool(getattr(self.teacher, "cached", False)),
                "path": str(getattr(self.teacher, "path", "")),
                "score_table_version": table.version,
                "seconds": self.teacher_seconds,
            },
            "student": {
                "metrics": student_metrics,
                "start_metrics": {k: v for k, v in history[0].items() if isinstance(v, float)},
                "parameters": count_parameters(self.student),
                "spec": self.student.spec,
                "rounds": final["round"],
                "path": str(student_folder),
            },
            "data": {
                "name": dataset.name,
                "spec": cfg.data_path,
                "num_features": int(dataset.num_features),
                "student_columns": self.student.spec["feature_indices"],
                "splits": {
                    k: {"sets": v.num_sets, "items": v.num_items} for k, v in dataset.splits.items()
                },
                "eval_split": cfg.eval_split,
            },
            "federation": self._federation_summary(final),
            "per_node": per_node_summary(history),
            "config": cfg.to_dict(),
            "seconds": time.perf_counter() - self.start,
        }
        self.out.write_summary(summary)
        plot_rounds(
            self.out.plot_path,
            history,
            self.teacher_metrics.get("ndcg@10"),
            title=f"{dataset.name}: {cfg.strategy}",
        )
        log.info(
            "done: student ndcg@10 %.4f (start %.4f), teacher %.4f; outputs in %s",
            student_metrics.get("ndcg@10", float("nan")),
            history[0]["ndcg@10"],
            self.teacher_metrics.get("ndcg@10", float("nan")),
            cfg.out_dir,
        )
        return summary

    def _federation_summary(self, final: Mapping[str, Any]) -> dict[str, Any]:
        cfg, nodes, dp = self.cfg, self.nodes, self.dp
        return {
            "strategy": cfg.strategy,
            "score_mode": cfg.score_mode,
            "score_dtype": cfg.score_dtype,
            "uses_teacher": self.uses_teacher,
            "nodes": len(nodes.nodes) or len(list(self.grid.get_node_ids())),
            "excluded": {str(n): reason for n, reason in nodes.excluded().items()},
            "client_keys": {
                str(n): info.client_key
                for n, info in sorted(nodes.nodes.items())
                if info.client_key is not None
            },
            "score_deliveries": [d.to_dict() for d in self.distributor.deliveries],
            "bytes_to_clients": int(sum(r.get("bytes_to_clients", 0) for r in self.history)),
            "bytes_from_clients": int(sum(r.get("bytes_from_clients", 0) for r in self.history)),
            "weights_bytes": record_nbytes(self.arrays),
            "dp": (
                {
                    "noise_multiplier": dp.noise_multiplier,
                    "clipping_norm": dp.clipping_norm,
                    "delta": dp.delta,
                    "epsilon": float(final.get("dp_epsilon", 0.0)),
                    "sampled_clients": self.n_sampled,
                }
                if dp.enabled
                else None
            ),
        }


def _warn_short_training(rnd: int, replies: Sequence[Mapping[str, Any]]) -> None:
    """Log a warning when clients report that their local training was too short to move the
    model (``too_short`` from :func:`fedrank.client.trainer.train_student`)."""
    short = [r for r in replies if r.get("too_short")]
    if not short:
        return
    steps = sorted({int(r.get("steps", 0)) for r in short})
    updates = [float(r.get("relative_update", 0.0)) for r in short]
    log.warning(
        "round %d: local training was too short to move the model on %d of %d clients "
        "(steps taken %s, relative weight change %.2g..%.2g): raise 'min-local-steps' or "
        "'learning-rate', or the devices' 'max-steps' / 'max-seconds'",
        rnd,
        len(short),
        len(replies),
        steps,
        min(updates),
        max(updates),
    )
