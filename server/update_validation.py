"""Screening of client replies before aggregation: bad or missing replies never reach the model.

A federation must survive clients that crash, time out or send garbage. :func:`screen_replies`
splits one step's replies into those fit for aggregation and rejections (:class:`Rejection`:
node id, message type, kind and reason), and logs every rejection. A training reply is
rejected when

- it carries an error: the kind comes from the error's code (``fedrank.common.reply_schema``:
  ``stale-scores``, ``data``, ``node-config``, ... for fedrank's own errors, ``unavailable``
  when Flower could not reach the node, ``crash`` for anything else), never from its text;
- it lacks the ``arrays`` ArrayRecord or the ``metrics`` MetricRecord, or holds others;
- its metrics do not fit :data:`~fedrank.common.reply_schema.TRAIN_METRICS` (a missing or extra key,
  a non-number, infinity, a count that is not a positive whole number);
- its weights miss a key of the global model, add a key, change a shape, hold NaN/inf, change
  an integer buffer (the student's feature columns), or have a non-numeric dtype.

Evaluation replies are checked against :data:`~fedrank.common.reply_schema.EVALUATE_METRICS`. Nodes
that were sent a message but did not reply before the round's timeout are reported as
``missing``. When fewer than ``min_replies`` replies are fit, :class:`NotEnoughReplies` (a
:class:`~fedrank.common.errors.FedrankError`) names every failed node and why; otherwise the round
goes on with the others, and the global model is untouched by what was rejected.

Nothing here depends on a strategy: a strategy's ``aggregate_train`` screens first and passes
only the valid replies on (after the defences of :mod:`fedrank.server.defences`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from fedrank.common.errors import FedrankError
from fedrank.common.records import array_numpy, weights_problem
from fedrank.common.reply_schema import EVALUATE_METRICS, TRAIN_METRICS, MetricSchema, error_kind

__all__ = [
    "NotEnoughReplies",
    "not_enough",
    "Rejection",
    "ScreenResult",
    "check_train_reply",
    "check_evaluate_reply",
    "screen_replies",
]

log = logging.getLogger("fedrank")


class NotEnoughReplies(FedrankError):
    """Fewer usable replies than the configured minimum; the message lists the failures."""


@dataclass(frozen=True)
class Rejection:
    """A reply (or a missing one) that was not used, and why.

    ``kind``: an error kind of :func:`fedrank.common.reply_schema.error_kind`, ``invalid`` (the
    reply does not fit its schema) or ``missing`` (no reply in time). ``excluded``: the node is left
    out of the rest of the run.
    """

    node_id: int
    reason: str
    kind: str
    message_type: str = "train"
    excluded: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {
            "node": int(self.node_id),
            "message_type": self.message_type,
            "kind": self.kind,
            "reason": self.reason,
        }
        if self.excluded:
            out["excluded"] = True
        return out


@dataclass
class ScreenResult:
    """Replies fit for aggregation and everything that was set aside."""

    valid: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    node_of: dict[str, int] = field(default_factory=dict)  # reply message id -> node id

    @property
    def failed_nodes(self) -> list[int]:
        return [r.node_id for r in self.rejected]

    def node(self, msg: Message) -> int:
        """The node a valid reply answers for."""
        return self.node_of.get(msg.metadata.message_id, int(msg.metadata.src_node_id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid_nodes": [self.node(m) for m in self.valid],
            "rejected": [r.to_dict() for r in self.rejected],
        }


def _single(content: RecordDict, kind: str, key: str) -> tuple[Any, str | None]:
    records = content.array_records if kind == "array" else content.metric_records
    if key in records and len(records) == 1:
        return records[key], None
    if not records:
        return None, f"reply has no {kind} record (expected {key!r})"
    names = sorted(records)
    if key not in records:
        return None, f"reply has {kind} record(s) {names}, expected {key!r}"
    return None, f"reply has {len(names)} {kind} records {names}, expected only {key!r}"


def _check_content_names(content: RecordDict, allowed: tuple[str, ...]) -> str | None:
    extra = sorted(n for n in content if n not in allowed)
    if extra:
        return f"reply holds unexpected record {extra[0]!r} (expected {list(allowed)})"
    return None


def check_train_reply(
    content: RecordDict,
    global_arrays: ArrayRecord,
    *,
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
    schema: MetricSchema = TRAIN_METRICS,
) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can."""
    problem = _check_content_names(content, (arrays_key, metrics_key))
    if problem:
        return problem
    arrays, problem = _single(content, "array", arrays_key)
    if problem:
        return problem
    metrics, problem = _single(content, "metric", metrics_key)
    if problem:
        return problem
    problem = schema.problem(metrics)
    if problem:
        return problem
    expected = {k: array_numpy(global_arrays[k]) for k in global_arrays}
    return weights_problem(dict(arrays.items()), expected, fixed_integers=True)


def check_evaluate_reply(
    content: RecordDict, *, metrics_key: str = "metrics", schema: MetricSchema = EVALUATE_METRICS
) -> str | None:
    """Why an evaluation reply cannot be aggregated, or None if it can."""
    problem = _check_content_names(content, (metrics_key,))
    if problem:
        return problem
    metrics, problem = _single(content, "metric", metrics_key)
    if problem:
        return problem
    return schema.problem(metrics)


def screen_replies(
    server_round: int,
    replies: Iterable[Message],
    *,
    global_arrays: ArrayRecord | None = None,
    sent: Iterable[Message] = (),
    expected_nodes: Iterable[int] = (),
    min_replies: int = 1,
    stage: str = "train",
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
    logger: logging.Logger | None = None,
) -> ScreenResult:
    """Split ``replies`` into usable ones and rejections (see the module docstring).

    ``global_arrays`` is the model sent this round (required for ``stage="train"``).
    ``sent`` are the messages sent this round (after sending they carry their message ids):
    a reply is attributed to the node its message went to, also when the SuperLink itself
    answered for an unreachable node (such error replies come from the SuperLink's node id),
    and nodes without a reply are reported as missing. ``expected_nodes`` (node ids) does the
    latter when the messages are not at hand. A second reply for the same node is rejected.
    Raises :class:`NotEnoughReplies` when fewer than ``min_replies`` replies are usable.
    """
    if stage not in ("train", "evaluate"):
        raise ValueError(f"stage must be 'train' or 'evaluate', got {stage!r}")
    if stage == "train" and global_arrays is None:
        raise ValueError("screen_replies(stage='train') needs the round's global_arrays")
    out = logger or log
    result = ScreenResult()
    destination = {
        m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id
    }
    expected = list(dict.fromkeys([*destination.values(), *(int(n) for n in expected_nodes)]))
    seen: set[int] = set()
    for msg in replies:
        node = destination.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
        if node in seen:
            result.rejected.append(Rejection(node, "a second reply this round", "invalid", stage))
            continue
        seen.add(node)
        if msg.has_error():
            error = msg.error
            kind = error_kind(error.code)
            reason = f"{error.reason} (code {error.code})"
            result.rejected.append(Rejection(node, reason, kind, stage))
            continue
        try:
            if stage == "train":
                assert global_arrays is not None
                problem = check_train_reply(
                    msg.content, global_arrays, arrays_key=arrays_key, metrics_key=metrics_key
                )
            else:
                problem = check_evaluate_reply(msg.content, metrics_key=metrics_key)
        except Exception as err:  # a reply must never crash the server
            problem = f"reply cannot be checked: {type(err).__name__}: {err}"
        if problem:
            result.rejected.append(Rejection(node, problem, "invalid", stage))
        else:
            result.valid.append(msg)
            result.node_of[msg.metadata.message_id] = node
    for node in expected:
        if node not in seen:
            result.rejected.append(
                Rejection(node, "no reply before the round's timeout", "missing", stage)
            )
    for rejection in result.rejected:
        out.warning(
            "round %d: %s reply of node %d rejected (%s): %s",
            server_round,
            stage,
            rejection.node_id,
            rejection.kind,
            rejection.reason,
        )
    if len(result.valid) < min_replies:
        raise NotEnoughReplies(
            not_enough(server_round, len(result.valid), min_replies, stage, result.rejected)
        )
    return result


def not_enough(
    server_round: int, usable: int, min_replies: int, stage: str, rejected: Iterable[Rejection]
) -> str:
    """The one-line reason a round stops: too few usable replies, and every failure."""
    failures = "; ".join(f"node {r.node_id}: {r.kind}: {r.reason}" for r in rejected)
    return (
        f"round {server_round}: only {usable} usable {stage} replies, 'min-replies' is "
        f"{min_replies}" + (f" (failures: {failures})" if failures else "")
    )
