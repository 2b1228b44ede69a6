"""Split example sets across simulated clients, reproducibly.

Every partitioner returns one array of *set positions* per client; every set lands in exactly
one client, every client gets at least one set, and the same ``seed`` gives the same split.

Schemes (``partition(sets, num_partitions, scheme, seed, **options)``):

- ``"iid"``: a seeded permutation cut into near-equal parts (sizes differ by at most one).
- ``"dirichlet"``: non-IID by a set attribute. Sets are ranked by the attribute (ties broken
  at random, seeded) and cut into ``num_groups`` equal groups; for each group a client mix
  ``p ~ Dirichlet(alpha)`` is drawn and the group's sets are dealt to clients in those
  proportions. Small ``alpha`` (0.1) gives each client a few groups; large ``alpha`` (100) is
  close to IID. Attributes:

  - ``"positive_rate"``: the fraction of a set's items with a positive label (``y > 0``);
  - ``"cluster"``: a query cluster without k-means: the per-set mean feature vector, with each
    column standardised, projected on its first principal component (the direction along
    which sets differ most); quantile bins of that projection are the clusters.

  Clients left empty by the draw are topped up with sets taken from the largest clients, so
  ``min_size`` (default 1) always holds.
- ``"sizes"``: skewed client sizes on an IID mix. ``fractions=[...]`` fixes each client's
  share; otherwise client ``k`` gets a share proportional to ``(k + 1) ** -power`` (a power
  law, default ``power=1.0``). Integer sizes use the largest-remainder rule, each at least
  ``min_size``; :func:`partition_sizes` returns them.

The other scenario knob: :func:`label_availability` (label-scarce clients: which sets carry
labels; all of them carry teacher scores). The feature columns a device may see come from
:func:`fedrank.common.features.restrict_features`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrank.common.errors import ConfigError, FedrankError
from fedrank.common.example_sets import ExampleSets

SCHEMES = ("iid", "dirichlet", "sizes")
ATTRIBUTES = ("positive_rate", "cluster")


# ---- set attributes -----------------------------------------------------------------------
def positive_rate(sets: ExampleSets) -> np.ndarray:
    """``[sets]`` fraction of each set's items with a positive label (``y > 0``)."""
    positives = np.add.reduceat((sets.labels > 0).astype(np.float64), sets.offsets[:-1])
    return positives / sets.sizes


def cluster_coordinate(sets: ExampleSets) -> np.ndarray:
    """``[sets]`` each set's mean feature vector projected on the first principal component.

    Columns are standardised over sets first (constant columns dropped), so no single
    large-valued feature decides the direction. The sign is fixed so that the largest loading
    is positive, which makes the coordinate deterministic.
    """
    sums = np.add.reduceat(sets.features.astype(np.float64), sets.offsets[:-1], axis=0)
    means = sums / sets.sizes[:, None]
    std = means.std(axis=0)
    keep = std > 1e-12
    if not np.any(keep) or sets.num_sets < 2:
        return np.zeros(sets.num_sets)
    z = (means[:, keep] - means[:, keep].mean(axis=0)) / std[keep]
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    direction = vt[0]
    if direction[np.argmax(np.abs(direction))] < 0:
        direction = -direction
    return z @ direction


def set_attribute(sets: ExampleSets, attribute: str) -> np.ndarray:
    """The per-set attribute a Dirichlet partition skews (see the module docstring)."""
    if attribute == "positive_rate":
        return positive_rate(sets)
    if attribute == "cluster":
        return cluster_coordinate(sets)
    raise ConfigError(f"unknown partition attribute {attribute!r}; valid: {list(ATTRIBUTES)}")


def attribute_groups(values: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
    """``[sets]`` group index 0..num_groups-1: equal-size bins of ``values`` by rank.

    Ties (e.g. many sets with positive rate 0) are broken at random, seeded, so equal values
    may fall into neighbouring groups but every group has the same size (+-1).
    """
    n = values.size
    num_groups = max(1, min(int(num_groups), n))
    rng = np.random.default_rng([seed, 1])
    order = np.lexsort((rng.random(n), values))  # primary key: value; ties: random
    groups = np.empty(n, dtype=np.int64)
    for g, chunk in enumerate(np.array_split(order, num_groups)):
        groups[chunk] = g
    return groups


# ---- sizes ----------------------------------------------------------------------------------
def partition_sizes(
    num_sets: int,
    num_partitions: int,
    *,
    fractions: Sequence[float] | None = None,
    power: float = 1.0,
    min_size: int = 1,
) -> np.ndarray:
    """Integer client sizes summing to ``num_sets`` for the ``"sizes"`` scheme.

    Shares come from ``fractions`` (normalised; one per client) or the power law
    ``(k + 1) ** -power``; sizes are ``shares * num_sets`` rounded by the largest-remainder
    rule (ties to the lower client index), then clients below ``min_size`` are topped up one
    set at a time from the largest client.
    """
    _check_counts(num_sets, num_partitions, min_size)
    if fractions is not None:
        shares = np.asarray(list(fractions), dtype=np.float64)
        if shares.shape != (num_partitions,):
            raise ConfigError(
                f"partition option 'fractions' needs {num_partitions} values (one per client), "
                f"got {shares.size}"
            )
        if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
            raise ConfigError(
                f"partition option 'fractions' must be non-negative with a positive sum, "
                f"got {shares.tolist()}"
            )
    else:
        if not np.isfinite(power) or power < 0:
            raise ConfigError(f"partition option 'power' must be >= 0, got {power}")
        shares = (np.arange(num_partitions, dtype=np.float64) + 1.0) ** -float(power)
    shares = shares / shares.sum()
    sizes = partition_counts(num_sets, shares)
    for client in np.flatnonzero(sizes < min_size):  # top up from the largest clients
        while sizes[client] < min_size:
            sizes[int(np.argmax(sizes))] -= 1
            sizes[client] += 1
    return sizes


def _check_counts(num_sets: int, num_partitions: int, min_size: int) -> None:
    if int(num_partitions) < 1:
        raise ConfigError(f"num_partitions must be >= 1, got {num_partitions}")
    if int(min_size) < 1:
        raise ConfigError(f"partition option 'min_size' must be >= 1, got {min_size}")
    if num_sets < num_partitions * min_size:
        raise FedrankError(
            f"cannot give {num_partitions} clients at least {min_size} set(s) each from "
            f"{num_sets} example sets; use fewer clients or more data"
        )


# ---- schemes --------------------------------------------------------------------------------
def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]


def _sizes(n: int, k: int, rng: np.random.Generator, **options: object) -> list[np.ndarray]:
    fractions = options.pop("fractions", None)
    power = float(options.pop("power", 1.0))  # type: ignore[arg-type]
    min_size = int(options.pop("min_size", 1))  # type: ignore[call-overload]
    _no_more_options("sizes", options)
    sizes = partition_sizes(
        n,
        k,
        fractions=fractions,
        power=power,
        min_size=min_size,  # type: ignore[arg-type]
    )
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part) for part in np.split(rng.permutation(n), cuts)]


def _dirichlet(
    sets: ExampleSets, k: int, rng: np.random.Generator, seed: int, **options: object
) -> list[np.ndarray]:
    alpha = float(options.pop("alpha", 0.5))  # type: ignore[arg-type]
    attribute = str(options.pop("attribute", "positive_rate"))
    num_groups = int(options.pop("num_groups", max(k, 2)))  # type: ignore[call-overload]
    min_size = int(options.pop("min_size", 1))  # type: ignore[call-overload]
    _no_more_options("dirichlet", options)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"partition option 'alpha' must be > 0, got {alpha}")
    if num_groups < 1:
        raise ConfigError(f"partition option 'num_groups' must be >= 1, got {num_groups}")
    groups = attribute_groups(set_attribute(sets, attribute), num_groups, seed)
    owner = np.empty(sets.num_sets, dtype=np.int64)
    for g in range(int(groups.max()) + 1):
        members = rng.permutation(np.flatnonzero(groups == g))
        mix = rng.dirichlet(np.full(k, alpha))
        counts = partition_counts(members.size, mix)
        owner[members] = np.repeat(np.arange(k), counts)
    _top_up(owner, k, min_size, rng)
    return [np.flatnonzero(owner == c) for c in range(k)]


def partition_counts(total: int, shares: np.ndarray) -> np.ndarray:
    """Largest-remainder integer split of ``total`` by ``shares`` (which sum to 1)."""
    raw = np.asarray(shares, dtype=np.float64) * total
    counts = np.floor(raw).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        order = np.lexsort((np.arange(raw.size), -(raw - counts)))
        counts[order[:remainder]] += 1
    return counts


def _top_up(owner: np.ndarray, k: int, min_size: int, rng: np.random.Generator) -> None:
    """Move random sets from the currently largest client to each client below ``min_size``."""
    counts = np.bincount(owner, minlength=k)
    for client in range(k):
        while counts[client] < min_size:
            donor = int(np.argmax(counts))
            candidates = np.flatnonzero(owner == donor)
            moved = candidates[rng.integers(candidates.size)]
            owner[moved] = client
            counts[donor] -= 1
            counts[client] += 1


def _no_more_options(scheme: str, options: dict[str, object]) -> None:
    if options:
        valid = {
            "iid": [],
            "dirichlet": ["alpha", "attribute", "num_groups", "min_size"],
            "sizes": ["fractions", "power", "min_size"],
        }[scheme]
        raise ConfigError(
            f"unknown option(s) {sorted(options)} for partition scheme {scheme!r}; valid: {valid}"
        )


def partition(
    sets: ExampleSets,
    num_partitions: int,
    scheme: str = "iid",
    seed: int = 0,
    **options: object,
) -> list[np.ndarray]:
    """Set positions held by each of ``num_partitions`` clients (see the module docstring).

    Each returned array is sorted; together they are a partition of ``range(sets.num_sets)``.
    Raises :class:`~fedrank.common.errors.ConfigError` for an unknown scheme or option and
    :class:`~fedrank.common.errors.FedrankError` when there are fewer sets than clients.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; valid: {list(SCHEMES)}")
    k = int(num_partitions)
    _check_counts(sets.num_sets, k, int(options.get("min_size", 1)))  # type: ignore[call-overload]
    rng = np.random.default_rng([int(seed), 0])
    if scheme == "iid":
        options.pop("min_size", None)
        _no_more_options("iid", dict(options))
        parts = _iid(sets.num_sets, k, rng)
    elif scheme == "sizes":
        parts = _sizes(sets.num_sets, k, rng, **options)
    else:
        parts = _dirichlet(sets, k, rng, int(seed), **options)
    return [p.astype(np.int64) for p in parts]


def partition_set_ids(
    sets: ExampleSets, num_partitions: int, scheme: str = "iid", seed: int = 0, **options: object
) -> list[np.ndarray]:
    """Like :func:`partition` but returns each client's set ids."""
    return [sets.set_ids[p] for p in partition(sets, num_partitions, scheme, seed, **options)]


# ---- label scarcity and feature restrictions ------------------------------------------------
def label_availability(num_sets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``[num_sets]`` bool: which sets carry labels on a label-scarce client.

    Exactly ``round(fraction * num_sets)`` sets (chosen at random, seeded) are True. Every set
    still carries teacher scores; only label-based loss terms are masked.
    """
    fraction = float(fraction)
    if not (0.0 <= fraction <= 1.0) or not np.isfinite(fraction):
        raise ConfigError(f"label fraction must lie in [0, 1], got {fraction}")
    n = int(num_sets)
    if n < 0:
        raise ConfigError(f"num_sets must be >= 0, got {num_sets}")
    chosen = np.random.default_rng([int(seed), 2]).permutation(n)[: int(round(fraction * n))]
    available = np.zeros(n, dtype=bool)
    available[chosen] = True
    return available
