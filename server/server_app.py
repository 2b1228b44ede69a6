"""fedrank ServerApp: teacher on the server, teacher scores to the clients, global student.

One run (:func:`run_server`):

1. validate the configuration (``[tool.flwr.app.config]`` + overrides): a bad key or value
   fails here, before any round;
2. load the data, train the teacher or load it from the cache, score every set;
3. each round: wait (bounded) for nodes; say hello to the nodes the server has not heard from
   (:mod:`server.nodes`); sample nodes; send teacher scores to nodes that lack the current
   version (:mod:`server.score_distribution`); send each node the global student and its own
   ``ConfigRecord``; screen, defend and aggregate the replies (:mod:`server.strategy`);
   federated evaluation on the nodes' held-out sets; server-side evaluation on held-out sets
   through ``evaluate_fn``; log the round, write ``metrics.jsonl`` and an atomic checkpoint.
   A failing, late or malformed reply costs its node (a ``rejected`` entry in the round's row)
   while at least ``min-replies`` remain; below that the run stops with one line saying why;
4. save the student for devices and write ``summary.json`` and the plot.

``resume = true`` continues from the checkpoint in ``out-dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.atomic_io import atomic_path, atomic_write_json
from common.config import CLIENT_KEYS, FedrankConfig
from common.errors import FedrankError
from common.models import count_parameters
from common.records import model_to_arrays, record_nbytes, restore_transform
from server.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from server.client_policy import make_policy
from server.defences import check_sample_size
from server.evaluation import make_evaluate_fn
from server.nodes import NodeRegistry, NotEnoughNodes, exchange
from server.privacy import DPSettings, wrap_strategy
from server.run_output import RunOutput
from server.score_distribution import ScoreDistributor
from server.strategy import build_strategy, load_strategy_state, strategy_state
from server.student_setup import build_student
from server.teacher_scoring import evaluate_scores
from server.teachers import run_teacher, teacher_cache_dir, teacher_parameters
from server.update_validation import NotEnoughReplies, Rejection, not_enough

__all__ = ["app", "make_server_app", "run_server", "STUDENT_DIR"]

log = logging.getLogger("fedrank")
if not log.handlers:  # progress lines of the ServerApp, also under `flwr run`
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s fedrank: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
STUDENT_DIR = "student"  # <out-dir>/student/{student.pt, student.json}


def _resolve_path(path: str) -> str:
    if path == "synthetic" or path.startswith("synthetic:"):
        return path
    return str(Path(path).expanduser().resolve())


def _log(text: str, *args: Any) -> None:
    log.info(text, *args)


_NEEDS_TEACHER: dict[tuple, bool] = {}


def _needs_teacher(config: ConfigRecord) -> bool:
    """Whether a node's training settings use the teacher's scores (cached per loss setup)."""
    settings = {k: config[k] for k in sorted(CLIENT_KEYS) if k in config}
    key = tuple(settings.items())
    if key not in _NEEDS_TEACHER:
        cfg = FedrankConfig.from_run_config(settings)
        _NEEDS_TEACHER[key] = bool(cfg.composite_loss().needs_teacher)
    return _NEEDS_TEACHER[key]


def _warn_short_training(rnd: int, replies: Sequence[Mapping[str, Any]]) -> None:
    """Log a warning when clients report that their local training was too short to move the
    model (``too-short`` from :func:`client.trainer.train_student`)."""
    short = [r for r in replies if r.get("too-short")]
    if not short:
        return
    steps = sorted({int(r.get("steps", 0)) for r in short})
    updates = [float(r.get("relative-update", 0.0)) for r in short]
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


def _json_number(value: Any) -> Any:
    """``value``, with a non-finite float (a metric undefined on that node) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _save_student(model: torch.nn.Module, out_dir: Path, info: dict[str, Any]) -> Path:
    """The global student for devices: ``student.pt`` (state dict, loads with
    ``weights_only=True``) and ``student.json`` (spec to rebuild it, metrics, feature names)."""
    folder = out_dir / STUDENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "student.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    atomic_write_json(folder / "student.json", {"spec": model.spec, **info})
    return folder


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run one federation on ``grid`` with ``run_config``; returns the summary."""
    from common.datasets import load_dataset

    t_run = time.perf_counter()
    cfg = FedrankConfig.from_run_config(dict(run_config))
    policy = make_policy(cfg)
    dp = DPSettings.from_config(cfg.to_dict())
    cfg.check_data_path()
    out = RunOutput(cfg.out_dir)
    out.write_config(cfg.to_dict())
    loss = cfg.composite_loss()
    uses_teacher = bool(loss.needs_teacher)
    _log(
        "run: data %s, strategy %s, %d rounds, loss %s",
        cfg.data_path,
        cfg.strategy,
        cfg.num_server_rounds,
        loss,
    )

    # ---- data and teacher ------------------------------------------------------------------
    data_spec = _resolve_path(cfg.data_path)
    dataset = load_dataset(data_spec, seed=cfg.seed)
    splits = dataset.splits
    cache_dir = teacher_cache_dir(cfg)
    t0 = time.perf_counter()
    # the teacher of `teacher-kind`; its metrics come from its scores (any kind, no model)
    bundle = run_teacher(cfg, dataset, cache_dir)
    table = bundle.table
    teacher_seconds = time.perf_counter() - t0
    _log(
        "teacher %s %s in %.1fs (table %s, %d sets)",
        cfg.teacher_kind,
        "loaded" if getattr(bundle, "cached", False) else "built",
        teacher_seconds,
        table.version,
        table.num_sets,
    )
    eval_sets = splits[cfg.eval_split]
    eval_teacher = table.align(eval_sets)
    teacher_metrics = evaluate_scores(eval_sets, eval_teacher)
    device_ids = np.concatenate([splits[s].set_ids for s in ("train", "vali") if s in splits])
    device_table = table.subset(device_ids)

    # ---- student -------------------------------------------------------------------------
    # device columns (or what `device-features` picks; ConfigError naming it) and the feature
    # transform fitted on the server's train + vali features, inside the student; its
    # `transform.*` arrays are the server's and are put back after every aggregation
    student = build_student(cfg, dataset)
    columns = student.spec["feature_indices"]
    if student.transform is not None:
        _log("feature transform: %s", student.transform.describe())
    arrays = model_to_arrays(student)
    server_transform = model_to_arrays(student)  # the authoritative transform.* values
    evaluate_fn = make_evaluate_fn(student, eval_sets, eval_teacher)

    # ---- federation pieces -----------------------------------------------------------------
    client_settings = {**cfg.client_dict(), "data-path": data_spec}
    nodes = NodeRegistry(
        client_settings,
        cfg.score_mode,
        timeout=cfg.round_timeout,
        student_parameters=count_parameters(student),
    )
    distributor = ScoreDistributor(
        device_table, cfg.score_mode, cfg.score_dtype, nodes, timeout=cfg.round_timeout
    )
    # `inner` keeps the bookkeeping and the optimiser state; `strategy` is what runs the
    # rounds: `inner`, or `inner` inside the DP wrapper (set up once the nodes are known).
    # No node carries more example weight than the sets the server holds for devices
    # (-1: no cap at all, for comparisons).
    max_examples = cfg.max_examples_per_node or int(device_table.num_sets)
    inner = build_strategy(cfg, policy, nodes, max_examples=max_examples)
    train_config = ConfigRecord(
        {
            **client_settings,
            "model-spec": json.dumps(student.spec),
            "teacher-version": distributor.version or "none",
            # clients add val-ndcg@10-start / val-ndcg@10 (two evaluations) when the policy
            # rewards them (e.g. the adaptive weights)
            "report-validation": bool(getattr(policy, "wants_validation", False)),
        }
    )

    # ---- resume --------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    start_round = 1
    checkpoint = load_checkpoint(cfg.out_dir) if cfg.resume else None
    if checkpoint is not None:
        check_compatible(checkpoint, cfg.to_dict(), Path(cfg.out_dir))
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.weights.items()})
        arrays = restore_transform(arrays, server_transform)
        load_strategy_state(inner, checkpoint.strategy)
        policy.load_state(checkpoint.meta.get("policy", {}))
        history = list(checkpoint.meta.get("metrics", []))
        start_round = checkpoint.round + 1
        out.reset_metrics(history)
        _log("resuming from %s after round %d", cfg.out_dir, checkpoint.round)
    else:
        if cfg.resume:
            _log("resume requested but %s holds no checkpoint: starting afresh", cfg.out_dir)
        out.reset_metrics()
        first = {k: float(v) for k, v in evaluate_fn(0, arrays).items()}
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
        history.append(row0)
        out.append_round(row0)
        _log("round 0 (start): ndcg@10 %.4f  log_loss %.4f", first["ndcg@10"], first["log_loss"])

    def wait(what: str) -> list[int]:
        return nodes.wait_for_nodes(
            grid, cfg.min_available_nodes, cfg.node_wait_timeout, cfg.min_replies, what
        )

    connected = wait("start")
    # nodes a round samples (Flower's rule: a fraction of the connected nodes, at least one)
    n_sampled = max(int(len(connected) * cfg.fraction_train), 1)
    check_sample_size(
        cfg.strategy,
        {"num-malicious-nodes": cfg.num_malicious_nodes, "trim-beta": cfg.trim_beta},
        n_sampled,
    )
    strategy = wrap_strategy(inner, dp, n_sampled)
    if dp.enabled:
        strategy.rounds_released = int(history[-1].get("dp_rounds", 0)) if history else 0
        _log(
            "differential privacy: noise multiplier %g, clipping norm %g, delta %g, "
            "%d sampled clients per round",
            dp.noise_multiplier,
            dp.clipping_norm,
            dp.delta,
            n_sampled,
        )

    # ---- rounds --------------------------------------------------------------------------
    for rnd in range(start_round, cfg.num_server_rounds + 1):
        t_round = time.perf_counter()
        # a bounded wait for nodes; then nodes the server has not heard from (new, restarted
        # or failed) report their client key and sets, once per round
        problems: list[Rejection] = list(nodes.hello(grid, wait(f"round {rnd}"), rnd))
        messages = list(
            strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid)
        )
        nodes_sampled = [m.metadata.dst_node_id for m in messages]
        # teacher scores for the nodes whose settings (run config + policy) use them
        need = [m.metadata.dst_node_id for m in messages if _needs_teacher(m.content["config"])]
        score_bytes, unserved = distributor.ensure(grid, rnd, need) if need else ({}, [])
        if unserved:  # nodes that could not get the scores do not train this round
            left_out = {r.node_id for r in unserved}
            messages = [m for m in messages if m.metadata.dst_node_id not in left_out]
            inner.last_messages = messages
            problems += unserved
        if len(messages) < cfg.min_replies:
            raise NotEnoughNodes(not_enough(rnd, len(messages), cfg.min_replies, "train", problems))

        t_train = time.perf_counter()
        replies = exchange(grid, messages, cfg.round_timeout)
        try:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        except NotEnoughReplies as err:
            if not problems:
                raise
            earlier = "; ".join(f"node {r.node_id}: {r.kind}: {r.reason}" for r in problems)
            raise NotEnoughReplies(f"{err}; before training: {earlier}") from None
        if new_arrays is None:
            log.warning("round %d: no aggregate this round; the global model is kept", rnd)
        else:
            arrays = restore_transform(new_arrays, server_transform)
        _warn_short_training(rnd, inner.last_train)
        train_seconds = time.perf_counter() - t_train
        eval_metrics = None
        if cfg.fraction_evaluate > 0:
            eval_messages = list(
                strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(train_config)), grid)
            )
            eval_replies = exchange(grid, eval_messages, cfg.round_timeout) if eval_messages else []
            eval_metrics = strategy.aggregate_evaluate(rnd, eval_replies)
        server = {k: float(v) for k, v in evaluate_fn(rnd, arrays).items()}
        seconds = time.perf_counter() - t_round
        per_client = {
            str(n): int(inner.last_sent.get(n, 0) + score_bytes.get(n, 0)) for n in nodes_sampled
        }
        slowest = max((float(r.get("train-seconds", 0.0)) for r in inner.last_train), default=0.0)
        row = {
            "round": rnd,
            **server,
            "bytes_to_clients": int(sum(per_client.values())),
            "bytes_weights_to_clients": int(sum(inner.last_sent.values())),
            "bytes_scores_to_clients": int(sum(score_bytes.values())),
            "bytes_per_client": per_client,
            "bytes_from_clients": int(inner.last_received),
            "score_deliveries": int(sum(1 for b in score_bytes.values() if b)),
            "clients": len(inner.last_train),  # usable replies, aggregated
            "clients_sampled": len(nodes_sampled),
            "seconds": seconds,
            "seconds_train_phase": train_seconds,
            "seconds_slowest_client_train": slowest,
            "seconds_server_eval": server.get("eval-seconds", 0.0),
            "train": {k: float(v) for k, v in (train_metrics or {}).items()},
            "clients_train": [
                {k: _json_number(v) for k, v in r.items() if isinstance(v, (int, float, str))}
                for r in inner.last_train
            ],
        }
        if dp.enabled:
            budget = strategy.budget
            row["dp_epsilon"] = float(budget["epsilon"])
            row["dp_delta"] = float(budget["delta"])
            row["dp_noise_std"] = float(budget.get("noise_std", 0.0))
            row["dp_rounds"] = int(strategy.rounds_released)
        row["rejected"] = [r.to_dict() for r in problems] + list(inner.last_rejected)
        row["defences"] = list(inner.last_notes)
        row["nodes_excluded"] = len(nodes.excluded())
        if eval_metrics is not None:
            row["client_eval"] = {k: float(v) for k, v in eval_metrics.items()}
            row["clients_evaluated"] = list(inner.last_evaluated)
        if cfg.fraction_evaluate > 0 and inner.last_evaluate_rejected:
            row["rejected_evaluate"] = inner.last_evaluate_rejected
        history.append(row)
        out.append_round(row)
        save_checkpoint(
            cfg.out_dir,
            server_round=rnd,
            weights={k: v.numpy() for k, v in arrays.items()},
            strategy=strategy_state(inner),
            meta={
                "config": cfg.to_dict(),
                "metrics": history,
                "policy": policy.state(),
                "teacher_version": distributor.version,
            },
        )
        _log(
            "round %d/%d: ndcg@10 %.4f  map %.4f  log_loss %.4f  tau %.3f  train loss %.4f  "
            "%d/%d clients  %s bytes out (%s scores)  %.1fs%s",
            rnd,
            cfg.num_server_rounds,
            server["ndcg@10"],
            server["map"],
            server["log_loss"],
            server.get("kendall_tau", float("nan")),
            row["train"].get("loss-total", float("nan")),
            row["clients"],
            len(nodes_sampled),
            f"{row['bytes_to_clients']:,}",
            f"{row['bytes_scores_to_clients']:,}",
            seconds,
            f"  dp epsilon {row['dp_epsilon']:.3g}" if dp.enabled else "",
        )

    # ---- outputs -------------------------------------------------------------------------
    from common.records import load_arrays

    load_arrays(student, arrays)
    final = dict(history[-1])
    student_metrics = {
        k: v
        for k, v in final.items()
        if isinstance(v, float) and not k.startswith(("seconds", "bytes"))
    }
    student_metrics.pop("eval-seconds", None)
    student_folder = _save_student(
        student,
        Path(cfg.out_dir),
        {"round": final["round"], "metrics": student_metrics, "data": dataset.name},
    )
    summary = {
        "teacher": {
            "kind": cfg.teacher_kind,
            "metrics": teacher_metrics,
            "parameters": teacher_parameters(bundle),
            "cached": bool(getattr(bundle, "cached", False)),
            "path": str(getattr(bundle, "path", "")),
            "score_table_version": table.version,
            "seconds": teacher_seconds,
        },
        "student": {
            "metrics": student_metrics,
            "start_metrics": {k: v for k, v in history[0].items() if isinstance(v, float)},
            "parameters": count_parameters(student),
            "spec": student.spec,
            "rounds": final["round"],
            "path": str(student_folder),
        },
        "data": {
            "name": dataset.name,
            "spec": cfg.data_path,
            "num_features": int(dataset.num_features),
            "student_columns": columns,
            "splits": {k: {"sets": v.num_sets, "items": v.num_items} for k, v in splits.items()},
            "eval_split": cfg.eval_split,
        },
        "federation": {
            "strategy": cfg.strategy,
            "score_mode": cfg.score_mode,
            "score_dtype": cfg.score_dtype,
            "uses_teacher": uses_teacher,
            "nodes": len(nodes.nodes) or len(list(grid.get_node_ids())),
            "excluded": {str(n): reason for n, reason in nodes.excluded().items()},
            "client_keys": {
                str(n): info.client_key
                for n, info in sorted(nodes.nodes.items())
                if info.client_key is not None
            },
            "score_deliveries": [d.to_dict() for d in distributor.deliveries],
            "bytes_to_clients": int(sum(r.get("bytes_to_clients", 0) for r in history)),
            "bytes_from_clients": int(sum(r.get("bytes_from_clients", 0) for r in history)),
            "weights_bytes": record_nbytes(arrays),
            "dp": (
                {
                    "noise_multiplier": dp.noise_multiplier,
                    "clipping_norm": dp.clipping_norm,
                    "delta": dp.delta,
                    "epsilon": float(final.get("dp_epsilon", 0.0)),
                    "sampled_clients": n_sampled,
                }
                if dp.enabled
                else None
            ),
        },
        "config": cfg.to_dict(),
        "seconds": time.perf_counter() - t_run,
    }
    out.write_summary(summary)
    out.plot(history, teacher_metrics.get("ndcg@10"), title=f"{dataset.name}: {cfg.strategy}")
    _log(
        "done: student ndcg@10 %.4f (start %.4f), teacher %.4f; outputs in %s",
        student_metrics.get("ndcg@10", float("nan")),
        history[0]["ndcg@10"],
        teacher_metrics.get("ndcg@10", float("nan")),
        os.fspath(cfg.out_dir),
    )
    return summary


def make_server_app(runs: Sequence[Mapping[str, Any]] | None = None) -> ServerApp:
    """A ServerApp that runs one federation per entry of ``runs`` (each a dict of config
    overrides on top of the run config), one after the other on the same nodes; ``None``: one
    federation with the run config as is (what ``flwr run`` uses)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        base = dict(context.run_config)
        for overrides in runs or [{}]:
            try:
                run_server(grid, {**base, **dict(overrides)})
            except FedrankError as err:  # one clear line first; Flower marks the run failed
                log.error("run stopped: %s", err)
                raise

    return server_app


app = make_server_app()
