"""The example sets a client holds: a simulated partition, or a device's own LETOR data.

- **simulation**: ``node_config`` has ``partition-id`` and ``num-partitions`` (Flower's
  simulation runtime sets them). The client loads the run's data (``data-path`` from the
  server's ``ConfigRecord``), takes partition ``partition-id`` of the training sets (scheme
  ``partition-scheme``) for training and the same partition of the validation sets as its local
  held-out sets. ``fedrank.common.partitioners`` is imported only here, only in this mode.
- **device**: ``node_config`` has ``data-path``: a LETOR file or fold folder on the device. Its
  ``train`` sets are for training, its ``vali`` sets (split off ``train`` when the folder has
  none) are the local held-out sets.

Loaded data is cached per process, so a simulation worker that serves many rounds reads and
partitions the data once.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.partitioners import label_availability, partition

__all__ = ["LocalData", "load_local_data", "clear_cache", "partition_options"]


@dataclass(frozen=True)
class LocalData:
    """A client's sets: ``train`` (with an optional per-set ``label_mask``) and ``holdout``."""

    train: ExampleSets
    holdout: ExampleSets | None
    label_mask: np.ndarray | None  # [train.num_sets] bool, True where labels may be used
    source: str  # human-readable description, e.g. "partition 1/3 of synthetic"
    client_key: int  # stable across runs: the partition id, or a checksum of the data path

    @property
    def set_ids(self) -> np.ndarray:
        """Ids of every set the client holds (training and held-out)."""
        if self.holdout is None:
            return self.train.set_ids
        return np.concatenate([self.train.set_ids, self.holdout.set_ids])


_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget cached data (tests)."""
    with _LOCK:
        _CACHE.clear()


def _dataset(spec: str, seed: int) -> Any:

    key = ("dataset", spec, seed)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_dataset(spec, seed=seed)
        return _CACHE[key]


def load_local_data(node_config: Mapping[str, Any], settings: Mapping[str, Any]) -> LocalData:
    """The client's data, from its ``node_config`` and the server's client settings.

    ``settings`` holds the client keys of the run (``data-path``, ``seed``,
    ``partition-scheme``, ``partition-alpha`` and ``partition-attribute`` (``dirichlet``),
    ``partition-power`` (``sizes``), ``label-fraction``).
    """
    seed = int(settings.get("seed", 0))
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        if not path.strip():
            raise ConfigError("node_config 'data-path' is empty: give the device's LETOR data")
        if not Path(path).exists():
            raise ConfigError(f"node_config 'data-path' {path!r} does not exist on this device")
        key = ("device", path, seed)
        with _LOCK:
            cached = _CACHE.get(key)
        if cached is not None:
            return cached
        data = _device_data(path, seed)
    elif "partition-id" in node_config and "num-partitions" in node_config:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        spec = str(settings.get("data-path", "synthetic"))
        scheme = str(settings.get("partition-scheme", "iid"))
        fraction = float(settings.get("label-fraction", 1.0))
        options = partition_options(settings)
        key = ("partition", spec, seed, pid, num, scheme, fraction, tuple(sorted(options.items())))
        with _LOCK:
            cached = _CACHE.get(key)
        if cached is not None:
            return cached
        data = _partition_data(spec, seed, pid, num, scheme, options, fraction)
    else:
        raise ConfigError(
            "node_config needs 'data-path' (a device's LETOR file or folder) or "
            "'partition-id' and 'num-partitions' (a simulated client); it has "
            f"{sorted(node_config)}"
        )
    with _LOCK:
        _CACHE[key] = data
    return data


def _device_data(path: str, seed: int) -> LocalData:
    dataset = _dataset(path, seed)
    splits = dataset.splits
    holdout = splits.get("vali")
    return LocalData(
        train=splits["train"],
        holdout=holdout,
        label_mask=None,
        source=f"device data {path}",
        client_key=zlib.crc32(str(Path(path).resolve()).encode()),
    )


def partition_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Options of ``fedrank.common.partitioners.partition`` for the run's ``partition-scheme``:
    ``alpha`` and ``attribute`` for ``dirichlet``, ``power`` for ``sizes``, none for ``iid``."""
    scheme = str(settings.get("partition-scheme", "iid"))
    if scheme == "dirichlet":
        return {
            "alpha": float(settings.get("partition-alpha", 0.5)),
            "attribute": str(settings.get("partition-attribute", "positive_rate")),
        }
    if scheme == "sizes":
        return {"power": float(settings.get("partition-power", 1.0))}
    return {}


def _partition_data(
    spec: str,
    seed: int,
    pid: int,
    num: int,
    scheme: str,
    options: Mapping[str, Any],
    fraction: float,
) -> LocalData:

    if not 0 <= pid < num:
        raise ConfigError(f"node_config 'partition-id' {pid} must lie in 0..{num - 1}")
    dataset = _dataset(spec, seed)
    train_all = dataset.splits["train"]
    parts = partition(train_all, num, scheme=scheme, seed=seed, **dict(options))
    train = train_all.take(parts[pid])
    holdout = None
    vali = dataset.splits.get("vali")
    if vali is not None and vali.num_sets >= num:
        holdout = vali.take(partition(vali, num, scheme="iid", seed=seed)[pid])
    label_mask = None
    if fraction < 1.0:
        label_mask = label_availability(train.num_sets, fraction, seed=seed * 1009 + pid)
    return LocalData(
        train=train,
        holdout=holdout,
        label_mask=label_mask,
        source=f"partition {pid}/{num} ({scheme}) of {spec}",
        client_key=pid,
    )
