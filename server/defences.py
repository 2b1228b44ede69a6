"""Poisoning defences, on by default, applied to screened training replies before a strategy
aggregates them.

- **Example weights are capped by what the server knows of the node.** A reply's weight is
  ``min(num_examples it claims, the training sets it reported at hello, max-examples-per-node)``
  (the last defaults to the number of sets the server's teacher table holds for devices), so a
  node claiming 1e12 or 1e308 examples gets no more weight than it has sets. A node that lies
  at hello as well keeps its lie up to the per-run maximum; the robust strategies
  (``fedmedian``, ``krum``, ``multikrum``, ``bulyan``, ``fedtrimmedavg``) do not use counts.
- **Update norms are bounded.** An update ``w_node - w_global`` (L2 over every float weight)
  longer than ``max-update-norm``, or longer than ``update-norm-ratio`` times the median
  update norm of the round, is scaled down to that length (norm bounding, Sun et al. 2019,
  "Can you really backdoor federated learning?"): a scaled-up update moves the model no
  further than an honest one may. The median is robust while fewer than half of a round's
  replies are hostile; the absolute bound holds even when they are not.
- **Overflow-safe aggregation.** The strategy gets the float weights as float64 and the
  capped weights (bounded, finite), so sums cannot overflow; :func:`finite` checks the result.

:func:`robust_minimum` gives the replies a robust rule needs (Krum: ``2f + 3``; Bulyan:
``4f + 3``; FedTrimmedAvg: enough to trim at least one at each end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedrank.common.errors import ConfigError
from fedrank.common.records import DecodedArray, array_numpy
from fedrank.server.update_validation import Rejection

__all__ = [
    "Defences",
    "Prepared",
    "check_sample_size",
    "finite",
    "prepare_updates",
    "robust_minimum",
    "update_norm",
]


@dataclass(frozen=True)
class Defences:
    """The defence settings of a run.

    ``max_update_norm``: L2 bound of an update (0: none). ``update_norm_ratio``: bound of an
    update relative to the round's median update norm (0: none). ``max_examples``: the most example
    weight one node may carry (0: no per-run maximum; -1: no cap at all, not even the node's
    hello, for comparisons).
    """

    max_update_norm: float = 0.0
    max_examples: int = 0
    update_norm_ratio: float = 0.0

    def bound(self, norms: list[float]) -> float:
        """The norm bound of a round whose updates have ``norms`` (inf: none)."""
        bounds = [math.inf]
        if self.max_update_norm > 0:
            bounds.append(self.max_update_norm)
        if self.update_norm_ratio > 0 and norms:
            bounds.append(self.update_norm_ratio * float(np.median(norms)))
        return min(bounds)


@dataclass
class Prepared:
    """A screened training reply, ready for the strategy."""

    node: int
    message: Message  # float64 weights (clipped, DecodedArray), metrics: the capped weight
    metrics: dict[str, Any]  # everything the node reported
    weight: int  # the example weight used
    claimed: float  # the example weight the node claimed
    norm: float  # ||w_node - w_global|| before any clipping
    clipped: bool
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)


def decoded(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The numpy arrays of ``arrays``, read once (a reply is screened, measured, clipped and
    fingerprinted from the same decoded arrays)."""
    return {key: array_numpy(arrays[key]) for key in arrays}


Weights = ArrayRecord | Mapping[str, np.ndarray]


def update_norm(arrays: Weights, global_arrays: Weights) -> float:
    """L2 norm of ``arrays - global_arrays`` over the float weights, in float64."""
    new = decoded(arrays) if isinstance(arrays, ArrayRecord) else arrays
    base = decoded(global_arrays) if isinstance(global_arrays, ArrayRecord) else global_arrays
    total = 0.0
    for key, old in base.items():
        if old.dtype.kind != "f":
            continue
        diff = new[key].astype(np.float64) - old.astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def prepare_updates(
    replies: Iterable[tuple[int, Message]],
    global_arrays: ArrayRecord,
    defences: Defences,
    node_cap: Callable[[int], int | None],
    *,
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
    weight_key: str = "num_examples",
) -> tuple[list[Prepared], list[Rejection]]:
    """Apply the defences to ``(node, reply)`` pairs that passed screening.

    ``node_cap(node)`` is the training sets the node reported at hello (None: unknown). A node
    whose cap is 0 (it reported no training sets) is rejected.
    """
    prepared: list[Prepared] = []
    rejected: list[Rejection] = []
    base = decoded(global_arrays)
    replies = list(replies)
    received_arrays = [decoded(msg.content[arrays_key]) for _, msg in replies]
    norms = [update_norm(received, base) for received in received_arrays]
    bound = defences.bound(norms)
    for (node, msg), received, norm in zip(replies, received_arrays, norms, strict=True):
        metrics = dict(msg.content[metrics_key])
        claimed = float(metrics[weight_key])
        caps = [claimed]
        known = node_cap(node) if defences.max_examples >= 0 else None
        if known is not None:
            if known < 1:
                rejected.append(
                    Rejection(node, "the node reported no training sets at hello", "invalid")
                )
                continue
            caps.append(float(known))
        if defences.max_examples > 0:
            caps.append(float(defences.max_examples))
        weight = int(min(caps))
        notes = []
        if weight < claimed:
            notes.append(f"example weight capped from {claimed:g} to {weight}")
        scale = 1.0
        if norm > bound:
            scale = bound / norm
            notes.append(f"update norm {norm:.4g} clipped to {bound:.4g}")
        arrays = ArrayRecord()
        for key, old in base.items():
            value = received[key]
            if old.dtype.kind == "f":
                old64 = old.astype(np.float64)
                value = old64 + (value.astype(np.float64) - old64) * scale
            arrays[key] = DecodedArray(value)
        content = RecordDict({arrays_key: arrays, metrics_key: MetricRecord({weight_key: weight})})
        prepared.append(
            Prepared(
                node=node,
                message=Message(content, metadata=msg.metadata),
                metrics=metrics,
                weight=weight,
                claimed=claimed,
                norm=norm,
                clipped=scale < 1.0,
                nbytes=sum(int(value.nbytes) for value in received.values()),
                notes=notes,
            )
        )
    return prepared, rejected


def finite(arrays: ArrayRecord) -> str | None:
    """Why aggregated ``arrays`` cannot become the global model (non-finite values), or None."""
    for key in arrays:
        value = array_numpy(arrays[key])
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return f"the aggregate of {key!r} holds non-finite values"
    return None


def robust_minimum(strategy: str, options: Mapping[str, Any]) -> int:
    """The fewest replies the aggregation rule ``strategy`` needs to keep its guarantee."""
    f = int(options.get("num-malicious-nodes", 0))
    if strategy in ("krum", "multikrum"):
        return 2 * f + 3
    if strategy == "bulyan":
        return 4 * f + 3
    if strategy == "fedtrimmedavg":
        beta = float(options.get("trim-beta", 0.0))
        if beta <= 0:
            return 1
        return math.ceil(1.0 / beta - 1e-9)  # int(beta * n) >= 1
    return 1


def check_sample_size(strategy: str, options: Mapping[str, Any], sampled: int) -> None:
    """ConfigError naming the key when ``sampled`` clients per round cannot give the
    replies ``strategy`` needs (e.g. FedTrimmedAvg that would trim nothing)."""
    need = robust_minimum(strategy, options)
    if sampled >= need:
        return
    if strategy == "fedtrimmedavg":
        beta = float(options.get("trim-beta", 0.0))
        raise ConfigError(
            f"'trim-beta' {beta:g} trims int({beta:g} x {sampled}) = {int(beta * sampled)} of the "
            f"{sampled} sampled clients at each end: nothing is trimmed; sample at least "
            f"{need} clients per round or raise 'trim-beta' to {1.0 / max(sampled, 1):.3g} "
            "or more"
        )
    f = int(options.get("num-malicious-nodes", 0))
    rule = "4f + 3" if strategy == "bulyan" else "2f + 3"
    raise ConfigError(
        f"'strategy' {strategy} with 'num-malicious-nodes' {f} needs at least {rule} = {need} "
        f"replies per round, but {sampled} client(s) are sampled: connect more nodes, raise "
        "'fraction-train' or lower 'num-malicious-nodes'"
    )
