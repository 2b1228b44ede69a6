"""Screening of client replies before aggregation: bad or missing replies never reach the model.

A federation must survive clients that crash, time out or send garbage. :func:`screen_replies`
splits one round's replies into those fit for aggregation and rejections, each with the node id
and a reason, and logs every rejection. A training reply is rejected when

- it carries an error (the ClientApp raised, the node crashed or the run was stopped there);
- it lacks the ``arrays`` ArrayRecord or its ``metrics`` MetricRecord, or holds several;
- its weights miss a key of the global model, add a key, change a shape, hold NaN/inf, change
  an integer buffer (the student's feature columns), or have a non-numeric dtype;
- its example count (``num-examples``) is missing, not a positive finite number;
- optionally, the update ``||w - w_global||`` exceeds ``max_update_norm``.

Nodes that were sent a message but did not reply before the round's timeout are reported as
missing. When fewer than ``min_replies`` replies are fit, :class:`NotEnoughReplies` (a
:class:`~common.errors.FedrankError`) names every failed node and why; otherwise the round goes
on with the others, and the global model is untouched by what was rejected.

Nothing here depends on a strategy: a strategy's ``aggregate_train`` calls
``screen_replies(...).valid`` first and passes only those to the aggregation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common.errors import FedrankError

__all__ = [
    "NotEnoughReplies",
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
    """A reply (or a missing one) that was not used, and why."""

    node_id: int
    reason: str
    kind: str  # "error" (the client failed), "invalid" (bad content), "missing" (no reply)

    def to_dict(self) -> dict[str, Any]:
        return {"node": int(self.node_id), "kind": self.kind, "reason": self.reason}


@dataclass
class ScreenResult:
    """Replies fit for aggregation and everything that was set aside."""

    valid: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def failed_nodes(self) -> list[int]:
        return [r.node_id for r in self.rejected]

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid_nodes": [int(m.metadata.src_node_id) for m in self.valid],
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


def _check_weight(metrics: Mapping[str, Any], weight_key: str) -> str | None:
    if weight_key not in metrics:
        return f"metrics lack {weight_key!r}"
    value = metrics[weight_key]
    if isinstance(value, (list, tuple, bool)):
        return f"metric {weight_key!r} must be a number, got {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"metric {weight_key!r} must be a number, got {value!r}"
    if not math.isfinite(number) or number <= 0:
        return f"metric {weight_key!r} must be a positive finite number, got {value!r}"
    return None


def check_train_reply(
    content: RecordDict,
    global_arrays: ArrayRecord,
    *,
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
    weight_key: str = "num-examples",
    max_update_norm: float | None = None,
) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can."""
    arrays, problem = _single(content, "array", arrays_key)
    if problem:
        return problem
    metrics, problem = _single(content, "metric", metrics_key)
    if problem:
        return problem
    problem = _check_weight(metrics, weight_key)
    if problem:
        return problem
    expected = list(global_arrays.keys())
    missing = [k for k in expected if k not in arrays]
    if missing:
        return f"weights miss key {missing[0]!r} ({len(missing)} of {len(expected)} missing)"
    extra = [k for k in arrays if k not in global_arrays]
    if extra:
        return f"weights hold unexpected key {extra[0]!r} ({len(extra)} unexpected)"
    squared = 0.0
    for key in expected:
        old = global_arrays[key].numpy()
        try:
            new = arrays[key].numpy()
        except Exception as err:  # undecodable array bytes
            return f"weights key {key!r} cannot be decoded: {type(err).__name__}: {err}"
        if tuple(new.shape) != tuple(old.shape):
            return f"weights key {key!r} has shape {tuple(new.shape)}, expected {tuple(old.shape)}"
        if new.dtype.kind not in "fiub":
            return f"weights key {key!r} has unsupported dtype {new.dtype}"
        if new.dtype.kind == "f" and not np.all(np.isfinite(new)):
            bad = int(np.size(new) - np.count_nonzero(np.isfinite(new)))
            return f"weights key {key!r} holds {bad} non-finite value(s) (NaN or inf)"
        if old.dtype.kind in "iub":
            if not np.array_equal(new, old):
                return f"integer buffer {key!r} differs from the global model's"
            continue
        if max_update_norm is not None:
            diff = new.astype(np.float64) - old.astype(np.float64)
            squared += float(np.sum(diff * diff))
    if max_update_norm is not None:
        norm = math.sqrt(squared)
        if not norm <= max_update_norm:
            return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:.4g}"
    return None


def check_evaluate_reply(
    content: RecordDict, *, metrics_key: str = "metrics", weight_key: str = "num-examples"
) -> str | None:
    """Why an evaluation reply cannot be aggregated, or None if it can."""
    metrics, problem = _single(content, "metric", metrics_key)
    if problem:
        return problem
    problem = _check_weight(metrics, weight_key)
    if problem:
        return problem
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metric {key!r} is not finite: {value!r}"
    return None


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
    weight_key: str = "num-examples",
    max_update_norm: float | None = None,
    logger: logging.Logger | None = None,
) -> ScreenResult:
    """Split ``replies`` into usable ones and rejections (see the module docstring).

    ``global_arrays`` is the model sent this round (required for ``stage="train"``).
    ``sent`` are the messages sent this round (after sending they carry their message ids):
    a reply is attributed to the node its message went to, also when the SuperLink itself
    answered for an unreachable node (such error replies come from the SuperLink's node id),
    and nodes without a reply are reported as missing. ``expected_nodes`` (node ids) does the
    latter when the messages are not at hand. Raises :class:`NotEnoughReplies` when fewer
    than ``min_replies`` replies are usable.
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
        seen.add(node)
        if msg.has_error():
            error = msg.error
            reason = f"client error (code {error.code}): {error.reason}"
            result.rejected.append(Rejection(node, reason, "error"))
            continue
        try:
            if stage == "train":
                assert global_arrays is not None
                problem = check_train_reply(
                    msg.content,
                    global_arrays,
                    arrays_key=arrays_key,
                    metrics_key=metrics_key,
                    weight_key=weight_key,
                    max_update_norm=max_update_norm,
                )
            else:
                problem = check_evaluate_reply(
                    msg.content, metrics_key=metrics_key, weight_key=weight_key
                )
        except Exception as err:  # a reply must never crash the server
            problem = f"reply cannot be checked: {type(err).__name__}: {err}"
        if problem:
            result.rejected.append(Rejection(node, problem, "invalid"))
        else:
            result.valid.append(msg)
    for node in expected:
        if node not in seen:
            result.rejected.append(
                Rejection(node, "no reply before the round's timeout", "missing")
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
        failures = "; ".join(f"node {r.node_id}: {r.reason}" for r in result.rejected)
        raise NotEnoughReplies(
            f"round {server_round}: only {len(result.valid)} usable {stage} replies, "
            f"'min-replies' is {min_replies}" + (f" (failures: {failures})" if failures else "")
        )
    return result
