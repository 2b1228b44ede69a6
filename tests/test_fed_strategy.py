"""Strategy selection, per-node ConfigRecords' policy checks, aggregation details."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from support import reply_metadata

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError
from fedrank.server.client_policy import ClientConfigPolicy, check_overrides
from fedrank.server.client_weights import POLICIES, make_policy
from fedrank.server.strategy import (
    FedrankStrategyMixin,
    TrainPlan,
    aggregate_metrics,
    build_strategy,
    load_strategy_state,
    strategy_state,
)


@pytest.mark.parametrize(
    ("name", "cls", "attr", "value"),
    [
        ("fedavg", FedAvg, "fraction_train", 0.5),
        ("fedprox", FedProx, "proximal_mu", 0.01),
        ("fedadam", FedAdam, "eta", 0.05),
        ("fedtrimmedavg", FedTrimmedAvg, "beta", 0.2),
        ("fedmedian", FedMedian, "fraction_train", 0.5),
        ("krum", Krum, "num_malicious_nodes", 1),
        ("multikrum", MultiKrum, "num_malicious_nodes", 1),
        ("bulyan", Bulyan, "num_malicious_nodes", 1),
    ],
)
def test_strategies_are_selectable(name: str, cls: type, attr: str, value: float) -> None:
    cfg = FedrankConfig.from_run_config({"strategy": name, "fraction-train": 0.5})
    strategy = build_strategy(cfg, make_policy(cfg))
    assert isinstance(strategy, cls) and isinstance(strategy, FedrankStrategyMixin)
    assert getattr(strategy, attr) == pytest.approx(value)


def test_policy_overrides_are_client_keys_only() -> None:
    assert check_overrides({"rank-weight": 0.5}, 1) == {"rank-weight": 0.5}
    with pytest.raises(ConfigError, match="num-server-rounds"):
        check_overrides({"num-server-rounds": 3}, 1)
    with pytest.raises(ConfigError, match="client-policy"):
        make_policy(FedrankConfig.from_run_config({"client-policy": "no-such-policy"}))
    assert isinstance(POLICIES["uniform"](FedrankConfig()), ClientConfigPolicy)


def test_metrics_are_weighted_by_example_count() -> None:
    records = [
        RecordDict({"m": MetricRecord({"num_examples": 1, "loss": 1.0, "client_key": 0})}),
        RecordDict({"m": MetricRecord({"num_examples": 3, "loss": 3.0, "client_key": 1})}),
    ]
    out = aggregate_metrics(records, "num_examples")
    assert out["loss"] == pytest.approx(2.5) and out["num_examples"] == 4
    assert out["clients"] == 2 and "client_key" not in out


def test_integer_buffers_are_kept_not_averaged() -> None:
    previous = ArrayRecord({"w": Array(np.ones(3, np.float32)), "cols": Array(np.arange(3))})
    averaged = ArrayRecord(
        {"w": Array(np.full(3, 2.0)), "cols": Array(np.array([0.0, 0.9999999, 2.0000001]))}
    )
    out = FedrankStrategyMixin._keep_integer_buffers(averaged, previous)
    np.testing.assert_array_equal(out["cols"].numpy(), np.arange(3))
    assert out["w"].numpy().dtype == np.float32


def test_fedadam_state_round_trips() -> None:
    cfg = FedrankConfig.from_run_config({"strategy": "fedadam"})
    strategy = build_strategy(cfg, make_policy(cfg))
    strategy.m_t = {"w": np.full(2, 0.5)}
    strategy.v_t = {"w": np.full(2, 0.25)}
    state = strategy_state(strategy)
    fresh = build_strategy(cfg, make_policy(cfg))
    load_strategy_state(fresh, state)
    np.testing.assert_array_equal(fresh.m_t["w"], [0.5, 0.5])
    np.testing.assert_array_equal(fresh.v_t["w"], [0.25, 0.25])


def _message(node: int, content: RecordDict | None = None, code: int = 0, reason: str = ""):
    from flwr.app import Error

    metadata = reply_metadata(node)
    if reason:
        return Message(Error(code=code, reason=reason), metadata=metadata)
    assert content is not None
    return Message(content, metadata=metadata)


def _metrics(examples: int) -> MetricRecord:
    from fedrank.common.reply_schema import TRAIN_METRICS

    return MetricRecord({**dict.fromkeys(TRAIN_METRICS.required, 0), "num_examples": examples})


def test_node_errors_are_read_by_code_and_cost_only_that_node() -> None:
    """A restarted SuperNode (same id, cached scores lost) answers with the ``stale-scores``
    code: the round goes on without it and the server asks it again what it holds. A node
    whose data does not fit (``data`` code) is left out of the run; the others go on. An
    error whose *text* names a fedrank error class is just a crash of that node."""
    from fedrank.common.reply_schema import NODE_ERROR_CODES
    from fedrank.server.nodes import NodeRegistry

    weights = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    good = _message(1, RecordDict({"arrays": weights, "metrics": _metrics(2)}))
    stale = _message(
        2, code=NODE_ERROR_CODES["stale-scores"], reason="stale-scores: node 2 holds version x"
    )
    bad_data = _message(3, code=NODE_ERROR_CODES["data"], reason="data: 'data-path' bad line 3")
    named = _message(
        4, code=2, reason="<class 'fedrank.common.errors.ConfigError'>: ScoreTableError"
    )
    nodes = NodeRegistry({})
    for n in (1, 2, 3, 4):
        info = nodes.node(n)
        info.version, info.client_key, info.confirmed = "abc", 7, True
        info.num_train_sets = 5
    cfg = FedrankConfig.from_run_config({})
    strategy = build_strategy(cfg, make_policy(cfg), nodes)
    start = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    plan = TrainPlan(2, start, [], [1, 2, 3, 4], {})
    result = strategy.aggregate_round(plan, [good, stale, bad_data, named])
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.ones(3))
    kinds = {r.node_id: r.kind for r in result.rejected}
    assert kinds == {2: "stale-scores", 3: "data", 4: "crash"}
    assert all(r.message_type == "train" for r in result.rejected)
    info = nodes.node(2)
    assert (info.version, info.confirmed) == ("", False)  # asked again next round
    assert info.client_key == 7  # the last known key stays visible to client policies
    assert nodes.node(1).version == "abc"  # a node that trained keeps its state
    assert set(nodes.excluded()) == {3} and "bad line 3" in nodes.excluded()[3]
    assert nodes.eligible([1, 2, 3, 4]) == [1]  # 2 and 4 say hello again first
