"""Per-device results folded from ``metrics.jsonl`` rows: partial participation, evaluation by
nodes that did not train, a node set aside, a node that never replied."""

from __future__ import annotations

import doctest
import math

import fedrank.common.per_node as per_node
from fedrank.common.per_node import (
    PER_NODE_COLUMNS,
    node_round_line,
    per_node_rows,
    per_node_summary,
)


def _train(node: int, loss: float, clipped: int = 0) -> dict:
    return {
        "node": node,
        "loss_total": loss,
        "steps": 20,
        "num_examples": 12,
        "train_seconds": 0.5,
        "update_norm": 1.25,
        "clipped": clipped,
        "weight": 12.0,
    }


ROWS = [
    {"round": 0, "ndcg@10": 0.1},  # the starting point: no per-node entries
    {
        "round": 1,
        "bytes_per_client": {"1": 100, "2": 100},
        "clients_train": [_train(1, 3.0), _train(2, 2.5, clipped=1)],
        "clients_evaluate": [
            {"node": 1, "ndcg@10": 0.4, "log_loss": 0.6, "num_examples": 3},
            {"node": 3, "ndcg@10": 0.2, "log_loss": float("nan"), "num_examples": 2},
        ],
    },
    {
        "round": 2,
        "bytes_per_client": {"1": 50, "3": 80},
        "clients_train": [_train(1, 2.0)],
        "rejected": [{"node": 3, "message_type": "train", "kind": "missing", "reason": "late"}],
        "rejected_evaluate": [
            {"node": 2, "message_type": "evaluate", "kind": "crash", "reason": "boom"}
        ],
    },
]


def test_docstring_example_runs() -> None:
    failures, tried = doctest.testmod(per_node, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_each_node_counts_its_own_rounds_metrics_and_problems() -> None:
    s = per_node_summary(ROWS)
    assert list(s) == ["1", "2", "3"]
    one, two, three = s["1"], s["2"], s["3"]
    assert (one["rounds_sampled"], one["rounds_trained"], one["rounds_evaluated"]) == (2, 2, 1)
    assert one["train"]["loss_total"] == 2.0 and one["last_round"] == 2  # the last reply
    assert one["bytes_to_node"] == 150 and one["last_problem"] is None
    assert two["rounds_clipped"] == 1 and two["rounds_rejected"] == 1
    assert two["last_problem"] == {
        "round": 2,
        "stage": "evaluate",
        "kind": "crash",
        "reason": "boom",
    }
    # node 3 evaluated without training (partial participation), then missed its round
    assert three["rounds_trained"] == 0 and three["rounds_evaluated"] == 1
    assert three["rounds_sampled"] == 1 and three["last_problem"]["kind"] == "missing"
    assert math.isnan(three["eval"]["log_loss"])


def test_table_rows_follow_the_columns() -> None:
    rows = per_node_rows(per_node_summary(ROWS))
    assert all(len(r) == len(PER_NODE_COLUMNS) for r in rows)
    col = {name: i for i, name in enumerate(PER_NODE_COLUMNS)}
    by_node = {r[col["node"]]: r for r in rows}
    assert by_node["1"][col["steps"]] == 20 and isinstance(by_node["1"][col["steps"]], int)
    assert by_node["3"][col["train_loss"]] is None
    assert by_node["2"][col["last_problem"]] == "round 2 evaluate: crash: boom"
    # a node's traceback shows as its last line (the exception), in one table cell
    crashed = [dict(ROWS[2], rejected=[dict(ROWS[2]["rejected"][0], reason=TRACEBACK)])]
    (row,) = [r for r in per_node_rows(per_node_summary(crashed)) if r[col["node"]] == "3"]
    assert row[col["last_problem"]] == "round 2 train: missing: ValueError: bad input"


TRACEBACK = """Traceback (most recent call last):
  File "client_app.py", line 144, in __call__
    raise ValueError("bad input")
ValueError: bad input
"""


def test_round_line_names_the_node_and_what_it_did() -> None:
    line = node_round_line(7, _train(7, 1.5, clipped=1), {"ndcg@10": 0.5, "num_examples": 4})
    assert line.startswith("node 7: trained loss 1.5000, 20 steps on 12 sets")
    assert "(clipped)" in line and "evaluated ndcg@10 0.5000" in line and "on 4 sets" in line
    late = node_round_line(8, None, None, [{"message_type": "train", "reason": "no reply"}])
    assert late == "node 8: train set aside: no reply"
    assert node_round_line(9, None, None) == "node 9:"
    # a NaN metric travels as null in metrics.jsonl: the line shows nan, never fails
    undefined = {**_train(10, 1.0), "loss_total": None, "steps": None}
    assert "trained loss nan, nan steps" in node_round_line(10, undefined, {"ndcg@10": None})
