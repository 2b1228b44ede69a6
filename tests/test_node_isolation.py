"""One node can neither end, stall nor subvert a run: each failure measured before costs only
that node now (real Flower messages, the real strategy, the real ClientApp handlers).

Measured failures, one test each: partial participation with federated evaluation (replies
with other metric keys), a device's extra metric key, a NaN metric, an error whose text names
a fedrank error class, malformed hello replies, an unknown set id, a wrong version
acknowledgement, a NaN reward under the adaptive policy, a ``--node-config`` typo, a node lost
with ``min-available-nodes = 2``, example counts of 1e12 and 1e308; and the defences that are
on by default (FedTrimmedAvg that trims nothing, Krum/Bulyan sizes, DP's fixed denominator).
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from support import instruction_metadata, reply_metadata, write_letor

from fedrank.client.client_app import app as client_app
from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.models import StudentModel, count_parameters
from fedrank.common.records import model_to_arrays
from fedrank.common.reply_schema import (
    EVALUATE_METRICS,
    NODE_ERROR_CODES,
    PROTOCOL,
    TRAIN_METRICS,
    HelloStatus,
    ReplySchemaError,
)
from fedrank.common.score_table import ScoreTable
from fedrank.server.client_weights import AdaptiveWeights, make_policy
from fedrank.server.defences import check_sample_size
from fedrank.server.nodes import NodeRegistry, NotEnoughNodes
from fedrank.server.privacy import DPSettings, epsilon, wrap_strategy
from fedrank.server.score_distribution import ScoreDistributor
from fedrank.server.strategy import STRATEGIES, TrainPlan, build_strategy
from fedrank.server.update_validation import NotEnoughReplies


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # what Flower's runtime sets before messages are created
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


# ---- real messages -----------------------------------------------------------------------------
def _sent(node: int, kind: str = "train") -> Message:
    """An instruction as the grid leaves it after sending (message id set)."""
    return Message(RecordDict(), metadata=instruction_metadata(node, kind))


def _train_metrics(examples: float = 10, **values: float) -> dict:
    return {**dict.fromkeys(TRAIN_METRICS.required, 1), "num_examples": examples, **values}


def _train_reply(node: int, weights: dict, **metrics: float) -> Message:
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, metadata=reply_metadata(node))


def _eval_reply(node: int, **metrics: float) -> Message:
    base = {**dict.fromkeys(EVALUATE_METRICS.required, 0.5), "num_examples": 10}
    base["on_train_sets"] = 0
    content = RecordDict({"metrics": MetricRecord({**base, **metrics})})
    return Message(content, metadata=reply_metadata(node, "evaluate"))


def _error(node: int, code: int, reason: str, kind: str = "train") -> Message:
    return Message(Error(code=code, reason=reason), metadata=reply_metadata(node, kind))


@pytest.fixture
def student() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    arrays = model_to_arrays(StudentModel(6, hidden=(4,), feature_indices=[0, 2, 4]))
    return {k: v.numpy() for k, v in arrays.items()}


def _moved(base: dict[str, np.ndarray], step: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: v + np.float32(step) * rng.normal(size=v.shape).astype(v.dtype)
        if v.dtype.kind == "f"
        else v
        for k, v in base.items()
    }


def _registry(nodes: dict[int, int]) -> NodeRegistry:
    """A registry that heard hello from each node (node -> training sets it reported)."""
    registry = NodeRegistry({})
    for node, sets in nodes.items():
        info = registry.node(node)
        info.confirmed, info.num_sets, info.num_train_sets, info.client_key = True, sets, sets, node
    return registry


def _plan(server_round: int, arrays: dict[str, np.ndarray], sent: list[Message] = ()) -> TrainPlan:
    """The plan of a round that started from ``arrays`` and sent ``sent``."""
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    nodes = [int(m.metadata.dst_node_id) for m in sent]
    return TrainPlan(server_round, record, list(sent), nodes, dict.fromkeys(nodes, 0))


def _strategy(registry: NodeRegistry | None = None, **config):
    cfg = FedrankConfig.from_run_config({"min-available-nodes": 1, **config})
    return build_strategy(cfg, make_policy(cfg), registry)


# ---- metric schema: partial participation, extra keys, NaN -------------------------------------
def test_replies_with_and_without_teacher_metrics_are_averaged_not_refused() -> None:
    """fraction-train=0.5, fraction-evaluate=1.0: a node that did not train this round
    evaluates without teacher scores (no agreement or loss metrics). Before: Flower raised
    InconsistentMessageReplies and the run ended. Now each key is averaged over the nodes that
    report it."""
    strategy = _strategy(_registry({1: 20, 2: 20}), **{"fraction-evaluate": 1.0})
    sent = [_sent(1, "evaluate"), _sent(2, "evaluate")]
    with_teacher = _eval_reply(
        1, kendall_tau=0.8, spearman=0.9, **{"topk_overlap@10": 0.7, "ndcg@10": 0.6}
    )
    without = _eval_reply(2, **{"ndcg@10": 0.4})
    result = strategy.aggregate_evaluation(1, sent, [with_teacher, without])
    metrics = result.metrics
    assert metrics["ndcg@10"] == pytest.approx(0.5) and metrics["kendall_tau"] == 0.8
    assert metrics["clients"] == 2 and not result.rejected and result.evaluated == [1, 2]


def test_a_reply_with_an_extra_or_missing_key_costs_only_its_node(student) -> None:
    """A device that sets memory-mb used to add 'device_memory_mb' (an extra key: Flower's
    InconsistentMessageReplies for the whole round). Now every device reports the same keys,
    and a reply that does not fit the schema is rejected with the key named."""
    strategy = _strategy(_registry({1: 20, 2: 20, 3: 20}))
    plan = _plan(1, student, [_sent(n) for n in (1, 2, 3)])
    good = _train_reply(1, _moved(student, 0.01), **_train_metrics())
    extra = _train_reply(2, _moved(student, 0.01, 1), **_train_metrics(), surprise=1.0)
    metrics = _train_metrics()
    del metrics["loss_rank"]
    missing = _train_reply(3, _moved(student, 0.01, 2), **metrics)
    result = strategy.aggregate_round(plan, [good, extra, missing])
    assert result.arrays is not None
    reasons = {r.node_id: r.reason for r in result.rejected}
    assert set(reasons) == {2, 3}
    assert "unexpected key 'surprise'" in reasons[2] and "lack 'loss_rank'" in reasons[3]
    assert "device_memory_mb" in TRAIN_METRICS.required  # always sent (0: no cap)


def test_a_nan_metric_is_kept_as_undefined_and_skipped_in_the_average(student) -> None:
    """A NaN metric used to be dropped on the client (another key set: the round ended). Now
    it travels as NaN (undefined on that node) and the average skips it."""
    record = TRAIN_METRICS.record(_train_metrics(**{"loss_label": float("nan")}))
    assert math.isnan(record["loss_label"]) and set(record) == set(TRAIN_METRICS.required)
    strategy = _strategy(_registry({1: 20, 2: 20}))
    replies = [
        _train_reply(1, _moved(student, 0.01), **_train_metrics(**{"loss_label": 0.25})),
        _train_reply(2, _moved(student, 0.01, 1), **dict(record)),
    ]
    metrics = strategy.aggregate_round(_plan(1, student), replies).metrics
    assert metrics["loss_label"] == pytest.approx(0.25) and metrics["clients"] == 2


def test_client_metrics_fit_the_schema_or_name_the_key() -> None:
    with pytest.raises(
        ReplySchemaError, match="'steps-taken' is not in fedrank.common.reply_schema"
    ):
        TRAIN_METRICS.record(_train_metrics(**{"steps-taken": 3}))
    with pytest.raises(ReplySchemaError, match="part of the 'validation' group"):
        TRAIN_METRICS.record(_train_metrics(**{"val_ndcg@10": 0.5}))


# ---- node errors, hello and scores acknowledgements --------------------------------------------
def _hello(node: int, record: ConfigRecord | None) -> Message:
    content = RecordDict({"status": record}) if record is not None else RecordDict()
    return Message(content, metadata=reply_metadata(node, "query.hello"))


def _status(**changes) -> ConfigRecord:
    values = HelloStatus("none", 4, 3, 7, "partition 1/4").record()
    for key, value in changes.items():
        if value is None:
            del values[key]
        else:
            values[key] = value
    return values


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "no 'status' record"),
        (_status(**{"num-sets": "many"}), "'num-sets' must be an integer"),
        (_status(**{"client-key": None}), "lacks 'client-key'"),
        (_status(**{"num-train-sets": 9}), "'num-train-sets' 9 exceeds 'num-sets' 4"),
        (_status(protocol=PROTOCOL - 1), f"protocol {PROTOCOL - 1}, the server {PROTOCOL}"),
        (_status(**{"set-ids": ["a", "a", "b", "c"]}), "lists a set more than once"),
        (_status(extra=1), "unexpected key 'extra'"),
    ],
)
def test_a_malformed_hello_excludes_that_node_only(record, reason) -> None:
    """Before: a hello reply without 'status' or with a non-integer field ended the run."""
    registry = NodeRegistry({})
    problem = registry._read_hello(5, _hello(5, record))
    assert problem is not None and problem.excluded and problem.kind == "protocol"
    assert reason in problem.reason
    assert set(registry.excluded()) == {5} and registry.eligible([5]) == []
    assert registry._read_hello(6, _hello(6, _status())) is None
    assert registry.eligible([5, 6]) == [6] and registry.node(6).num_train_sets == 3


def test_error_text_naming_a_fedrank_class_is_only_that_nodes_failure() -> None:
    """The server reads the kind from the error code, never from the text: a reply whose text
    names ScoreTableError or ConfigError used to end the run."""
    registry = NodeRegistry({})
    crash = registry._read_hello(1, _error(1, 2, "ScoreTableError ConfigError", "query.hello"))
    assert crash.kind == "crash" and not crash.excluded  # asked again next round
    typo = registry._read_hello(
        2,
        _error(
            2,
            NODE_ERROR_CODES["node-config"],
            "node-config: unknown node_config key 'max-step' (did you mean 'max-steps'?)",
            "query.hello",
        ),
    )
    assert typo.kind == "node-config" and typo.excluded
    assert "'max-step'" in registry.excluded()[2]


def test_a_device_whose_size_cap_is_below_the_student_is_left_out() -> None:
    registry = NodeRegistry({}, student_parameters=500)
    problem = registry._read_hello(3, _hello(3, _status(**{"max-parameters": 100})))
    assert problem.kind == "device-cap" and problem.excluded
    assert "500 parameters" in problem.reason and "at most 100" in problem.reason


def _table() -> ScoreTable:
    sets = ExampleSets(
        features=np.zeros((6, 2)), labels=np.zeros(6), offsets=[0, 3, 6], set_ids=["q1", "q2"]
    )
    return ScoreTable.from_scores(sets, np.arange(6, dtype=np.float32))


def test_an_unknown_set_id_excludes_that_node_only() -> None:
    """Before: a node reporting a set without teacher scores ended the run."""
    registry = _registry({1: 2, 2: 2})
    registry.node(1).set_ids = ["q1", "q2"]
    registry.node(2).set_ids = ["q1", "nope"]
    distributor = ScoreDistributor(_table(), "targeted", "float32", registry)
    registry.node(1).version = distributor.version  # node 1 already holds them
    sent, problems = distributor.ensure(None, 1, [1, 2])  # nothing to send: no grid needed
    assert sent == {1: 0, 2: 0}
    (problem,) = problems
    assert problem.node_id == 2 and problem.excluded and "'nope'" in problem.reason
    assert registry.eligible([1, 2]) == [1]


def test_a_wrong_or_malformed_acknowledgement_costs_only_that_node() -> None:
    registry = _registry({1: 2, 2: 2})
    distributor = ScoreDistributor(_table(), "broadcast", "float32", registry)

    def ack(node: int, **values) -> Message:
        record = ConfigRecord(
            {
                "version": distributor.version,
                "num-sets": 2,
                "local-sets": 2,
                "exact-match": True,
                "received-count": 1,
                **values,
            }
        )
        return Message(RecordDict({"ack": record}), metadata=reply_metadata(node, "query.scores"))

    wrong = distributor._read_ack(1, 1, ack(1, version="old"), 100)
    assert wrong.kind == "invalid" and not wrong.excluded and "'old'" in wrong.reason
    malformed = distributor._read_ack(1, 2, ack(2, **{"num-sets": "two"}), 100)
    assert malformed.kind == "protocol" and malformed.excluded
    assert distributor._read_ack(1, 1, ack(1), 100) is None
    assert registry.node(1).version == distributor.version and distributor.deliveries


# ---- the adaptive policy ------------------------------------------------------------------------
def test_a_nan_reward_is_ignored_and_state_is_keyed_by_node_id() -> None:
    """Before: one NaN 'val_ndcg@10' made Exp3 raise 'Probabilities contain NaN' next round;
    and a node could write another node's state by claiming its client key."""
    options = {"candidates": [{"rank-weight": 0.0}, {"rank-weight": 1.0}]}
    policy = AdaptiveWeights(options, seed=0)
    policy.configure(1, 11, {"client-key": 0})
    policy.observe(1, 11, {"val_ndcg@10_start": 0.5, "val_ndcg@10": float("nan")})
    assert np.allclose(policy.probabilities(11), 0.5)
    policy.configure(2, 11, {"client-key": 0})  # no 'Probabilities contain NaN'
    policy.configure(2, 12, {"client-key": 1})
    # node 12 claims node 11's client key in its reply: its reward goes to node 12's state
    policy.observe(2, 12, {"client_key": 0, "val_ndcg@10_start": 0.0, "val_ndcg@10": 0.5})
    assert set(policy.losses) == {12} and 11 in policy.pending


# ---- device caps the server cannot override -----------------------------------------------------


def _call(kind: str, node_config: dict, content: dict) -> Message:
    msg = Message(RecordDict(content), dst_node_id=5, message_type=kind)
    context = Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )
    return client_app(msg, context)


def test_device_caps_hold_whatever_the_server_asks(tmp_path) -> None:
    data = write_letor(tmp_path / "device.txt", items=4)
    student = StudentModel(46, hidden=(16,))
    cfg = FedrankConfig.from_run_config({"rank-weight": 0, "local-epochs": 50, "batch-size": 2})
    config = ConfigRecord(
        {
            **cfg.client_dict(),
            "model-spec": json.dumps(student.spec),
            "teacher-version": "none",
            "server-round": 1,
        }
    )
    content = {"arrays": model_to_arrays(student), "config": config}
    node = {"data-path": str(data), "max-epochs": 1, "max-parameters": 10_000, "threads": 1}
    threads = torch.get_num_threads()
    try:
        hello = _call("query.hello", node, {"config": config})
        assert hello.content["status"]["max-parameters"] == 10_000
        metrics = _call("train", node, content).content["metrics"]
        per_epoch = -(-metrics["num_examples"] // 2)
        assert metrics["device_max_epochs"] == 1 and metrics["steps"] == per_epoch  # not 50
        small = {**node, "max-parameters": 100}
        refused = _call("train", small, content)
        assert refused.error.code == NODE_ERROR_CODES["device-cap"]
        assert f"{count_parameters(student):,} parameters" in refused.error.reason
        huge = _call("query.hello", {**node, "threads": 10**9}, {"config": config})
        assert "'threads' must be an integer >= 0 and <= 1024" in huge.error.reason
        typo = _call("query.hello", {**node, "max-step": 3}, {"config": config})
        assert typo.error.code == NODE_ERROR_CODES["node-config"]
        assert "'max-step'" in typo.error.reason and "did you mean 'max-steps'" in typo.error.reason
    finally:
        torch.set_num_threads(threads)


# ---- lost nodes and bounded waits ---------------------------------------------------------------
class _Connected:
    """The one grid call the wait makes: which nodes are connected (a changing list)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_a_lost_node_costs_a_bounded_wait_not_the_run(caplog) -> None:
    """min-available-nodes=2 and one of two SuperNodes gone: before, the server printed
    'Waiting for nodes to connect' forever. Now it waits node-wait-timeout once, then goes on
    with the node that is there (min-replies 1), or stops with one line (min-replies 2)."""
    registry = NodeRegistry({})
    grid = _Connected([1])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedrank.server"):
        nodes = registry.wait_for_nodes(grid, 2, 0.3, 1, "round 3")
    assert nodes == [1] and 0.3 <= time.monotonic() - start < 5
    assert "round 3: 1 of 'min-available-nodes' 2 node(s) connected after 0.3s" in caplog.text
    start = time.monotonic()  # the same shortage next round: no new wait
    assert registry.wait_for_nodes(grid, 2, 30.0, 1, "round 4") == [1]
    assert time.monotonic() - start < 1.0
    with pytest.raises(NotEnoughNodes, match=r"only 1 usable node\(s\).*'min-replies' is 2"):
        registry.wait_for_nodes(grid, 2, 0.2, 2, "round 5")
    grid.nodes.append(2)
    assert registry.wait_for_nodes(grid, 2, 0.2, 2, "round 6") == [1, 2]
    # an excluded node is connected (no wait) but not usable
    registry.exclude(2, "node-config: bad")
    start = time.monotonic()
    with pytest.raises(NotEnoughNodes, match="1 excluded: node 2: node-config: bad"):
        registry.wait_for_nodes(grid, 2, 30.0, 2, "round 7")
    assert time.monotonic() - start < 1.0
    assert registry.wait_for_nodes(grid, 2, 30.0, 1, "round 8") == [1]


class _Silent(_Connected):
    """A grid whose nodes never answer: it counts the messages pushed to each node."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(nodes)
        self.pushed: list[int] = []

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}-{i}"
            self.pushed.append(int(msg.metadata.dst_node_id))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        return []


def test_a_silent_node_is_asked_hello_at_most_once_per_round_and_then_less_often() -> None:
    """Before: a silent node was asked hello twice per round, each waiting the full timeout.
    Now once per round at most, backing off 1, 2, 4, ... rounds while it stays silent."""
    registry = NodeRegistry({}, timeout=0.01)
    grid = _Silent([1])
    asked = []
    for rnd in range(1, 9):
        before = len(grid.pushed)
        problems = registry.hello(grid, [1], rnd)
        if len(grid.pushed) > before:
            asked.append(rnd)
            assert problems[0].kind == "missing" and not problems[0].excluded
    assert asked == [1, 2, 4, 8]


def test_sampling_draws_only_usable_nodes_and_never_waits() -> None:
    registry = _registry({1: 5, 2: 5, 3: 5})
    registry.forget(2)  # not heard from since it failed: says hello first
    registry.exclude(3, "data: bad file")
    strategy = _strategy(registry, **{"fraction-train": 1.0})
    assert strategy.sample(1, _Connected([1, 2, 3, 4]), 1.0, "train") == [1]
    assert strategy.sample(1, _Connected([]), 1.0, "train") == []


# ---- poisoning: example counts, norms, robust rules ---------------------------------------------
@pytest.mark.parametrize("claim", [1e12, 1e308])
def test_a_node_claiming_huge_example_counts_gets_no_more_than_it_holds(student, claim) -> None:
    """Before: 1e12 took the whole average, two claims of 1e308 overflowed the total to inf and
    zeroed every weight. Now the weight is capped by the node's hello (1e12) or the reply is
    refused as no count (1e308 > 2**40), and the aggregate stays finite."""
    no_clip = {"max-update-norm": 0.0, "update-norm-ratio": 0.0}  # the weights alone
    strategy = _strategy(_registry({1: 30, 2: 30, 3: 30}), **no_clip)
    honest = [_train_reply(n, _moved(student, 0.01, n), **_train_metrics(30)) for n in (1, 2)]
    liar_weights = {k: v + 5.0 if v.dtype.kind == "f" else v for k, v in student.items()}
    liars = [_train_reply(3, liar_weights, **_train_metrics(claim))]
    result = strategy.aggregate_round(_plan(1, student), honest + liars)
    arrays, metrics = result.arrays, result.metrics
    key = next(k for k, v in student.items() if v.dtype.kind == "f")
    new = arrays[key].numpy()
    assert np.all(np.isfinite(new))
    shift = float(np.mean(new - student[key]))
    if claim == 1e12:  # capped to its 30 sets: one third of the weight, not all of it
        assert shift == pytest.approx(5.0 / 3, abs=0.05)
        assert [c["weight"] for c in result.clients if c["node"] == 3] == [30]
        assert metrics["num_examples"] == 90
    else:  # refused: the honest average
        assert abs(shift) < 0.05 and [r.node_id for r in result.rejected] == [3]


def test_a_scaled_update_is_clipped_to_the_bound(student) -> None:
    strategy = _strategy(_registry({1: 10, 2: 10}), **{"max-update-norm": 1.0})
    scaled = {k: v + 100.0 if v.dtype.kind == "f" else v for k, v in student.items()}
    result = strategy.aggregate_round(
        _plan(1, student),
        [_train_reply(1, student, **_train_metrics()), _train_reply(2, scaled, **_train_metrics())],
    )
    arrays = result.arrays
    floats = [k for k, v in student.items() if v.dtype.kind == "f"]
    moved = math.sqrt(sum(float(np.sum((arrays[k].numpy() - student[k]) ** 2)) for k in floats))
    assert moved == pytest.approx(0.5, rel=1e-4)  # (0 + 1.0) / 2, not 100 * sqrt(d) / 2
    assert any("clipped to 1" in n["note"] for n in result.notes)


def test_an_update_far_longer_than_the_rounds_median_is_clipped(student) -> None:
    """update-norm-ratio: a poisoner's update ten times an honest one is clipped to three
    times the round's median update norm, even below max-update-norm."""
    registry = _registry({n: 10 for n in range(1, 6)})
    strategy = _strategy(registry, **{"max-update-norm": 1000.0, "update-norm-ratio": 3.0})
    honest = [_moved(student, 0.01, n) for n in range(1, 5)]
    evil = {k: v - 10 * (honest[0][k] - v) for k, v in student.items()}
    replies = [_train_reply(n, w, **_train_metrics()) for n, w in enumerate(honest, start=1)]
    result = strategy.aggregate_round(
        _plan(1, student), replies + [_train_reply(5, evil, **_train_metrics())]
    )
    norms = {c["node"]: c["update_norm"] for c in result.clients}
    median = float(np.median(list(norms.values())))
    clipped = [c["node"] for c in result.clients if c["clipped"]]
    assert clipped == [5] and norms[5] > 3 * median
    (note,) = result.notes
    assert note["node"] == 5 and f"clipped to {3 * median:.4g}" in note["note"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_samples_and_aggregates_screened_replies(student, name: str) -> None:
    """Flower's configure_train then aggregate_train, as Strategy.start calls them, for every
    strategy offered."""
    registry = _registry({n: 10 for n in range(1, 8)})
    strategy = _strategy(registry, strategy=name, **{"num-malicious-nodes": 1})
    global_arrays = ArrayRecord({k: Array(v) for k, v in student.items()})
    sent = strategy.configure_train(1, global_arrays, ConfigRecord({}), _Connected(list(range(9))))
    assert sorted(m.metadata.dst_node_id for m in sent) == list(range(1, 8))  # 0, 8: no hello
    replies = [_train_reply(n, _moved(student, 0.01, n), **_train_metrics()) for n in range(1, 8)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert set(arrays) == set(student) and metrics["clients"] == 7
    for key, value in student.items():
        new = arrays[key].numpy()
        assert new.dtype == value.dtype and np.all(np.isfinite(new))
        if value.dtype.kind == "f":
            assert 0 < float(np.max(np.abs(new - value))) < 0.1


def test_robust_rules_refuse_sizes_that_give_no_guarantee() -> None:
    with pytest.raises(ConfigError, match=r"'trim-beta' 0.2 trims int\(0.2 x 4\) = 0"):
        check_sample_size("fedtrimmedavg", {"trim-beta": 0.2}, 4)
    check_sample_size("fedtrimmedavg", {"trim-beta": 0.2}, 5)
    with pytest.raises(ConfigError, match=r"'num-malicious-nodes' 2 needs at least 2f \+ 3 = 7"):
        check_sample_size("krum", {"num-malicious-nodes": 2}, 6)
    with pytest.raises(ConfigError, match=r"4f \+ 3 = 7"):
        check_sample_size("bulyan", {"num-malicious-nodes": 1}, 6)
    check_sample_size("bulyan", {"num-malicious-nodes": 1}, 7)


def test_krum_keeps_the_honest_update_and_stops_below_its_minimum(student) -> None:
    registry = _registry({n: 10 for n in range(1, 6)})
    strategy = _strategy(registry, strategy="krum", **{"num-malicious-nodes": 1})
    honest = [_train_reply(n, _moved(student, 0.01, n), **_train_metrics()) for n in range(1, 5)]
    evil = {k: v - 3.0 if v.dtype.kind == "f" else v for k, v in student.items()}
    replies = honest + [_train_reply(5, evil, **_train_metrics())]
    arrays = strategy.aggregate_round(_plan(1, student), replies).arrays
    key = next(k for k, v in student.items() if v.dtype.kind == "f")
    assert np.max(np.abs(arrays[key].numpy() - student[key])) < 0.1  # an honest update won
    with pytest.raises(NotEnoughReplies, match="only 4 usable train replies, 'min-replies' is 5"):
        strategy.aggregate_round(_plan(2, student), honest)


# ---- differential privacy -----------------------------------------------------------------------
def test_dp_is_refused_where_its_accounting_does_not_hold() -> None:
    for name in ("fedadam", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"):
        with pytest.raises(ConfigError, match=f"'strategy' '{name}' cannot run with differential"):
            FedrankConfig.from_run_config({"strategy": name, "dp-noise-multiplier": 1.0})
    FedrankConfig.from_run_config({"strategy": "fedprox", "dp-noise-multiplier": 1.0})


def test_dp_noise_is_sized_for_the_fixed_sample_and_a_missing_reply_does_not_shrink_it(
    student,
) -> None:
    """DP-FedAvg with a fixed denominator n: the new model is w + sum(clipped) / n + noise of
    std sigma * C / n, whatever number of replies arrive. Before: the sum was divided by the
    valid replies (a client-controlled number) and the noise sized for that."""
    global_arrays = ArrayRecord({k: Array(v) for k, v in student.items()})
    floats = [k for k, v in student.items() if v.dtype.kind == "f"]
    total = sum(student[k].size for k in floats)
    far = {
        k: v + np.float32(100.0 / np.sqrt(total)) if v.dtype.kind == "f" else v
        for k, v in student.items()
    }
    inner = _strategy(_registry({1: 10, 2: 10}))
    dp = wrap_strategy(inner, DPSettings(noise_multiplier=1e-9, clipping_norm=2.0), 2)
    assert inner.defences.update_norm_ratio == 0  # data-dependent clipping breaks C / n
    plan = _plan(1, student, [_sent(1), _sent(2)])
    result = dp.aggregate_round(plan, [_train_reply(1, far, **_train_metrics())])  # 2 missing
    arrays = result.arrays
    assert [r.kind for r in result.rejected] == ["missing"] and result.budget == dp.budget
    moved = math.sqrt(sum(float(np.sum((arrays[k].numpy() - student[k]) ** 2)) for k in floats))
    assert moved == pytest.approx(2.0 / 2, rel=1e-4)  # clipped to C = 2, divided by n = 2
    assert dp.budget["noise_std"] == pytest.approx(1e-9 * 2.0 / 2)
    assert dp.budget["epsilon"] == pytest.approx(epsilon(1e-9, 1, 1e-5))
    # more nodes connected than at the start: a round still samples n = 2 of them
    more = _registry({n: 10 for n in range(1, 7)})
    inner.nodes = more
    plan = dp.configure_round(2, global_arrays, ConfigRecord({}), _Connected(list(range(1, 7))))
    assert len(plan.messages) == 2 and sorted(plan.weight_bytes) == sorted(plan.nodes())
