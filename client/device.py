"""Device settings of a SuperNode: threads, a budget of steps or seconds per round, memory.

A device states what it can afford in its ``--node-config`` (next to ``data-path``)::

    flower-supernode ... --node-config 'data-path="/data/letor.txt" threads=1 max-steps=50
                                        max-seconds=20 batch-size=8 memory-mb=64'

=================  ==========================================================================
key                meaning
=================  ==========================================================================
``threads``        torch intra-op threads for training and scoring (default: torch's choice)
``max-steps``      at most this many optimiser steps per round (0: the server's setting)
``max-seconds``    stop local training after this many seconds per round (0: no limit)
``batch-size``     at most this many sets per batch (0: the server's ``batch-size``)
``memory-mb``      cap the batch so one padded batch stays within about this many MiB
``max-epochs``     at most this many passes over the local sets per round (0: the server's)
``max-parameters`` refuse a student with more parameters than this (0: any size)
=================  ==========================================================================

Device caps only ever lower what the server asks for; the server cannot raise them. A student
larger than ``max-parameters`` is refused on the device (error kind ``device-cap``), and the
node reports the cap in its hello so the server leaves it out of a run whose student is too
large. :meth:`DeviceSettings.report` gives the values actually used, for the client's training
metrics (``device-threads``, ``device-batch-size``, ``device-max-steps``,
``device-max-seconds``, ``device-memory-mb``, ``device-max-epochs``).

Unknown keys (a typo such as ``max-step``) are a :class:`~common.errors.ConfigError` naming the
key and the valid ones. The node checks its ``node_config`` when the server first says hello;
a bad one is reported to the server (which node, which key, what was expected) and that node
is left out of the run, while the others go on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

__all__ = ["DEVICE_KEYS", "NODE_KEYS", "DeviceSettings"]

# node_config keys that say where the data is (client.local_data reads them)
DATA_KEYS = frozenset({"data-path", "partition-id", "num-partitions"})
DEVICE_KEYS = (
    "threads",
    "max-steps",
    "max-seconds",
    "batch-size",
    "memory-mb",
    "max-epochs",
    "max-parameters",
)
NODE_KEYS = frozenset(DATA_KEYS | set(DEVICE_KEYS))

# rough bytes per item of one padded batch beyond its features: labels, mask, teacher scores,
# scores, gradients and the student's activations
_ITEM_OVERHEAD = 256
# pairwise losses materialise a few [N, N] float tensors per set
_PAIR_TENSORS = 8


# the largest value each key accepts (a larger one is a typo or a unit mistake)
_MAXIMUM: dict[str, float] = {
    "threads": 1024,
    "max-steps": 10**9,
    "max-epochs": 10**6,
    "batch-size": 10**6,
    "max-parameters": 10**12,
    "max-seconds": 10**7,
    "memory-mb": 10**8,
}


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"node_config {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    top = int(_MAXIMUM[key])
    if not isinstance(value, int) or not minimum <= value <= top:
        raise ConfigError(
            f"node_config {key!r} must be an integer >= {minimum} and <= {top}, got {value!r}"
        )
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"node_config {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node_config {key!r} must be a number, got {value!r}") from None
    top = _MAXIMUM[key]
    if not math.isfinite(number) or not 0 <= number <= top:
        raise ConfigError(
            f"node_config {key!r} must be a number >= 0 and <= {top:g}, got {value!r}"
        )
    return number


@dataclass(frozen=True)
class DeviceSettings:
    """What one device allows (0 means: no device limit)."""

    threads: int = 0
    max_steps: int = 0
    max_seconds: float = 0.0
    batch_size: int = 0
    memory_mb: float = 0.0
    max_epochs: int = 0
    max_parameters: int = 0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DeviceSettings:
        """Parse the device keys of a SuperNode's ``node_config`` (others: see NODE_KEYS)."""
        unknown = sorted(k for k in node_config if k not in NODE_KEYS)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(NODE_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown node_config key {key!r}{hint}; valid keys: {', '.join(sorted(NODE_KEYS))}"
            )
        get = node_config.get
        return cls(
            threads=_int("threads", get("threads", 0), 0),
            max_steps=_int("max-steps", get("max-steps", 0), 0),
            max_seconds=_float("max-seconds", get("max-seconds", 0.0)),
            batch_size=_int("batch-size", get("batch-size", 0), 0),
            memory_mb=_float("memory-mb", get("memory-mb", 0.0)),
            max_epochs=_int("max-epochs", get("max-epochs", 0), 0),
            max_parameters=_int("max-parameters", get("max-parameters", 0), 0),
        )

    # ---- applying the settings -----------------------------------------------------------------
    def apply(self) -> None:
        """Set torch's thread count (no-op without ``threads``)."""
        if self.threads:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

    def steps(self, server_steps: int) -> int:
        """The step budget: the smaller of the server's and the device's (0: no budget)."""
        caps = [s for s in (int(server_steps), self.max_steps) if s > 0]
        return min(caps) if caps else 0

    def batch_size_for(self, requested: int, max_items: int = 0, num_features: int = 0) -> int:
        """The batch size to use: ``requested`` lowered by ``batch-size`` and, with
        ``memory-mb``, by an estimate of one padded batch of sets with ``max_items`` items of
        ``num_features`` features (float32, plus pairwise tensors)."""
        size = max(1, int(requested))
        if self.batch_size:
            size = min(size, self.batch_size)
        if self.memory_mb and max_items > 0:
            n = int(max_items)
            per_set = 4 * n * max(int(num_features), 1) + _ITEM_OVERHEAD * n
            per_set += 4 * _PAIR_TENSORS * n * n
            size = min(size, max(1, int(self.memory_mb * 2**20 // per_set)))
        return size

    def train_settings(self, settings: Any, sets: Any = None) -> Any:
        """``settings`` (a :class:`client.trainer.TrainSettings`) with the device's caps: step
        budget, batch size for ``sets`` (an ExampleSets) and, if the trainer supports it
        (a ``max_seconds`` field), the time budget."""
        changes: dict[str, Any] = {"max_steps": self.steps(getattr(settings, "max_steps", 0))}
        if self.max_epochs:
            epochs = int(getattr(settings, "epochs", 0))
            changes["epochs"] = min(epochs, self.max_epochs) if epochs > 0 else self.max_epochs
        max_items = int(sets.sizes.max()) if sets is not None and sets.num_sets else 0
        features = int(sets.num_features) if sets is not None else 0
        changes["batch_size"] = self.batch_size_for(settings.batch_size, max_items, features)
        if self.max_epochs and sets is not None and sets.num_sets:
            # the epoch cap is a step cap too: neither the server's `local-steps` nor its
            # `min-local-steps` floor may take a device past `max-epochs` passes
            per_epoch = -(-int(sets.num_sets) // changes["batch_size"])
            changes["max_steps"] = self.steps(
                min(c for c in (changes["max_steps"], self.max_epochs * per_epoch) if c > 0)
            )
        fields = {f.name for f in dataclasses.fields(settings)}
        if "max_seconds" in fields:
            current = float(getattr(settings, "max_seconds", 0.0) or 0.0)
            caps = [s for s in (current, self.max_seconds) if s > 0]
            changes["max_seconds"] = min(caps) if caps else 0.0
        return dataclasses.replace(settings, **changes)

    def report(self, used: Any = None) -> dict[str, float | int]:
        """Metrics naming what the client used (``used``: the TrainSettings it trained with)."""
        import torch

        out: dict[str, float | int] = {"device-threads": int(torch.get_num_threads())}
        if used is not None:
            out["device-batch-size"] = int(used.batch_size)
            out["device-max-steps"] = int(getattr(used, "max_steps", 0))
            out["device-max-seconds"] = float(getattr(used, "max_seconds", self.max_seconds))
        else:
            out["device-batch-size"] = int(self.batch_size)
            out["device-max-steps"] = int(self.max_steps)
            out["device-max-seconds"] = float(self.max_seconds)
        out["device-memory-mb"] = float(self.memory_mb)
        out["device-max-epochs"] = int(getattr(used, "epochs", 0)) if used else self.max_epochs
        return out

    def check_model(self, num_parameters: int) -> str | None:
        """Why this device refuses a student of ``num_parameters`` parameters, or None."""
        if self.max_parameters and num_parameters > self.max_parameters:
            return (
                f"the student has {num_parameters:,} parameters, this device allows at most "
                f"{self.max_parameters:,} ('max-parameters' in its node_config)"
            )
        return None
