"""Partitioners: exact, sized as configured, seeded, and non-IID where asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrank.common.errors import ConfigError, FedrankError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.features import restrict_features
from fedrank.common.letor import read_letor_folder
from fedrank.common.partitioners import (
    attribute_groups,
    cluster_coordinate,
    label_availability,
    partition,
    partition_set_ids,
    partition_sizes,
    positive_rate,
)


def make_sets(num_sets: int = 300, seed: int = 0, num_features: int = 6) -> ExampleSets:
    """Sets of 2..12 items whose positive rates and feature means vary from set to set."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, size=num_sets)
    rate = rng.beta(0.7, 1.5, size=num_sets)  # per-set positive rate, many near 0
    centre = rng.normal(0, 3, size=(num_sets, num_features))  # per-set "topic"
    labels = np.concatenate(
        [(rng.random(s) < r).astype(np.float32) for s, r in zip(sizes, rate, strict=True)]
    )
    features = np.concatenate(
        [c + rng.normal(0, 1, size=(s, num_features)) for s, c in zip(sizes, centre, strict=True)]
    )
    return ExampleSets(
        features=features,
        labels=labels,
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"q{i}" for i in range(num_sets)],
    )


SETS = make_sets()
CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3, "attribute": "positive_rate"}),
    ("dirichlet", {"alpha": 0.3, "attribute": "cluster"}),
    ("dirichlet", {"alpha": 0.01, "attribute": "cluster", "num_groups": 3}),
    ("sizes", {"power": 1.5}),
    ("sizes", {"fractions": [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]}),
]


def assert_exact_partition(parts: list[np.ndarray], num_sets: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert joined.size == num_sets  # nothing duplicated ...
    assert np.array_equal(np.sort(joined), np.arange(num_sets))  # ... nothing lost
    assert all(p.size >= 1 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, unique


@pytest.mark.parametrize(("scheme", "options"), CASES)
@pytest.mark.parametrize("clients", [1, 2, 6, 40])
def test_every_set_in_exactly_one_client(scheme: str, options: dict, clients: int) -> None:
    if scheme == "sizes" and "fractions" in options and clients != 6:
        options = {}
    parts = partition(SETS, clients, scheme, seed=3, **options)
    assert len(parts) == clients
    assert_exact_partition(parts, SETS.num_sets)


@pytest.mark.parametrize(("scheme", "options"), CASES)
def test_seeded(scheme: str, options: dict) -> None:
    a = partition(SETS, 6, scheme, seed=11, **options)
    b = partition(SETS, 6, scheme, seed=11, **options)
    c = partition(SETS, 6, scheme, seed=12, **options)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [p.size for p in partition(SETS, 7, "iid", seed=0)]
    assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 1


def test_sizes_scheme_gives_the_configured_sizes() -> None:
    parts = partition(SETS, 4, "sizes", seed=0, fractions=[0.4, 0.3, 0.2, 0.1])
    assert [p.size for p in parts] == [120, 90, 60, 30]
    # power law: shares proportional to 1, 1/2, 1/3 (largest remainder rounding)
    expected = partition_sizes(300, 3, power=1.0)
    assert expected.sum() == 300 and list(expected) == [164, 82, 54]
    assert [p.size for p in partition(SETS, 3, "sizes", seed=5, power=1.0)] == list(expected)
    # min_size is honoured even for a steep law
    steep = partition_sizes(300, 10, power=6.0, min_size=5)
    assert steep.sum() == 300 and steep.min() == 5 and steep[0] == 300 - 45


def test_dirichlet_skews_the_attribute() -> None:
    rate = positive_rate(SETS)
    spread = {}
    for scheme, opts in [("iid", {}), ("dirichlet", {"alpha": 0.1})]:
        stds = []
        for seed in range(5):
            parts = partition(SETS, 6, scheme, seed=seed, **opts)
            stds.append(np.std([rate[p].mean() for p in parts]))
        spread[scheme] = float(np.mean(stds))
    # client mean positive rates differ far more than under IID
    assert spread["dirichlet"] > 3 * spread["iid"]

    coord = cluster_coordinate(SETS)
    iid = [coord[p].mean() for p in partition(SETS, 6, "iid", seed=0)]
    skew = [
        coord[p].mean()
        for p in partition(SETS, 6, "dirichlet", seed=0, alpha=0.1, attribute="cluster")
    ]
    assert np.std(skew) > 3 * np.std(iid)


def test_large_alpha_is_close_to_iid() -> None:
    parts = partition(SETS, 5, "dirichlet", seed=0, alpha=1e4)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 50 and sizes.max() <= 70


def test_cluster_coordinate_follows_the_main_direction() -> None:
    # sets whose features move along one direction: the coordinate orders them by that
    t = np.linspace(-1, 1, 20)
    feats = np.repeat(np.stack([t, 2 * t, np.zeros(20)], axis=1), 2, axis=0)
    sets = ExampleSets(
        features=feats,
        labels=np.zeros(40),
        offsets=np.arange(0, 41, 2),
        set_ids=[f"s{i}" for i in range(20)],
    )
    coord = cluster_coordinate(sets)
    assert np.all(np.diff(coord) > 0)


def test_attribute_groups_are_equal_sized_and_ordered() -> None:
    values = np.array([0.0] * 10 + [0.5] * 5 + [1.0] * 5)
    groups = attribute_groups(values, 4, seed=0)
    assert np.bincount(groups).tolist() == [5, 5, 5, 5]
    assert groups[-5:].tolist() == [3] * 5  # the highest values share the top group


def test_set_ids_helper_matches_positions() -> None:
    ids = partition_set_ids(SETS, 3, "iid", seed=0)
    pos = partition(SETS, 3, "iid", seed=0)
    assert all(np.array_equal(i, SETS.set_ids[p]) for i, p in zip(ids, pos, strict=True))


def test_impossible_or_wrong_requests_raise() -> None:
    with pytest.raises(FedrankError, match="cannot give 301 clients"):
        partition(SETS, 301, "iid")
    with pytest.raises(FedrankError, match="at least 2"):
        partition(SETS, 200, "dirichlet", min_size=2)
    with pytest.raises(ConfigError, match="unknown partition scheme 'zipf'"):
        partition(SETS, 2, "zipf")
    with pytest.raises(ConfigError, match="unknown option"):
        partition(SETS, 2, "iid", alpha=1.0)
    with pytest.raises(ConfigError, match="attribute"):
        partition(SETS, 2, "dirichlet", attribute="length")
    with pytest.raises(ConfigError, match="alpha"):
        partition(SETS, 2, "dirichlet", alpha=0)
    with pytest.raises(ConfigError, match="fractions"):
        partition(SETS, 3, "sizes", fractions=[0.5, 0.5])


def test_label_availability_is_exact_and_seeded() -> None:
    mask = label_availability(200, 0.25, seed=1)
    assert mask.dtype == bool and mask.shape == (200,) and mask.sum() == 50
    assert np.array_equal(mask, label_availability(200, 0.25, seed=1))
    assert not np.array_equal(mask, label_availability(200, 0.25, seed=2))
    assert label_availability(7, 0.0).sum() == 0 and label_availability(7, 1.0).all()
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        label_availability(10, 1.5)


def test_restrict_features() -> None:
    cols = restrict_features(46, 10, seed=0)
    assert cols.size == 10 and np.all(np.diff(cols) > 0) and cols.max() < 46
    assert np.array_equal(cols, restrict_features(46, 10, seed=0))
    assert restrict_features(46, 0.5, seed=0).size == 23
    names = [f"f{i}" for i in range(5)]
    assert restrict_features(5, ["f3", 1, "f3"], feature_names=names).tolist() == [1, 3]
    with pytest.raises(ConfigError, match="unknown feature 'g'"):
        restrict_features(5, ["g"], feature_names=names)
    with pytest.raises(ConfigError, match="1..5"):
        restrict_features(5, 6)


def test_real_mq2008_fold_partitions_exactly_and_dirichlet_skews(mq2008_fold1: Path) -> None:
    train = read_letor_folder(mq2008_fold1, cache=False)["train"]
    rate = positive_rate(train)
    for scheme, options in CASES[:3]:
        parts = partition(train, 10, scheme, seed=0, **options)
        assert_exact_partition(parts, train.num_sets)
        # the partition as data: sets and items add up to the whole fold
        clients = [train.take(p) for p in parts]
        assert sum(c.num_items for c in clients) == train.num_items
        assert set(np.concatenate([c.set_ids for c in clients])) == set(train.set_ids)
    iid = [rate[p].mean() for p in partition(train, 10, "iid", seed=0)]
    skew = [rate[p].mean() for p in partition(train, 10, "dirichlet", seed=0, alpha=0.1)]
    assert np.std(skew) > 2 * np.std(iid)


def test_partition_keys_reach_the_simulated_clients() -> None:
    """``partition-attribute`` (dirichlet) and ``partition-power`` (sizes) from the run's
    client settings pick the client's sets exactly as ``partition`` does with those options."""
    from fedrank.client.local_data import load_local_data
    from fedrank.common.config import FedrankConfig
    from fedrank.common.datasets import load_dataset

    spec = "synthetic:num_sets=120,min_items=8,max_items=12"
    train = load_dataset(spec, seed=0).splits["train"]
    cases = [
        ({"partition-scheme": "sizes", "partition-power": 2.0}, {"power": 2.0}),
        (
            {"partition-scheme": "dirichlet", "partition-attribute": "cluster"},
            {"alpha": 0.5, "attribute": "cluster"},
        ),
    ]
    for keys, options in cases:
        settings = FedrankConfig.from_run_config({"data-path": spec, **keys}).client_dict()
        scheme = keys["partition-scheme"]
        parts = partition(train, 4, scheme=scheme, seed=0, **options)
        for pid in range(4):
            local = load_local_data({"partition-id": pid, "num-partitions": 4}, settings)
            assert local.train.set_ids.tolist() == train.set_ids[parts[pid]].tolist()
    # the options change the split: a steeper power law, another attribute
    steep = partition(train, 4, scheme="sizes", seed=0, power=2.0)
    assert [len(p) for p in steep] != [len(p) for p in partition(train, 4, "sizes", 0)]
    by_rate = partition(train, 4, scheme="dirichlet", seed=0, alpha=0.5)
    by_cluster = partition(train, 4, scheme="dirichlet", seed=0, alpha=0.5, attribute="cluster")
    assert any(not np.array_equal(a, b) for a, b in zip(by_rate, by_cluster, strict=True))
