"""Flower strategies with per-client ConfigRecords, screened and defended aggregation, bounded
sampling and checkpointable state.

:func:`build_strategy` returns FedAvg (default), FedProx, FedAdam, FedTrimmedAvg or one of
Flower's robust rules (FedMedian, Krum, MultiKrum, Bulyan) from ``flwr.serverapp.strategy``,
each extended by :class:`FedrankStrategyMixin`:

- :meth:`~FedrankStrategyMixin.configure_round` (what Flower's ``configure_train`` returns):
  a seeded sample (its own random generator per round and stage, never the global one) of the
  nodes the :class:`~fedrank.server.nodes.NodeRegistry` allows (hello current, not excluded);
  it never waits (the round loop waits, bounded, before the hello); every sampled node gets
  its own ``ConfigRecord``: the run's client settings plus what the
  :class:`~fedrank.server.client_policy.ClientConfigPolicy` returns for that node (loss weights,
  ...); nodes whose settings use the teacher get its scores first
  (:class:`~fedrank.server.score_distribution.ScoreDistributor`), and a node that cannot get
  them does not train this round. The result is a :class:`TrainPlan`;
- :meth:`~FedrankStrategyMixin.aggregate_round` (behind Flower's ``aggregate_train``) returns a
  :class:`TrainResult`: the new global arrays and everything the round's report needs;
- replies are screened (:mod:`fedrank.server.update_validation`) and defended
  (:mod:`fedrank.server.defences`: example weights capped, update norms bounded, float64) before
  the Flower strategy sees them, so a reply that does not fit costs its node, never the run
  (Flower's strategies would raise
  ``InconsistentMessageReplies`` when replies' keys differ); a node's persistent failure
  (its ``node_config``, its data, its size cap) excludes it from the run, a crash or a missing
  reply makes the server ask it again what it holds;
- replies are aggregated in a fixed order (by the content of their weights), so a run with the
  same seed gives the same global weights whatever order the replies arrive in;
- integer buffers of the model (the student's feature columns) are kept, never averaged;
- client metrics are averaged weighted by the capped example counts, each key over the nodes
  where it is defined (NaN: undefined on that node); per-node metrics, bytes, rejections and
  defence notes come back in the :class:`TrainResult` (and :class:`EvaluationResult`);
- :func:`strategy_state` / :func:`load_strategy_state` give the server optimiser's state
  (FedAdam's moments) as arrays for checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
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

from fedrank.common.config import CLIENT_KEYS, FedrankConfig
from fedrank.common.errors import CheckpointError, FedrankError
from fedrank.common.records import array_numpy, record_nbytes
from fedrank.common.reply_schema import DEVICE_METRICS, NODE_METRICS, PERSISTENT_ERRORS
from fedrank.server.client_policy import ClientConfigPolicy, check_overrides
from fedrank.server.defences import Defences, Prepared, finite, prepare_updates, robust_minimum
from fedrank.server.nodes import NodeRegistry
from fedrank.server.score_distribution import ScoreDistributor
from fedrank.server.update_validation import NotEnoughReplies, Rejection, not_enough, screen_replies

__all__ = [
    "EvaluationResult",
    "RoundEntryPoints",
    "FedrankStrategyMixin",
    "TrainPlan",
    "TrainResult",
    "aggregate_metrics",
    "build_strategy",
    "strategy_state",
    "load_strategy_state",
    "weighted_metrics",
    "NOT_AVERAGED",
    "STRATEGIES",
]

log = logging.getLogger("fedrank.server")

# reported per node but meaningless as an average
NOT_AVERAGED = frozenset({*NODE_METRICS, *DEVICE_METRICS, "on_train_sets"})
# error kinds after which the server asks the node again what it holds
_ASK_AGAIN = frozenset({"crash", "unavailable", "missing", "stale-scores", "error"})


def weighted_metrics(
    rows: Iterable[Mapping[str, Any]], weights: Iterable[float], weight_key: str
) -> dict[str, float]:
    """Weighted mean of every metric but :data:`NOT_AVERAGED`, each key over the rows where it
    is a finite number (NaN: undefined on that node); adds ``clients`` and the total weight."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    rows, weights = list(rows), [float(w) for w in weights]
    for row, w in zip(rows, weights, strict=True):
        for key, value in row.items():
            if key == weight_key or key in NOT_AVERAGED or isinstance(value, (list, str)):
                continue
            number = float(value)
            if math.isfinite(number):
                sums[key] = sums.get(key, 0.0) + number * w
                totals[key] = totals.get(key, 0.0) + w
    out = {k: sums[k] / totals[k] for k in sums if totals[k] > 0}
    out["clients"] = float(len(rows))
    out[weight_key] = float(sum(weights))
    return out


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """:func:`weighted_metrics` of Flower records (the ``*_metrics_aggr_fn`` signature)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    return MetricRecord(weighted_metrics(rows, [float(r[weight_key]) for r in rows], weight_key))


@dataclass
class TrainPlan:
    """One round's training messages, as :meth:`FedrankStrategyMixin.configure_round` made
    them: what the round sends and what it cost before any node trained."""

    server_round: int
    arrays: ArrayRecord  # the global model the round starts from
    messages: list[Message]  # one per node that trains
    sampled: list[int]  # the nodes drawn (some may not get their teacher scores)
    weight_bytes: dict[int, int]  # per node that trains: the model and its ConfigRecord
    score_bytes: dict[int, int] = field(default_factory=dict)  # teacher scores sent this round
    unserved: list[Rejection] = field(default_factory=list)  # could not get them: no training

    def nodes(self) -> list[int]:
        return [int(m.metadata.dst_node_id) for m in self.messages]

    def only(self, messages: list[Message]) -> TrainPlan:
        """The plan with ``messages`` alone (a subset of its own)."""
        kept = {int(m.metadata.dst_node_id) for m in messages}
        bytes_ = {n: b for n, b in self.weight_bytes.items() if n in kept}
        return TrainPlan(
            self.server_round,
            self.arrays,
            list(messages),
            self.sampled,
            bytes_,
            self.score_bytes,
            self.unserved,
        )


@dataclass
class TrainResult:
    """What one round's aggregation gives: the new global model (None: keep the old one) and
    what the round's report needs."""

    arrays: ArrayRecord | None
    metrics: dict[str, float]  # the replies' metrics, weighted by their (capped) example counts
    clients: list[dict[str, Any]]  # per usable reply: node, bytes, its metrics, weight, norm
    rejected: list[Rejection]  # replies (or missing ones) that were not used, and why
    notes: list[dict[str, Any]]  # what the defences did to a reply (capped, clipped)
    bytes_received: int  # the usable replies' sizes
    budget: dict[str, float] | None = None  # differential privacy: (epsilon, delta) so far


@dataclass
class EvaluationResult:
    """What one round's federated evaluation gives."""

    metrics: dict[str, float] | None  # None: no usable reply
    evaluated: list[int]  # nodes whose reply was used
    rejected: list[Rejection]
    clients: list[dict[str, Any]] = field(default_factory=list)  # per usable reply: node, metrics


def _fingerprint(msg: Message) -> str:
    """A digest of the reply's weights (keys, dtypes, shapes and serialised data), for an
    aggregation order that does not depend on arrival order."""
    h = hashlib.sha256()
    for record in msg.content.array_records.values():
        for key in sorted(record.keys()):
            array = record[key]
            h.update(f"{key}|{array.dtype}|{tuple(array.shape)}|".encode())
            h.update(array.data)
    return h.hexdigest()


class RoundEntryPoints:
    """Flower's ``configure_train``/``aggregate_train`` over fedrank's round methods
    (``configure_round`` -> :class:`TrainPlan`, ``aggregate_round`` -> :class:`TrainResult`).
    Flower passes nothing between the two calls, so the last plan is kept here."""

    _plan: TrainPlan | None = None

    def configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainPlan:
        raise NotImplementedError

    def aggregate_round(self, plan: TrainPlan, replies: Iterable[Message]) -> TrainResult:
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's entry point: :meth:`configure_round`'s messages."""
        self._plan = self.configure_round(server_round, arrays, config, grid)
        return self._plan.messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: :meth:`aggregate_round` of the last plan."""
        if self._plan is None or self._plan.server_round != server_round:
            raise FedrankError(f"round {server_round}: aggregate_train before configure_train")
        result = self.aggregate_round(self._plan, replies)
        return result.arrays, MetricRecord(result.metrics)


class FedrankStrategyMixin(RoundEntryPoints):
    """Bounded sampling, per-node ConfigRecords, screened and defended aggregation,
    bookkeeping (see the module docstring)."""

    policy: ClientConfigPolicy
    nodes: NodeRegistry | None

    def setup_fedrank(
        self,
        policy: ClientConfigPolicy,
        seed: int,
        nodes: NodeRegistry | None = None,
        *,
        min_replies: int = 1,
        defences: Defences | None = None,
        num_nodes_to_select: int = 0,
        scores: ScoreDistributor | None = None,
    ) -> None:
        self.policy = policy
        self.seed = seed
        self.nodes = nodes
        self.min_replies = min_replies
        self.defences = defences or Defences()
        self.select = num_nodes_to_select  # MultiKrum; 0: all but num-malicious-nodes
        self.scores = scores  # teacher scores for the nodes whose settings use them
        self._uses_teacher: dict[tuple, bool] = {}  # loss settings -> whether they need it
        # Flower's configure_train/aggregate_train pass no plan between them: the last one
        self._plan: TrainPlan | None = None
        self._evaluate_sent: list[Message] = []

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, server_round: int, grid: Grid, fraction: float, stage: str) -> list[int]:
        """A seeded sample of ``fraction`` (at least one) of the nodes that may take part."""
        connected = [int(n) for n in grid.get_node_ids()]
        eligible = sorted(self.nodes.eligible(connected) if self.nodes else connected)
        if not eligible:
            return []
        size = max(int(len(eligible) * fraction), 1)
        rng = random.Random(f"fedrank-{stage}-{self.seed}-{server_round}")
        return sorted(rng.sample(eligible, size))

    def _node_info(self, node: int) -> dict[str, Any]:
        return self.nodes.node(node).policy_view() if self.nodes else {}

    def _node_cap(self, node: int, stage: str) -> int | None:
        """The example weight the node's hello allows (None: the server did not ask, or the
        caps are off: ``max-examples-per-node = -1``)."""
        if self.nodes is None or node not in self.nodes.nodes or self.defences.max_examples < 0:
            return None
        info = self.nodes.node(node)
        if not info.confirmed and not info.num_sets:
            return None
        return info.num_train_sets if stage == "train" else info.num_sets

    # ---- training --------------------------------------------------------------------------
    def uses_teacher(self, config: ConfigRecord) -> bool:
        """Whether a node's training settings use the teacher's scores (per loss setup)."""
        settings = {k: config[k] for k in sorted(CLIENT_KEYS) if k in config}
        key = tuple(settings.items())
        if key not in self._uses_teacher:
            cfg = FedrankConfig.from_run_config(settings)
            self._uses_teacher[key] = bool(cfg.composite_loss().needs_teacher)
        return self._uses_teacher[key]

    def configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainPlan:
        """Sample the round's nodes, give each its ConfigRecord, deliver teacher scores to the
        nodes that use them and lack them; nodes that could not get them do not train."""
        config["server-round"] = server_round
        messages: list[Message] = []
        sampled = self.sample(server_round, grid, self.fraction_train, "train")  # type: ignore[attr-defined]
        for node in sampled:
            overrides = self.policy.configure(server_round, node, self._node_info(node))
            overrides = check_overrides(dict(overrides or {}), node)
            node_config = ConfigRecord({**dict(config), **overrides})
            content = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: node_config}  # type: ignore[attr-defined]
            )
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        score_bytes: dict[int, int] = {}
        unserved: list[Rejection] = []
        need = [m.metadata.dst_node_id for m in messages if self.uses_teacher(m.content["config"])]
        if need and self.scores is not None:
            score_bytes, unserved = self.scores.ensure(grid, server_round, need)
            left_out = {r.node_id for r in unserved}
            messages = [m for m in messages if m.metadata.dst_node_id not in left_out]
        weight_bytes = record_nbytes(arrays)
        sizes = {
            int(m.metadata.dst_node_id): weight_bytes + record_nbytes(m.content["config"])
            for m in messages
        }
        return TrainPlan(server_round, arrays, messages, sampled, sizes, score_bytes, unserved)

    def aggregate_round(self, plan: TrainPlan, replies: Iterable[Message]) -> TrainResult:
        """Screen, defend and aggregate the replies to ``plan``'s messages.

        :class:`NotEnoughReplies` (naming every failed node) when fewer than ``min-replies``
        (or what the robust rule needs) are usable.
        """
        server_round, global_arrays = plan.server_round, plan.arrays
        screened = screen_replies(
            server_round,
            list(replies),
            global_arrays=global_arrays,
            sent=plan.messages,
            min_replies=0,
            stage="train",
            logger=log,
        )
        prepared, refused = prepare_updates(
            [(screened.node(m), m) for m in screened.valid],
            global_arrays,
            self.defences,
            lambda n: self._node_cap(n, "train"),
        )
        rejected = screened.rejected + refused
        self._after_failures(rejected)
        needed = max(self.min_replies, robust_minimum(self._rule(), self._rule_options()))
        if len(prepared) < needed:
            raise NotEnoughReplies(
                not_enough(server_round, len(prepared), needed, "train", rejected)
            )
        prepared.sort(key=lambda p: _fingerprint(p.message))
        clients, notes = self._book_train(server_round, prepared)
        self._before_aggregation(len(prepared))
        # the Flower strategy's own aggregation: the class after the entry points in the MRO
        flower = super(RoundEntryPoints, self)
        arrays, _ = flower.aggregate_train(server_round, [p.message for p in prepared])  # type: ignore[misc]
        metrics = weighted_metrics(
            [p.metrics for p in prepared], [p.weight for p in prepared], "num_examples"
        )
        received = sum(p.nbytes for p in prepared)
        if arrays is not None:
            problem = finite(arrays)
            if problem:  # cannot happen with screened, capped inputs; never let it through
                log.warning("round %d: %s; the global model is kept", server_round, problem)
                arrays = None
            else:
                arrays = self._keep_integer_buffers(arrays, global_arrays)
        return TrainResult(arrays, metrics, clients, rejected, notes, received)

    def _book_train(
        self, server_round: int, prepared: list[Prepared]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per-node rows and defence notes of the usable replies; the policy sees each."""
        clients: list[dict[str, Any]] = []
        notes: list[dict[str, Any]] = []
        for p in prepared:
            clients.append(
                {
                    "node": p.node,
                    "bytes": p.nbytes,
                    **p.metrics,
                    "weight": p.weight,
                    "update_norm": p.norm,
                    "clipped": int(p.clipped),
                }
            )
            for note in p.notes:
                notes.append({"node": p.node, "note": note})
                log.info("round %d: node %d: %s", server_round, p.node, note)
            self.policy.observe(server_round, p.node, p.metrics)
        return clients, notes

    def _rule(self) -> str:
        return str(getattr(self, "rule_name", "fedavg"))

    def _rule_options(self) -> dict[str, Any]:
        return {"num-malicious-nodes": int(getattr(self, "num_malicious_nodes", 0))}

    def _before_aggregation(self, usable: int) -> None:
        """Per-round settings of a robust rule (MultiKrum averages all but ``f`` by default)."""
        if self._rule() == "multikrum":
            f = int(getattr(self, "num_malicious_nodes", 0))
            self.num_nodes_to_select = self.select or max(1, usable - f)

    def _after_failures(self, rejected: Iterable[Rejection]) -> None:
        """Exclude nodes whose failure is persistent; ask nodes that crashed, did not reply or
        lost their cached state again what they hold before they next train."""
        if self.nodes is None:
            return
        for r in rejected:
            if r.kind in PERSISTENT_ERRORS:
                self.nodes.exclude(r.node_id, f"{r.message_type}: {r.kind}: {r.reason}")
            elif r.kind in _ASK_AGAIN:
                self.nodes.forget(r.node_id)

    @staticmethod
    def _keep_integer_buffers(arrays: ArrayRecord, previous: ArrayRecord) -> ArrayRecord:
        out = ArrayRecord()
        for key in previous:
            old = array_numpy(previous[key])
            if key not in arrays:
                raise CheckpointError(f"aggregated weights lack key {key!r}")
            if old.dtype.kind in "iub":
                out[key] = Array(np.array(old))
            else:
                out[key] = Array(np.asarray(array_numpy(arrays[key]), dtype=old.dtype))
        return out

    # ---- evaluation ------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        fraction = float(self.fraction_evaluate)  # type: ignore[attr-defined]
        messages: list[Message] = []
        if fraction > 0:
            config["server-round"] = server_round
            for node in self.sample(server_round, grid, fraction, "evaluate"):
                content = RecordDict(
                    {self.arrayrecord_key: arrays, self.configrecord_key: config}  # type: ignore[attr-defined]
                )
                messages.append(Message(content, dst_node_id=node, message_type="evaluate"))
        self._evaluate_sent = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's entry point: :meth:`aggregate_evaluation` of the last messages sent."""
        result = self.aggregate_evaluation(server_round, self._evaluate_sent, replies)
        return MetricRecord(result.metrics) if result.metrics is not None else None

    def aggregate_evaluation(
        self, server_round: int, sent: list[Message], replies: Iterable[Message]
    ) -> EvaluationResult:
        """The evaluation replies to ``sent``, screened and averaged by (capped) example
        counts; federated evaluation is informative, it never stops the run."""
        screened = screen_replies(
            server_round,
            list(replies),
            sent=sent,
            min_replies=0,
            stage="evaluate",
            logger=log,
        )
        self._after_failures(screened.rejected)
        evaluated = sorted(screened.node(m) for m in screened.valid)
        rows, weights, clients = [], [], []
        for msg in screened.valid:
            metrics = dict(msg.content["metrics"])
            cap = self._node_cap(screened.node(msg), "evaluate")
            claimed = float(metrics["num_examples"])
            weights.append(min(claimed, float(cap)) if cap else claimed)
            rows.append(metrics)
            clients.append({"node": screened.node(msg), **metrics})
        averaged = None
        if any(w > 0 for w in weights):
            averaged = weighted_metrics(rows, weights, "num_examples")
        clients.sort(key=lambda c: c["node"])
        return EvaluationResult(averaged, evaluated, screened.rejected, clients)


class FedrankFedAvg(FedrankStrategyMixin, FedAvg):
    """FedAvg with per-node ConfigRecords."""

    rule_name = "fedavg"


class FedrankFedProx(FedrankStrategyMixin, FedProx):
    """FedProx (clients add ``proximal-mu / 2 * ||w - w_global||^2``)."""

    rule_name = "fedprox"


class FedrankFedAdam(FedrankStrategyMixin, FedAdam):
    """FedAdam: server-side Adam on the averaged update."""

    rule_name = "fedadam"

    def configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainPlan:
        # FedOpt's bookkeeping: the model the round starts from (its Adam step needs it)
        self.current_arrays = {k: array_numpy(array) for k, array in arrays.items()}
        return super().configure_round(server_round, arrays, config, grid)


class FedrankFedTrimmedAvg(FedrankStrategyMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the client weights."""

    rule_name = "fedtrimmedavg"


class FedrankFedMedian(FedrankStrategyMixin, FedMedian):
    """Coordinate-wise median of the client weights (Yin et al., 2018)."""

    rule_name = "fedmedian"


class FedrankKrum(FedrankStrategyMixin, Krum):
    """Krum: the one update closest to its ``n - f - 2`` nearest others (Blanchard et al.)."""

    rule_name = "krum"


class FedrankMultiKrum(FedrankStrategyMixin, MultiKrum):
    """MultiKrum: the average of the ``num-nodes-to-select`` updates Krum scores best."""

    rule_name = "multikrum"


class FedrankBulyan(FedrankStrategyMixin, Bulyan):
    """Bulyan: MultiKrum selection, then a coordinate-wise trimmed mean (El Mhamdi et al.)."""

    rule_name = "bulyan"


STRATEGIES: dict[str, type[FedrankStrategyMixin]] = {
    "fedavg": FedrankFedAvg,
    "fedprox": FedrankFedProx,
    "fedadam": FedrankFedAdam,
    "fedtrimmedavg": FedrankFedTrimmedAvg,
    "fedmedian": FedrankFedMedian,
    "krum": FedrankKrum,
    "multikrum": FedrankMultiKrum,
    "bulyan": FedrankBulyan,
}


def build_strategy(
    config: FedrankConfig,
    policy: ClientConfigPolicy,
    nodes: NodeRegistry | None = None,
    *,
    max_examples: int | None = None,
    scores: ScoreDistributor | None = None,
) -> FedrankStrategyMixin:
    """The strategy named by ``strategy``, set up with ``policy`` and the run's ``nodes`` (the
    registry that says which nodes may be sampled and what each reported at hello; None: every
    connected node, no hello caps). ``max_examples`` is the per-run cap of a node's example
    weight (default: ``max-examples-per-node``); ``scores`` delivers the teacher's scores to
    the sampled nodes that use them (None: no teacher)."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "weighted_by_key": "num_examples",
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_available_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    name = config.strategy
    if name not in STRATEGIES:  # FedrankConfig validates the name; this guards misuse
        raise FedrankError(f"'strategy' {name!r} is unknown; valid: {', '.join(STRATEGIES)}")
    options: dict[str, Any] = {}
    if name == "fedprox":
        options = {"proximal_mu": config.proximal_mu}
    elif name == "fedadam":
        options = {
            "eta": config.server_learning_rate,
            "eta_l": config.learning_rate,
            "beta_1": config.server_beta1,
            "beta_2": config.server_beta2,
            "tau": config.server_tau,
        }
    elif name == "fedtrimmedavg":
        options = {"beta": config.trim_beta}
    elif name in ("krum", "multikrum", "bulyan"):
        options = {"num_malicious_nodes": config.num_malicious_nodes}
    strategy = STRATEGIES[name](**common, **options)
    limit = config.max_examples_per_node if max_examples is None else max_examples
    strategy.setup_fedrank(
        policy,
        config.seed,
        nodes,
        min_replies=config.min_replies,
        defences=Defences(
            max_update_norm=config.max_update_norm,
            max_examples=int(limit),
            update_norm_ratio=config.update_norm_ratio,
        ),
        num_nodes_to_select=config.num_nodes_to_select,
        scores=scores,
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
