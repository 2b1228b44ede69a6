"""Round checkpoints of a federation: weights, round, strategy state and metrics so far.

One file, ``<out-dir>/checkpoint.npz``, rewritten atomically after every round (a crash leaves
the previous checkpoint intact). Entries: ``weights/<key>`` (the global student),
``strategy/<key>`` (the server optimiser's state) and ``meta`` (utf-8 JSON: format, round,
configuration fingerprint, metrics history, policy state). Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.atomic_io import atomic_path, json_default
from fedrank.common.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "config_fingerprint",
    "RESUMABLE_KEYS",
]

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = "fedrank-checkpoint-v1"
# keys that may change between the interrupted run and its resumption
RESUMABLE_KEYS = frozenset({"num-server-rounds", "resume", "out-dir", "round-timeout"})


def config_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    return {k: v for k, v in sorted(config.items()) if k not in RESUMABLE_KEYS}


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    round: int
    weights: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    meta: dict[str, Any]


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    server_round: int,
    weights: dict[str, np.ndarray],
    strategy: dict[str, np.ndarray],
    meta: dict[str, Any],
) -> Path:
    """Write ``<out_dir>/checkpoint.npz`` atomically; returns its path."""
    path = Path(out_dir) / CHECKPOINT_FILE
    meta = {**meta, "format": FORMAT, "round": int(server_round)}
    text = json.dumps(meta, sort_keys=True, default=json_default)
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(text.encode(), dtype=np.uint8)}
    for key, value in weights.items():
        arrays[f"weights/{key}"] = np.asarray(value)
    for key, value in strategy.items():
        arrays[f"strategy/{key}"] = np.asarray(value)
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    arrays["sha256"] = np.frombuffer(digest.hexdigest().encode(), dtype=np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_checkpoint(out_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None if there is none; CheckpointError when corrupt."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if "meta" not in arrays or "sha256" not in arrays:
        raise CheckpointError(f"checkpoint {path} lacks its 'meta' or 'sha256' entry")
    stored = arrays.pop("sha256").tobytes().decode()
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    if digest.hexdigest() != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable 'meta': {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    weights = {k[len("weights/") :]: v for k, v in arrays.items() if k.startswith("weights/")}
    strategy = {k[len("strategy/") :]: v for k, v in arrays.items() if k.startswith("strategy/")}
    return Checkpoint(int(meta["round"]), weights, strategy, meta)


def check_compatible(checkpoint: Checkpoint, config: dict[str, Any], path: Path) -> None:
    """CheckpointError naming the keys whose values differ from the checkpointed run's."""
    saved = checkpoint.meta.get("config", {})
    now = config_fingerprint(config)
    then = config_fingerprint(saved)
    differ = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if differ:
        shown = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise CheckpointError(
            f"cannot resume from {path}: the configuration differs in {shown}; only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
