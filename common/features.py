"""Feature columns a device may see (used by the server for ``device-features`` and by the
simulation scenarios for privileged features)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrank.common.errors import ConfigError

__all__ = ["restrict_features"]


def restrict_features(
    num_features: int,
    keep: int | float | Sequence[int | str],
    seed: int = 0,
    feature_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted feature columns a device may see.

    ``keep`` is a count (``int``: that many random columns, seeded), a fraction (``float`` in
    (0, 1]: ``round(fraction * num_features)`` random columns, at least one), or an explicit
    list of column indices or feature names (names need ``feature_names``).
    """
    f = int(num_features)
    if f < 1:
        raise ConfigError(f"num_features must be >= 1, got {num_features}")
    rng = np.random.default_rng([int(seed), 3])
    if isinstance(keep, bool):
        raise ConfigError(
            f"feature restriction 'keep' must be a count, fraction or list, got {keep}"
        )
    if isinstance(keep, (int, np.integer)):
        count = int(keep)
        if not 1 <= count <= f:
            raise ConfigError(f"feature restriction keeps {count} columns; must be 1..{f}")
        return np.sort(rng.permutation(f)[:count]).astype(np.int64)
    if isinstance(keep, (float, np.floating)):
        if not 0.0 < float(keep) <= 1.0:
            raise ConfigError(f"feature restriction fraction must lie in (0, 1], got {keep}")
        count = max(1, int(round(float(keep) * f)))
        return np.sort(rng.permutation(f)[:count]).astype(np.int64)
    columns: list[int] = []
    names = None if feature_names is None else [str(n) for n in feature_names]
    for entry in keep:
        if isinstance(entry, str):
            if names is None or entry not in names:
                raise ConfigError(
                    f"feature restriction names unknown feature {entry!r}"
                    + ("" if names is None else f"; known: {names[:10]}...")
                )
            columns.append(names.index(entry))
        else:
            col = int(entry)
            if not 0 <= col < f:
                raise ConfigError(f"feature restriction column {col} outside 0..{f - 1}")
            columns.append(col)
    if not columns:
        raise ConfigError("feature restriction keeps no columns")
    return np.unique(np.asarray(columns, dtype=np.int64))
