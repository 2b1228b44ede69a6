"""A real Flower simulation (Flower's simulation runtime, Ray backend) on MQ2008 Fold1.

One start of the runtime runs four federations on the same two simulated clients, so the
whole module pays for one runtime start:

1. ``targeted``: FedAvg, 2 rounds, rank distillation, teacher scores sent per node;
2. ``full``: FedAdam, 2 rounds, uninterrupted;
3. ``resumed`` (part 1): FedAdam, stopped after round 1;
4. ``resumed`` (part 2): ``resume = true`` to 2 rounds, from the checkpoint of part 1;
5. ``broadcast``: another seed (so another teacher and score version), whole table to every node.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import MQ2008_FOLD1, TINY_TEACHER

from fedrank.common.run_folder import read_metrics
from fedrank.server.checkpoint import load_checkpoint
from fedrank.simulations.simulate import run_federations

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("federation")
    base = {
        "data-path": str(MQ2008_FOLD1),
        **TINY_TEACHER,
        "teacher-d-model": 8,
        "teacher-cache-dir": str(root / "teacher"),
        "local-epochs": 2,
        "round-timeout": 300.0,  # a stuck client fails the run instead of hanging the tests
    }
    configs = {
        "targeted": {**base, "out-dir": str(root / "targeted"), "num-server-rounds": 2},
        "full": {
            **base,
            "out-dir": str(root / "full"),
            "num-server-rounds": 2,
            "strategy": "fedadam",
        },
        "part": {
            **base,
            "out-dir": str(root / "resumed"),
            "num-server-rounds": 1,
            "strategy": "fedadam",
        },
        "resumed": {
            **base,
            "out-dir": str(root / "resumed"),
            "num-server-rounds": 2,
            "strategy": "fedadam",
            "resume": True,
        },
        "broadcast": {
            **base,
            "out-dir": str(root / "broadcast"),
            "num-server-rounds": 1,
            "score-mode": "broadcast",
            "seed": 1,
        },
    }
    # one simulation worker: the runtime starts faster on a small machine
    summaries = run_federations(list(configs.values()), num_clients=2, num_cpus=1)
    return {"root": root, "summaries": dict(zip(configs, summaries, strict=True))}


def test_outputs_are_written(runs: dict) -> None:
    out = runs["root"] / "targeted"
    for name in ("config.json", "metrics.jsonl", "summary.json", "ndcg10.png", "checkpoint.npz"):
        assert (out / name).is_file(), name
    assert (out / "student" / "student.pt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num-server-rounds"] == 2 and config["score-mode"] == "targeted"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("round", "ndcg@10", "log_loss", "bytes_to_clients", "seconds"):
            assert key in row, key
    assert all(r["bytes_to_clients"] > 0 and r["clients"] == 2 for r in rows[1:])
    summary = runs["summaries"]["targeted"]
    assert summary["teacher"]["parameters"] > summary["student"]["parameters"] > 0
    assert summary["data"]["name"] == "MQ2008/Fold1"
    assert (out / "ndcg10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_global_student_improves_on_its_start(runs: dict) -> None:
    rows = read_metrics(runs["root"] / "targeted" / "metrics.jsonl")
    assert rows[-1]["ndcg@10"] > rows[0]["ndcg@10"] + 0.01
    summary = runs["summaries"]["targeted"]
    assert summary["student"]["metrics"]["ndcg@10"] == rows[-1]["ndcg@10"]
    assert 0.0 <= summary["student"]["metrics"]["kendall_tau"] <= 1.0
    # client metrics are aggregated weighted by example count
    train = rows[1]["train"]
    clients = rows[1]["clients_train"]
    n = [c["num_examples"] for c in clients]
    expected = sum(c["loss_total"] * k for c, k in zip(clients, n, strict=True)) / sum(n)
    assert train["loss_total"] == pytest.approx(expected)
    assert train["num_examples"] == sum(n) == 471  # every training set is on one client


def test_targeted_clients_receive_exactly_their_sets_once(runs: dict) -> None:
    deliveries = runs["summaries"]["targeted"]["federation"]["score_deliveries"]
    assert len(deliveries) == 2 and len({d["node_id"] for d in deliveries}) == 2
    # the clients checked the sets themselves (they refuse anything else in targeted mode)
    assert all(d["exact_match"] and d["received_count"] == 1 for d in deliveries)
    assert all(d["round"] == 1 for d in deliveries)
    # train + vali sets of MQ2008 Fold1 are split between the two clients
    assert sum(d["num_sets"] for d in deliveries) == 471 + 157
    rows = read_metrics(runs["root"] / "targeted" / "metrics.jsonl")
    assert rows[1]["bytes_scores_to_clients"] == sum(d["nbytes"] for d in deliveries)
    assert rows[2]["bytes_scores_to_clients"] == 0 and rows[2]["score_deliveries"] == 0
    assert all(c["scores_received"] == 1 for c in rows[2]["clients_train"])


def test_scores_are_sent_once_per_node_and_version(runs: dict) -> None:
    # the later federations use the same teacher version on the same nodes: nothing is resent
    for name in ("full", "part", "resumed"):
        assert runs["summaries"][name]["federation"]["score_deliveries"] == []
    rows = read_metrics(runs["root"] / "full" / "metrics.jsonl")
    assert all(r["bytes_scores_to_clients"] == 0 for r in rows)
    assert all(c["scores_received"] == 1 for r in rows[1:] for c in r["clients_train"])


def test_resume_gives_the_weights_of_an_uninterrupted_run(runs: dict) -> None:
    full = load_checkpoint(runs["root"] / "full")
    resumed = load_checkpoint(runs["root"] / "resumed")
    assert full is not None and resumed is not None
    assert full.round == resumed.round == 2
    assert set(full.weights) == set(resumed.weights)
    for key in full.weights:
        np.testing.assert_array_equal(full.weights[key], resumed.weights[key], err_msg=key)
    assert set(full.strategy) == set(resumed.strategy) and full.strategy  # FedAdam moments
    for key in full.strategy:
        np.testing.assert_array_equal(full.strategy[key], resumed.strategy[key], err_msg=key)
    rows = read_metrics(runs["root"] / "resumed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    full_rows = read_metrics(runs["root"] / "full" / "metrics.jsonl")
    assert rows[-1]["ndcg@10"] == full_rows[-1]["ndcg@10"]


def test_a_new_teacher_version_is_sent_again_and_broadcast_sends_the_whole_table(
    runs: dict,
) -> None:
    summary = runs["summaries"]["broadcast"]
    deliveries = summary["federation"]["score_deliveries"]
    old = runs["summaries"]["targeted"]["federation"]["score_deliveries"][0]["version"]
    assert len(deliveries) == 2 and all(d["version"] != old for d in deliveries)
    # every node gets all 471 + 157 training and validation sets, more than it holds
    assert all(d["num_sets"] == 471 + 157 and not d["exact_match"] for d in deliveries)
    assert all(d["received_count"] == 2 for d in deliveries)  # second version on each node
    targeted = runs["summaries"]["targeted"]["federation"]["score_deliveries"]
    assert min(d["nbytes"] for d in deliveries) > max(d["nbytes"] for d in targeted)
