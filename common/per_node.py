"""Per-device results of a run: one summary per node, from the rows of ``metrics.jsonl``.

Each round's row carries its per-node entries: ``clients_train`` (every usable training reply:
node, metrics, weight, update norm, clipped), ``clients_evaluate`` (every usable federated
evaluation reply: node and its metrics on that node's own held-out sets), ``rejected`` /
``rejected_evaluate`` (node, stage, kind, reason) and ``bytes_per_client`` (bytes sent to
each sampled node). :func:`per_node_summary` folds them into one entry per node, written into
``summary.json`` by the server and shown as the per-device table of ``fedrank report``;
:func:`node_round_line` is the node's line in the server log of a round.

    >>> rows = [
    ...     {"round": 1, "bytes_per_client": {"7": 100},
    ...      "clients_train": [{"node": 7, "loss_total": 2.0, "steps": 20, "num_examples": 12,
    ...                         "train_seconds": 0.5, "update_norm": 1.5, "clipped": 0}],
    ...      "clients_evaluate": [{"node": 7, "ndcg@10": 0.4, "num_examples": 3}]},
    ...     {"round": 2, "bytes_per_client": {"7": 80},
    ...      "rejected": [{"node": 7, "message_type": "train", "kind": "invalid",
    ...                    "reason": "metric 'loss_total' is NaN"}]},
    ... ]
    >>> s = per_node_summary(rows)["7"]
    >>> s["rounds_sampled"], s["rounds_trained"], s["rounds_rejected"], s["eval"]["ndcg@10"]
    (2, 1, 1, 0.4)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["PER_NODE_COLUMNS", "per_node_rows", "per_node_summary", "node_round_line"]

# training metrics a node summary keeps from the node's last usable training reply
_TRAIN_KEYS = ("loss_total", "steps", "num_examples", "train_seconds", "update_norm")
# evaluation metrics kept from the node's last usable evaluation reply
_EVAL_KEYS = ("ndcg@10", "map", "log_loss", "kendall_tau", "num_examples")

# the per-device table's columns (``fedrank report``), in order
PER_NODE_COLUMNS = (
    "node",
    "rounds_sampled",
    "rounds_trained",
    "rounds_rejected",
    "last_round",
    "train_loss",
    "steps",
    "train_sets",
    "train_seconds",
    "update_norm",
    "clipped",
    "eval_ndcg@10",
    "eval_log_loss",
    "eval_sets",
    "bytes_to_node",
    "last_problem",
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def per_node_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per node id (as a string, the JSON key) over ``rows`` (``metrics.jsonl``):
    rounds it was sampled, trained, was rejected; its last training and evaluation metrics;
    rounds its update was clipped; bytes sent to it; its last problem (stage, kind, reason)."""
    nodes: dict[str, dict[str, Any]] = {}

    def entry(node: Any) -> dict[str, Any]:
        key = str(int(node))
        return nodes.setdefault(
            key,
            {
                "rounds_sampled": 0,
                "rounds_trained": 0,
                "rounds_evaluated": 0,
                "rounds_rejected": 0,
                "rounds_clipped": 0,
                "last_round": 0,
                "bytes_to_node": 0,
                "train": {},
                "eval": {},
                "last_problem": None,
            },
        )

    for row in rows:
        rnd = int(row.get("round", 0))
        for node, nbytes in dict(row.get("bytes_per_client") or {}).items():
            e = entry(node)
            e["rounds_sampled"] += 1
            e["bytes_to_node"] += int(nbytes)
        for reply in row.get("clients_train") or ():
            e = entry(reply["node"])
            e["rounds_trained"] += 1
            e["rounds_clipped"] += int(bool(reply.get("clipped")))
            e["last_round"] = max(e["last_round"], rnd)
            e["train"] = {k: _number(reply.get(k)) for k in _TRAIN_KEYS if k in reply}
        for reply in row.get("clients_evaluate") or ():
            e = entry(reply["node"])
            e["rounds_evaluated"] += 1
            e["eval"] = {k: _number(reply.get(k)) for k in _EVAL_KEYS if k in reply}
        for problem in [*(row.get("rejected") or ()), *(row.get("rejected_evaluate") or ())]:
            e = entry(problem["node"])
            e["rounds_rejected"] += 1
            e["last_problem"] = {
                "round": rnd,
                "stage": problem.get("message_type", ""),
                "kind": problem.get("kind", ""),
                "reason": problem.get("reason", ""),
            }
    return dict(sorted(nodes.items(), key=lambda kv: int(kv[0])))


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _one_line(reason: str, limit: int = 160) -> str:
    """A table cell for a reason: a multi-line one (a node's traceback) as its last line, the
    exception itself; at most ``limit`` characters."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def per_node_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """The per-device table (columns :data:`PER_NODE_COLUMNS`) of a :func:`per_node_summary`."""
    out = []
    for node, e in summary.items():
        train, ev, problem = e.get("train", {}), e.get("eval", {}), e.get("last_problem")
        out.append(
            [
                node,
                e.get("rounds_sampled", 0),
                e.get("rounds_trained", 0),
                e.get("rounds_rejected", 0),
                e.get("last_round", 0),
                train.get("loss_total"),
                _count(train.get("steps")),
                _count(train.get("num_examples")),
                train.get("train_seconds"),
                train.get("update_norm"),
                e.get("rounds_clipped", 0),
                ev.get("ndcg@10"),
                ev.get("log_loss"),
                _count(ev.get("num_examples")),
                e.get("bytes_to_node", 0),
                (
                    f"round {problem['round']} {problem['stage']}: {problem['kind']}: "
                    f"{_one_line(problem['reason'])}"
                    if problem
                    else ""
                ),
            ]
        )
    return out


def node_round_line(
    node: int,
    train: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    problems: Iterable[Mapping[str, Any]] = (),
) -> str:
    """The node's part of a round in one line: training (loss, steps, sets, seconds, update
    norm, clipped), federated evaluation (NDCG@10 and log loss on its own held-out sets) and
    any reply of its that was set aside. A metric undefined on the node (NaN, stored as null
    in ``metrics.jsonl``) shows as ``nan``."""

    def num(source: Mapping[str, Any], key: str) -> float:
        value = _number(source.get(key))
        return math.nan if value is None else value

    parts = [f"node {int(node)}:"]
    if train:
        clipped = " (clipped)" if train.get("clipped") else ""
        parts.append(
            f"trained loss {num(train, 'loss_total'):.4f}, {num(train, 'steps'):.0f} steps on "
            f"{num(train, 'num_examples'):.0f} sets, {num(train, 'train_seconds'):.1f}s, "
            f"update norm {num(train, 'update_norm'):.3g}{clipped}"
        )
    if evaluation:
        parts.append(
            "evaluated ndcg@10 {:.4f}, log_loss {:.4f} on {:.0f} sets".format(
                num(evaluation, "ndcg@10"),
                num(evaluation, "log_loss"),
                num(evaluation, "num_examples"),
            )
        )
    for problem in problems:
        parts.append(f"{problem.get('message_type', '')} set aside: {problem.get('reason', '')}")
    return "; ".join([parts[0] + " " + parts[1]] + parts[2:]) if len(parts) > 1 else parts[0]
