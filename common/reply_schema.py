"""The fixed shape of every reply a node sends, defined once for both sides.

The ClientApp builds its replies with these definitions and the server checks every reply
against the same definitions, so a reply either fits or costs its node (never the run):

- **metrics** of ``train`` and ``evaluate`` replies: :data:`TRAIN_METRICS` and
  :data:`EVALUATE_METRICS` (:class:`MetricSchema`): required keys plus optional groups that
  come all or nothing (``validation`` when the server asks for it, ``teacher`` agreement
  metrics when the node holds the current teacher scores, ...). A missing or extra key is a
  rejection of that node's reply, not an inconsistent round. A value is a number; NaN means
  "undefined on this node" (e.g. AUC on sets without a pair of differing labels) and is left
  out of that key's average; infinity is refused;
- the **hello** status (:class:`HelloStatus`) and the **scores acknowledgement**
  (:class:`ScoresAck`), each with typed, bounded fields;
- **node errors** travel as Flower's ``Message.error`` with a fedrank code
  (:data:`NODE_ERROR_CODES`): the server reads the kind from the code, never from the text.

The training metrics come from ``fedrank.client.trainer.train_student`` (:data:`TRAINER_METRICS`),
the loss terms of the composite loss (:data:`LOSS_METRICS`), the device caps
(:data:`DEVICE_METRICS`) and the node (:data:`NODE_METRICS`). A new training metric is added
to one of these lists and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, MetricRecord

from fedrank.common.config import LOSS_KEYS
from fedrank.common.errors import FedrankError

__all__ = [
    "EVALUATE_METRICS",
    "HelloStatus",
    "MAX_COUNT",
    "MetricSchema",
    "NODE_ERROR_CODES",
    "PERSISTENT_ERRORS",
    "PROTOCOL",
    "ReplySchemaError",
    "ScoresAck",
    "TRAIN_METRICS",
    "TRAINER_METRICS",
    "error_kind",
    "metric_key",
]

# bump when a definition below changes: a node speaking another protocol is excluded at hello
# (3: metric keys in snake_case)
PROTOCOL = 3

# counts and ids must stay exact in a float64 (MetricRecord) and small enough to sum safely
MAX_COUNT = 2**40


class ReplySchemaError(FedrankError):
    """A reply does not fit its schema (the message names the key and what was expected)."""


# ---- node errors -----------------------------------------------------------------------------
# Flower's own codes are 0..8 (flwr.common.constant.ErrorCode); a ClientApp that raises
# anything else arrives with Flower's code 2 and counts as a crash
NODE_ERROR_CODES: dict[str, int] = {
    "error": 1100,  # any other fedrank error on the node
    "node-config": 1101,  # the device's --node-config is invalid
    "data": 1102,  # the device's data cannot be read or does not fit the federation
    "device-cap": 1103,  # the server asks for more than the device allows
    "stale-scores": 1104,  # the node lacks the current teacher scores (e.g. restarted)
    "scores": 1105,  # the teacher scores sent do not match the node's sets
    "settings": 1106,  # the settings the server sent this node are invalid
    "protocol": 1107,  # the node speaks another reply protocol (an older fedrank)
}
# kinds that will not go away by asking again: the node is excluded from the run
PERSISTENT_ERRORS = frozenset({"node-config", "data", "device-cap", "protocol"})
_KINDS = {code: kind for kind, code in NODE_ERROR_CODES.items()}


# Flower's codes for a node or message the SuperLink could not reach
_UNAVAILABLE = frozenset({3, 4, 5})


def error_kind(code: int) -> str:
    """The kind of a node error code: a fedrank kind, ``unavailable`` (Flower could not reach
    the node) or ``crash`` (the ClientApp raised, or any code fedrank does not know)."""
    if int(code) in _UNAVAILABLE:
        return "unavailable"
    return _KINDS.get(int(code), "crash")


# ---- metrics ---------------------------------------------------------------------------------
def metric_key(key: str) -> str:
    """A metric key in fedrank's one style, snake_case (``loss-total`` -> ``loss_total``);
    configuration keys and record fields stay hyphenated, as Flower writes them."""
    return key.replace("-", "_")


# what fedrank.client.trainer.train_student reports besides the loss terms
TRAINER_METRICS = (
    "steps",
    "steps_planned",
    "relative_update",
    "too_short",
    "stopped_by_time",
    "num_examples",
    "num_items",
    "train_seconds",
)
# one value per loss family of the composite loss, plus their weighted total
LOSS_METRICS = tuple(f"loss_{family}" for family in LOSS_KEYS) + ("loss_total",)
# what the device used (fedrank.client.device.DeviceSettings.report)
DEVICE_METRICS = (
    "device_threads",
    "device_batch_size",
    "device_max_steps",
    "device_max_seconds",
    "device_memory_mb",
    "device_max_epochs",
)
NODE_METRICS = ("scores_received", "client_key")
VALIDATION_METRICS = ("val_ndcg@10_start", "val_ndcg@10")
# ranking metrics from the labels (fedrank.common.metrics.ranking_summary without a teacher)
LABEL_METRICS = (
    "ndcg@1",
    "ndcg@5",
    "ndcg@10",
    "map",
    "mrr",
    "precision@10",
    "pairwise_accuracy",
    "auc",
    "log_loss",
    "ece",
)
AGREEMENT_METRICS = ("kendall_tau", "spearman", "topk_overlap@10")
# whole numbers: counts, flags and ids (NaN is refused for these)
_INTEGERS = frozenset(
    {
        "num_examples",
        "num_items",
        "stopped_by_time",
        "scores_received",
        "client_key",
        "device_threads",
        "device_batch_size",
        "device_max_steps",
        "device_max_epochs",
        "on_train_sets",
    }
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass(frozen=True)
class MetricSchema:
    """The metric keys of one message type's replies.

    ``required`` keys are always present; each of ``groups`` is present completely or not at
    all. ``weight_key`` must be a positive whole number (the example count).
    """

    message_type: str
    required: tuple[str, ...]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    weight_key: str = "num_examples"

    def keys(self) -> tuple[str, ...]:
        """Every key a reply may hold."""
        out = list(self.required)
        for keys in self.groups.values():
            out += keys
        return tuple(out)

    def record(self, values: Mapping[str, Any]) -> MetricRecord:
        """The reply's MetricRecord from ``values`` (the node's side): exactly the schema's
        keys, groups inferred from the keys present; non-finite values become NaN.

        Raises :class:`ReplySchemaError` naming the key when ``values`` lacks a required key,
        holds part of a group or a key the schema does not know (add new metrics to the lists
        in this module).
        """
        unknown = sorted(k for k in values if k not in self.keys())
        if unknown:
            raise ReplySchemaError(
                f"{self.message_type} metric {unknown[0]!r} is not in fedrank.common.reply_schema "
                f"(add it to the {self.message_type} schema there); known: {self.keys()}"
            )
        problem = self._shape(values)
        if problem:
            raise ReplySchemaError(f"{self.message_type} reply: {problem}")
        out: dict[str, int | float] = {}
        for key, value in values.items():
            number = _number(value)
            if number is None:
                raise ReplySchemaError(f"{self.message_type} metric {key!r} is not a number")
            if key in _INTEGERS:
                out[key] = int(value)
            else:
                out[key] = number if math.isfinite(number) else math.nan
        return MetricRecord(out)

    def problem(self, metrics: Mapping[str, Any]) -> str | None:
        """Why ``metrics`` (a reply's MetricRecord) does not fit, or None (the server's side)."""
        extra = sorted(k for k in metrics if k not in self.keys())
        if extra:
            return f"metrics hold unexpected key {extra[0]!r} ({len(extra)} unexpected)"
        problem = self._shape(metrics)
        if problem:
            return problem
        for key, value in metrics.items():
            number = _number(value)
            if number is None:
                return f"metric {key!r} must be a number, got {type(value).__name__}"
            if math.isinf(number):
                return f"metric {key!r} is infinite"
            if key in _INTEGERS and not (number.is_integer() and abs(number) <= MAX_COUNT):
                return f"metric {key!r} must be a whole number up to {MAX_COUNT}, got {value!r}"
        weight = float(metrics[self.weight_key])
        if not weight > 0:
            return f"metric {self.weight_key!r} must be positive, got {metrics[self.weight_key]!r}"
        return None

    def _shape(self, values: Mapping[str, Any]) -> str | None:
        missing = [k for k in self.required if k not in values]
        if missing:
            return f"metrics lack {missing[0]!r} ({len(missing)} missing)"
        for name, keys in self.groups.items():
            present = [k for k in keys if k in values]
            if present and len(present) != len(keys):
                lacking = next(k for k in keys if k not in values)
                return f"metrics hold part of the {name!r} group: {lacking!r} is missing"
        return None


TRAIN_METRICS = MetricSchema(
    "train",
    required=LOSS_METRICS + TRAINER_METRICS + DEVICE_METRICS + NODE_METRICS,
    groups={"validation": VALIDATION_METRICS},
)
EVALUATE_METRICS = MetricSchema(
    "evaluate",
    required=LABEL_METRICS + ("num_examples", "on_train_sets"),
    groups={
        "teacher": AGREEMENT_METRICS,  # the node holds the current teacher scores
        "loss": LOSS_METRICS,  # the loss could be computed (teacher held, or not needed)
        "relevance": ("true_ndcg@10",),  # synthetic data keeps the true relevance
    },
)


# ---- hello and scores acknowledgement --------------------------------------------------------
def _get(record: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in record:
        raise ReplySchemaError(f"{what} lacks {key!r}")
    value = record[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReplySchemaError(f"{what} {key!r} must be an integer, got {value!r}")
        if not 0 <= value <= MAX_COUNT:
            raise ReplySchemaError(f"{what} {key!r} must lie in [0, {MAX_COUNT}], got {value}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ReplySchemaError(f"{what} {key!r} must be true or false, got {value!r}")
    elif not isinstance(value, kind):
        raise ReplySchemaError(f"{what} {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _no_extra(record: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    extra = sorted(set(record) - set(keys))
    if extra:
        raise ReplySchemaError(f"{what} holds unexpected key {extra[0]!r}")


@dataclass(frozen=True)
class HelloStatus:
    """What a node reports when the server first hears from it (``query.hello``)."""

    held_version: str  # teacher-score version it holds ("none")
    num_sets: int  # sets it holds (training + held-out)
    num_train_sets: int  # sets it trains on: the most example weight it can claim
    client_key: int  # a stable id (simulated partition, or a checksum of the data path)
    source: str  # where its data comes from, for logs
    max_parameters: int = 0  # the device's cap on the student's size (0: none)
    set_ids: tuple[str, ...] | None = None  # its set ids (targeted score mode)
    protocol: int = PROTOCOL

    _KEYS = (
        "protocol",
        "held-version",
        "num-sets",
        "num-train-sets",
        "client-key",
        "source",
        "max-parameters",
    )

    def record(self) -> ConfigRecord:
        values: dict[str, Any] = {
            "protocol": self.protocol,
            "held-version": self.held_version,
            "num-sets": self.num_sets,
            "num-train-sets": self.num_train_sets,
            "client-key": self.client_key,
            "source": self.source,
            "max-parameters": self.max_parameters,
        }
        if self.set_ids is not None:
            values["set-ids"] = list(self.set_ids)
        return ConfigRecord(values)

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> HelloStatus:
        """Read a hello status; ReplySchemaError naming the field when it does not fit."""
        what = "hello status"
        protocol = _get(record, "protocol", int, what)
        if protocol != PROTOCOL:
            raise ReplySchemaError(
                f"the node speaks reply protocol {protocol}, the server {PROTOCOL}: "
                "install the server's fedrank version on the node"
            )
        _no_extra(record, [*cls._KEYS, "set-ids"], what)
        status = cls(
            held_version=_get(record, "held-version", str, what),
            num_sets=_get(record, "num-sets", int, what),
            num_train_sets=_get(record, "num-train-sets", int, what),
            client_key=_get(record, "client-key", int, what),
            source=_get(record, "source", str, what)[:200],
            max_parameters=_get(record, "max-parameters", int, what),
        )
        if status.num_train_sets > status.num_sets:
            raise ReplySchemaError(
                f"{what}: 'num-train-sets' {status.num_train_sets} exceeds 'num-sets' "
                f"{status.num_sets}"
            )
        if "set-ids" in record:
            ids = record["set-ids"]
            if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
                raise ReplySchemaError(f"{what} 'set-ids' must be a list of strings")
            if len(ids) != status.num_sets:
                raise ReplySchemaError(
                    f"{what} lists {len(ids)} set ids but 'num-sets' is {status.num_sets}"
                )
            if len(set(ids)) != len(ids):
                raise ReplySchemaError(f"{what} 'set-ids' lists a set more than once")
            status = dataclasses.replace(status, set_ids=tuple(ids))
        return status


@dataclass(frozen=True)
class ScoresAck:
    """A node's acknowledgement of the teacher scores it cached (``query.scores``)."""

    version: str
    num_sets: int
    local_sets: int
    exact_match: bool
    received_count: int

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "version": self.version,
                "num-sets": self.num_sets,
                "local-sets": self.local_sets,
                "exact-match": self.exact_match,
                "received-count": self.received_count,
            }
        )

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> ScoresAck:
        what = "scores acknowledgement"
        keys = ("version", "num-sets", "local-sets", "exact-match", "received-count")
        _no_extra(record, keys, what)
        return cls(
            version=_get(record, "version", str, what),
            num_sets=_get(record, "num-sets", int, what),
            local_sets=_get(record, "local-sets", int, what),
            exact_match=_get(record, "exact-match", bool, what),
            received_count=_get(record, "received-count", int, what),
        )
