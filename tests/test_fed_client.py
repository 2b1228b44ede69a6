"""The ClientApp's handlers, called with real Messages (no runtime): scores, training, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from support import MQ2008_FOLD1

from fedrank.client.client_app import app
from fedrank.client.local_data import load_local_data
from fedrank.common.config import FedrankConfig
from fedrank.common.models import StudentModel
from fedrank.common.records import model_to_arrays, score_table_from_record, score_table_to_record
from fedrank.common.reply_schema import NODE_ERROR_CODES, error_kind
from fedrank.common.score_table import ScoreTable

ROOT = Path(__file__).resolve().parents[1]
NODE = {"partition-id": 1, "num-partitions": 3}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # what Flower's runtime sets before messages are created
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


@pytest.fixture(scope="module")
def settings() -> dict:
    cfg = FedrankConfig.from_run_config(
        {"data-path": str(MQ2008_FOLD1.resolve()), "local-steps": 3}
    )
    return cfg.client_dict()


def _context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config or NODE, state=RecordDict(), run_config={}
    )


def _send(kind: str, content: dict, context: Context) -> Message:
    return app(Message(RecordDict(content), dst_node_id=7, message_type=kind), context)


def _failure(reply: Message, kind: str, match: str) -> str:
    """The reply is a structured node error of ``kind`` whose message matches ``match``."""
    assert reply.has_error(), reply.content
    assert reply.error.code == NODE_ERROR_CODES[kind] and error_kind(reply.error.code) == kind
    assert re.search(match, reply.error.reason), reply.error.reason
    assert "Traceback" not in reply.error.reason
    return reply.error.reason


def _local_table(settings: dict, rng_seed: int = 0) -> ScoreTable:
    local = load_local_data(NODE, settings)
    sets = local.train.concat([local.train, local.holdout])
    scores = np.random.default_rng(rng_seed).normal(size=sets.num_items).astype(np.float32)
    return ScoreTable.from_scores(sets, scores)


def test_hello_reports_exactly_the_local_sets(settings: dict) -> None:
    context = _context()
    reply = _send("query.hello", {"config": ConfigRecord(settings)}, context)
    status = reply.content["status"]
    local = load_local_data(NODE, settings)
    assert sorted(status["set-ids"]) == sorted(local.set_ids.tolist())
    assert status["held-version"] == "none"
    assert status["client-key"] == 1


def test_scores_are_cached_in_the_context_state(settings: dict) -> None:
    context = _context()
    table = _local_table(settings)
    record = score_table_to_record(table)
    config = ConfigRecord({**settings, "version": table.version})
    ack = _send("query.scores", {"scores": record, "config": config}, context).content["ack"]
    assert ack["exact-match"] and ack["received-count"] == 1 and ack["version"] == table.version
    cached = score_table_from_record(context.state.array_records["teacher-scores"])
    assert cached.equals(table)
    # a later hello reports the version the node now holds
    status = _send("query.hello", {"config": ConfigRecord(settings)}, context).content["status"]
    assert status["held-version"] == table.version


def test_float16_scores_round_trip(settings: dict) -> None:
    table = _local_table(settings).to_float16()
    back = score_table_from_record(score_table_to_record(table))
    assert back.equals(table) and back.dtype == np.float16 and back.version == table.version


def test_missing_set_is_an_error_naming_it(settings: dict) -> None:
    table = _local_table(settings)
    dropped = str(table.set_ids[3])
    partial = table.subset([s for s in table.set_ids.tolist() if s != dropped])
    content = {"scores": score_table_to_record(partial), "config": ConfigRecord(settings)}
    _failure(_send("query.scores", content, _context()), "scores", dropped)


def test_length_mismatch_is_an_error_naming_the_set(settings: dict) -> None:
    table = _local_table(settings)
    sizes = np.diff(table.offsets).copy()
    sizes[5] += 1  # one teacher score too many for the sixth set
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    scores = np.zeros(int(offsets[-1]), dtype=np.float32)
    bad = ScoreTable(table.set_ids, offsets, scores, "bad-lengths")
    content = {"scores": score_table_to_record(bad), "config": ConfigRecord(settings)}
    _failure(_send("query.scores", content, _context()), "scores", str(table.set_ids[5]))


def test_targeted_scores_with_foreign_sets_are_refused(settings: dict) -> None:
    mine = _local_table(settings)
    other = load_local_data({"partition-id": 0, "num-partitions": 3}, settings).train
    extra = ScoreTable.from_scores(other, np.zeros(other.num_items, dtype=np.float32))
    both_sets = np.concatenate([mine.set_ids, extra.set_ids[:1]])
    both_sizes = np.concatenate([np.diff(mine.offsets), np.diff(extra.offsets)[:1]])
    both = ScoreTable(
        both_sets,
        np.concatenate([[0], np.cumsum(both_sizes)]),
        np.zeros(int(both_sizes.sum()), dtype=np.float32),
        "with-foreign",
    )
    targeted = ConfigRecord({**settings, "score-mode": "targeted"})
    refused = _send(
        "query.scores", {"scores": score_table_to_record(both), "config": targeted}, _context()
    )
    _failure(refused, "scores", str(extra.set_ids[0]))
    # in broadcast mode a superset is what every node gets
    broadcast = ConfigRecord({**settings, "score-mode": "broadcast"})
    reply = _send(
        "query.scores", {"scores": score_table_to_record(both), "config": broadcast}, _context()
    )
    assert not reply.content["ack"]["exact-match"]


def _train_content(settings: dict, version: str) -> dict:
    torch.manual_seed(0)
    model = StudentModel(46, hidden=(8,))
    config = ConfigRecord(
        {
            **settings,
            "model-spec": json.dumps(model.spec),
            "teacher-version": version,
            "server-round": 1,
        }
    )
    return {"arrays": model_to_arrays(model), "config": config}


def _context_with_scores(settings: dict) -> tuple[Context, ScoreTable]:
    """A node context holding teacher scores for its sets (delivered by a scores message)."""
    context = _context()
    table = _local_table(settings)
    _send(
        "query.scores",
        {"scores": score_table_to_record(table), "config": ConfigRecord(settings)},
        context,
    )
    return context, table


def test_train_without_the_scores_is_an_error(settings: dict) -> None:
    reply = _send("train", _train_content(settings, "v-missing"), _context())
    _failure(reply, "stale-scores", "not delivered")


def test_train_and_evaluate_with_cached_scores(settings: dict) -> None:
    context, table = _context_with_scores(settings)
    content = _train_content(settings, table.version)
    reply = _send("train", content, context)
    metrics = reply.content["metrics"]
    local = load_local_data(NODE, settings)
    assert metrics["num_examples"] == local.train.num_sets
    assert metrics["steps"] == 3.0 and metrics["scores_received"] == 1
    for key in ("loss_label", "loss_rank_label", "loss_rank", "loss_total"):
        assert np.isfinite(metrics[key])
    assert "val_ndcg@10" not in metrics  # only when the server asks (report-validation)
    new = reply.content["arrays"]
    assert isinstance(new, ArrayRecord) and set(new) == set(content["arrays"])
    assert not np.allclose(new["net.0.weight"].numpy(), content["arrays"]["net.0.weight"].numpy())
    evaluated = _send("evaluate", content, context).content["metrics"]
    assert evaluated["num_examples"] == local.holdout.num_sets
    assert 0.0 <= evaluated["ndcg@10"] <= 1.0 and "kendall_tau" in evaluated


def test_label_only_training_needs_no_scores(settings: dict) -> None:
    labels_only = {**settings, "rank-weight": 0.0, "score-weight": 0.0}
    reply = _send("train", _train_content(labels_only, "none"), _context())
    assert reply.content["metrics"]["loss_rank"] == 0.0


def test_validation_metrics_when_the_server_asks(settings: dict) -> None:
    """``report-validation``: NDCG@10 on the held-out sets of the received model and of the
    locally trained one -- the same numbers the evaluate handler reports for those weights."""
    labels_only = {**settings, "rank-weight": 0.0, "score-weight": 0.0, "local-steps": 20}
    content = _train_content(labels_only, "none")
    content["config"]["report-validation"] = True
    reply = _send("train", content, _context())
    metrics = reply.content["metrics"]
    before = _send("evaluate", content, _context()).content["metrics"]
    after = _send(
        "evaluate", {"arrays": reply.content["arrays"], "config": content["config"]}, _context()
    ).content["metrics"]
    assert metrics["val_ndcg@10_start"] == pytest.approx(before["ndcg@10"], abs=1e-6)
    assert metrics["val_ndcg@10"] == pytest.approx(after["ndcg@10"], abs=1e-6)
    assert metrics["val_ndcg@10"] != metrics["val_ndcg@10_start"]


def test_node_without_data_names_data_path(settings: dict) -> None:
    reply = _send("query.hello", {"config": ConfigRecord(settings)}, _context({"other": 1}))
    _failure(reply, "node-config", "unknown node_config key 'other'")
    reply = _send("query.hello", {"config": ConfigRecord(settings)}, _context({"threads": 1}))
    _failure(reply, "data", "data-path")
    reply = _send(
        "query.hello", {"config": ConfigRecord(settings)}, _context({"data-path": "/no/such"})
    )
    _failure(reply, "data", "data-path")


def test_device_mode_reads_its_own_letor_folder(settings: dict) -> None:
    reply = _send(
        "query.hello",
        {"config": ConfigRecord(settings)},
        _context({"data-path": str(MQ2008_FOLD1)}),
    )
    status = reply.content["status"]
    assert status["num-train-sets"] == 471 and status["source"].startswith("device data")


def test_time_budget_stops_local_training(settings: dict) -> None:
    """``max_seconds`` ends the round's training after the step that exceeds it."""
    from fedrank.client.trainer import TrainSettings, train_student

    local = load_local_data(NODE, settings)
    cfg = FedrankConfig.from_run_config({**settings, "rank-weight": 0.0})
    model = StudentModel(46, hidden=(8,))
    run = TrainSettings(epochs=50, batch_size=2, max_seconds=1e-9)
    out = train_student(model, local.train, cfg.composite_loss(), run)
    assert out["steps"] == 1.0 and out["stopped_by_time"] == 1
    full = train_student(model, local.train, cfg.composite_loss(), TrainSettings(batch_size=64))
    assert full["steps"] == float(-(-local.train.num_sets // 64)) and full["stopped_by_time"] == 0


def test_repeated_messages_train_from_the_global_model_each_time(settings: dict) -> None:
    """The node keeps one built student per process and trains a copy per message: the same
    message twice gives the same weights (the copy it trained first does not leak into the
    second), and another global model gives another result."""
    context, table = _context_with_scores(settings)
    content = _train_content(settings, table.version)
    first = _send("train", content, context).content["arrays"]
    second = _send("train", content, context).content["arrays"]
    for key in first:
        assert np.array_equal(first[key].numpy(), second[key].numpy()), key
    moved = {**content, "arrays": first}
    third = _send("train", moved, context).content["arrays"]
    assert not np.allclose(third["net.0.weight"].numpy(), first["net.0.weight"].numpy())


def test_parsed_settings_follow_each_message(settings: dict) -> None:
    """Settings parsed once per process and text still follow what each message says."""
    context = _context()
    for steps in (2, 5, 2):
        changed = {**settings, "rank-weight": 0.0, "score-weight": 0.0, "local-steps": steps}
        reply = _send("train", _train_content(changed, "none"), context)
        assert reply.content["metrics"]["steps"] == float(steps)
