"""Flower strategies with per-client ConfigRecords, deterministic aggregation and checkpointable
state.

:func:`build_strategy` returns FedAvg (default), FedProx, FedAdam or FedTrimmedAvg from
``flwr.serverapp.strategy``, each extended by :class:`FedrankStrategyMixin`:

- every sampled node gets its own ``ConfigRecord``: the run's client settings plus what the
  :class:`~server.client_policy.ClientConfigPolicy` returns for that node (loss weights, ...);
- replies are aggregated in a fixed order (by the content of their weights), so a run with the
  same seed gives the same global weights whatever order the replies arrive in;
- integer buffers of the model (the student's feature columns) are kept, never averaged;
- client metrics are averaged weighted by ``num-examples``; per-node metrics, bytes and
  failures of the last round are kept for the server's logs;
- a node whose training fails because it lacks the current teacher scores (a restarted
  SuperNode keeps its node id but loses its cached state), or that crashed or did not reply,
  is rejected for the round and reported to ``forget_node``: the server asks it again, next
  time it is sampled, which scores it holds;
- :func:`strategy_state` / :func:`load_strategy_state` give the server optimiser's state
  (FedAdam's moments) as arrays for checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg

from common.config import FedrankConfig
from common.errors import CheckpointError, FedrankError
from common.records import record_nbytes
from server.client_policy import ClientConfigPolicy, check_overrides
from server.score_distribution import is_fedrank_error, is_stale_scores_error
from server.update_validation import Rejection, screen_replies

__all__ = [
    "FedrankStrategyMixin",
    "build_strategy",
    "strategy_state",
    "load_strategy_state",
    "NOT_AVERAGED",
]

log = logging.getLogger("fedrank.server")

# reported per node but meaningless as an average
NOT_AVERAGED = frozenset(
    {
        "client-key",
        "scores-received",
        "on-train-sets",
        "device-threads",
        "device-batch-size",
        "device-max-steps",
        "device-max-seconds",
        "device-memory-mb",
    }
)


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean (by ``weight_key``) of every metric but :data:`NOT_AVERAGED`; adds
    ``clients`` and the total of ``weight_key``."""
    weights = [float(next(iter(r.metric_records.values()))[weight_key]) for r in records]
    total = sum(weights)
    out: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key == weight_key or key in NOT_AVERAGED or isinstance(value, list):
                    continue
                out[key] = out.get(key, 0.0) + float(value) * (w / total if total else 0.0)
    out["clients"] = float(len(records))
    out[weight_key] = float(total)
    return MetricRecord(out)


def _fingerprint(msg: Message) -> str:
    h = hashlib.sha256()
    for record in msg.content.array_records.values():
        for key in sorted(record.keys()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(record[key].numpy()).tobytes())
    return h.hexdigest()


class FedrankStrategyMixin:
    """Per-node ConfigRecords from a policy, ordered aggregation, bookkeeping (see module)."""

    policy: ClientConfigPolicy
    node_info: Any  # callable node_id -> dict (what the server knows about the node)
    forget_node: Callable[[int], None] | None  # the server forgets what a node holds

    def setup_fedrank(
        self,
        policy: ClientConfigPolicy,
        seed: int,
        node_info: Any,
        min_replies: int = 1,
        forget_node: Callable[[int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.seed = seed
        self.node_info = node_info
        self.min_replies = min_replies
        self.forget_node = forget_node
        self.last_messages: list[Message] = []
        self.last_evaluate_messages: list[Message] = []
        self.last_rejected: list[dict[str, Any]] = []
        self.last_evaluate_rejected: list[dict[str, Any]] = []
        self.global_arrays: ArrayRecord | None = None
        self.last_train: list[dict[str, Any]] = []
        self.last_sent: dict[int, int] = {}
        self.last_received: int = 0

    # ---- training --------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        random.seed(f"fedrank-sample-{self.seed}-{server_round}")  # node sampling, per round
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        out: list[Message] = []
        self.last_sent = {}
        weight_bytes = record_nbytes(arrays)
        for msg in messages:
            node = msg.metadata.dst_node_id
            base = msg.content[self.configrecord_key]  # type: ignore[attr-defined]
            overrides = self.policy.configure(server_round, node, self.node_info(node))
            overrides = check_overrides(dict(overrides or {}), node)
            node_config = ConfigRecord({**dict(base), **overrides})
            content = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: node_config}  # type: ignore[attr-defined]
            )
            out.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type))
            self.last_sent[node] = weight_bytes + record_nbytes(node_config)
        self.last_messages = out  # once sent, they carry the ids replies refer to
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                continue
            reason = msg.error.reason
            if is_stale_scores_error(reason):
                # a restarted SuperNode (same node id, cached scores lost): rejected below,
                # asked again which version it holds the next time it is sampled
                log.warning(
                    "round %d: node %d does not hold the current teacher scores (restarted?); "
                    "its reply is rejected and it gets the scores again when next sampled",
                    server_round,
                    msg.metadata.src_node_id,
                )
            elif is_fedrank_error(reason):
                # bad data, scores or settings on a node: never silent, never skipped
                raise FedrankError(
                    f"round {server_round}: node {msg.metadata.src_node_id} failed to train: "
                    f"{reason}"
                )
        screened = screen_replies(
            server_round,
            replies,
            global_arrays=self.global_arrays if self.global_arrays is not None else ArrayRecord(),
            sent=self.last_messages,
            min_replies=self.min_replies,
            stage="train",
            logger=log,
        )
        self._forget_failed(screened.rejected)
        self.last_rejected = [r.to_dict() for r in screened.rejected]
        replies = list(screened.valid)
        replies.sort(key=_fingerprint)
        self.last_train = []
        self.last_received = 0
        for msg in replies:
            metrics = {}
            for record in msg.content.metric_records.values():
                metrics.update(dict(record))
            nbytes = sum(record_nbytes(r) for r in msg.content.array_records.values())
            self.last_received += nbytes
            node = msg.metadata.src_node_id
            self.last_train.append({"node": node, "bytes": nbytes, **metrics})
            self.policy.observe(server_round, node, metrics)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None and self.global_arrays is not None:
            arrays = self._keep_integer_buffers(arrays, self.global_arrays)
        return arrays, metrics

    def _forget_failed(self, rejected: Iterable[Rejection]) -> None:
        """Tell ``forget_node`` about every node that failed (error or no reply): whatever it
        held may be gone (a restarted SuperNode), so the server asks it again before it next
        trains. Nodes whose reply was merely invalid still hold their scores."""
        if self.forget_node is None:
            return
        for node in dict.fromkeys(r.node_id for r in rejected if r.kind in ("error", "missing")):
            self.forget_node(int(node))

    @staticmethod
    def _keep_integer_buffers(arrays: ArrayRecord, previous: ArrayRecord) -> ArrayRecord:
        out = ArrayRecord()
        for key in previous:
            old = previous[key].numpy()
            if key not in arrays:
                raise CheckpointError(f"aggregated weights lack key {key!r}")
            if old.dtype.kind in "iub":
                out[key] = Array(np.array(old))
            else:
                out[key] = Array(np.asarray(arrays[key].numpy(), dtype=old.dtype))
        return out

    # ---- evaluation ------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(f"fedrank-evaluate-{self.seed}-{server_round}")
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self.last_evaluate_messages = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            if msg.has_error() and is_fedrank_error(msg.error.reason):
                raise FedrankError(
                    f"round {server_round}: node {msg.metadata.src_node_id} failed to "
                    f"evaluate: {msg.error.reason}"
                )
        screened = screen_replies(
            server_round,
            replies,
            sent=self.last_evaluate_messages,
            min_replies=0,  # federated evaluation is informative; it never stops the run
            stage="evaluate",
            logger=log,
        )
        self.last_evaluate_rejected = [r.to_dict() for r in screened.rejected]
        if not screened.valid:
            return None
        return super().aggregate_evaluate(server_round, list(screened.valid))  # type: ignore[misc]


class FedrankFedAvg(FedrankStrategyMixin, FedAvg):
    """FedAvg with per-node ConfigRecords."""


class FedrankFedProx(FedrankStrategyMixin, FedProx):
    """FedProx (clients add ``proximal-mu / 2 * ||w - w_global||^2``)."""


class FedrankFedAdam(FedrankStrategyMixin, FedAdam):
    """FedAdam: server-side Adam on the averaged update."""


class FedrankFedTrimmedAvg(FedrankStrategyMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the client weights."""


def build_strategy(
    config: FedrankConfig,
    policy: ClientConfigPolicy,
    node_info: Any,
    forget_node: Callable[[int], None] | None = None,
) -> FedrankStrategyMixin:
    """The strategy named by ``strategy``, set up with ``policy``; ``forget_node(node_id)`` is
    called for every node whose training failed or did not reply (see the module docstring)."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_available_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    name = config.strategy
    strategy: FedrankStrategyMixin
    if name == "fedavg":
        strategy = FedrankFedAvg(**common)
    elif name == "fedprox":
        strategy = FedrankFedProx(**common, proximal_mu=config.proximal_mu)
    elif name == "fedadam":
        strategy = FedrankFedAdam(
            **common,
            eta=config.server_learning_rate,
            eta_l=config.learning_rate,
            beta_1=config.server_beta1,
            beta_2=config.server_beta2,
            tau=config.server_tau,
        )
    elif name == "fedtrimmedavg":
        strategy = FedrankFedTrimmedAvg(**common, beta=config.trim_beta)
    else:  # FedrankConfig validates the name; this guards programmatic misuse
        raise FedrankError(f"'strategy' {name!r} is unknown")
    strategy.setup_fedrank(
        policy, config.seed, node_info, min_replies=config.min_replies, forget_node=forget_node
    )
    return strategy


_STATE_ATTRS = ("m_t", "v_t")


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """The server optimiser's state as flat arrays (``m_t/<key>``, ``v_t/<key>``)."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        values = getattr(strategy, attr, None)
        if values:
            for key, value in values.items():
                out[f"{attr}/{key}"] = np.asarray(value)
    return out


def load_strategy_state(strategy: Any, state: dict[str, np.ndarray]) -> None:
    """Restore :func:`strategy_state` into ``strategy``."""
    for attr in _STATE_ATTRS:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if values:
            if not hasattr(strategy, attr):
                raise CheckpointError(
                    f"checkpoint holds {attr} state, but strategy {type(strategy).__name__} "
                    "has none: resume with the strategy the run started with"
                )
            setattr(strategy, attr, values)
