"""Synthetic generator: determinism, privileged columns, cross-item reversal, click model."""

from __future__ import annotations

import numpy as np
import pytest

from fedrank.common.errors import ConfigError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.synthetic import (
    SyntheticConfig,
    SyntheticData,
    generate_synthetic,
    synthetic_splits,
)

SMALL = SyntheticConfig(num_sets=300)


def arrays(sets: ExampleSets) -> list[np.ndarray]:
    return [sets.features, sets.labels, sets.offsets, sets.set_ids, sets.relevance]


def test_same_seed_same_data_different_seed_different_data() -> None:
    a, b = generate_synthetic(SMALL, seed=3), generate_synthetic(SMALL, seed=3)
    for x, y in zip(arrays(a.sets), arrays(b.sets), strict=True):
        assert np.array_equal(x, y)
    assert np.array_equal(a.item_types, b.item_types) and np.array_equal(a.positions, b.positions)
    c = generate_synthetic(SMALL, seed=4)
    assert not np.array_equal(a.sets.sizes, c.sets.sizes)
    assert not np.allclose(a.sets.features[:100], c.sets.features[:100])
    # the world does not depend on num_sets: the first sets of a bigger run are different
    # draws, but the world (cross effects, rival pairs) is the same
    big = generate_synthetic(SyntheticConfig(num_sets=600), seed=3)
    assert np.array_equal(big.cross_effect, a.cross_effect)


def test_default_shapes_and_splits() -> None:
    splits = synthetic_splits(seed=0)
    assert list(splits) == ["train", "vali", "test"]
    assert [s.num_sets for s in splits.values()] == [1500, 250, 250]
    ids = np.concatenate([s.set_ids for s in splits.values()])
    assert np.unique(ids).size == ids.size
    for part in splits.values():
        assert part.num_features == 16 and part.relevance is not None
        assert part.sizes.min() >= 10 and part.sizes.max() <= 30
        assert set(np.unique(part.labels).tolist()) == {0.0, 1.0}
        assert part.feature_names[:1] == ("ctx0",) and part.feature_names[-1] == "priv3"
    # same world: identical to cutting one generated data set
    whole = generate_synthetic(seed=0).sets
    assert np.array_equal(splits["train"].features, whole.take(np.arange(1500)).features)


def test_columns_context_and_privileged_signal() -> None:
    data = generate_synthetic(SyntheticConfig(num_sets=800), seed=1)
    sets = data.sets
    assert data.student_columns.tolist() == list(range(12))
    assert data.privileged_columns.tolist() == [12, 13, 14, 15]
    # context columns are constant inside a set
    ctx = sets.features[:, data.feature_groups["context"]]
    first = np.repeat(ctx[sets.offsets[:-1]], sets.sizes, axis=0)
    assert np.array_equal(ctx, first)
    # the privileged features explain a large share of the relevance logit
    logit = np.log(sets.relevance / (1 - sets.relevance))
    design = np.c_[sets.features[:, data.privileged_columns], np.ones(sets.num_items)]
    fit = design @ np.linalg.lstsq(design, logit, rcond=None)[0]
    r2 = 1 - np.var(logit - fit) / np.var(logit)
    assert r2 > 0.3
    none = generate_synthetic(SyntheticConfig(num_sets=50, num_privileged_features=0), seed=1)
    assert none.privileged_columns.size == 0 and none.sets.num_features == 12


def rival_rates(data: SyntheticData, values: np.ndarray) -> dict[str, float]:
    """Mean of ``values`` for A and B items, over all sets and over sets showing both."""
    sets = data.sets
    set_of = np.repeat(np.arange(sets.num_sets), sets.sizes)
    a_items = np.isin(data.item_types, data.rival_pairs[:, 0])
    b_items = np.isin(data.item_types, data.rival_pairs[:, 1])
    partner = np.zeros(data.cross_effect.shape[0], dtype=np.int64)
    partner[data.rival_pairs[:, 0]] = data.rival_pairs[:, 1]
    partner[data.rival_pairs[:, 1]] = data.rival_pairs[:, 0]
    shown = set(zip(set_of.tolist(), data.item_types.tolist(), strict=True))
    together = np.array(
        [
            (s, partner[t]) in shown
            for s, t in zip(set_of.tolist(), data.item_types.tolist(), strict=True)
        ]
    ) & (a_items | b_items)
    return {
        "A": float(values[a_items].mean()),
        "B": float(values[b_items].mean()),
        "A_together": float(values[a_items & together].mean()),
        "B_together": float(values[b_items & together].mean()),
        "n_together": int((a_items & together).sum()),
    }


def test_cross_item_reversal_a_wins_alone_b_wins_together() -> None:
    """Item A has the higher positive rate overall, yet B wins when both are shown."""
    data = generate_synthetic(SyntheticConfig(num_sets=8000), seed=0)
    truth = rival_rates(data, data.sets.relevance)
    assert truth["A"] > truth["B"] + 0.03
    assert truth["B_together"] > truth["A_together"] + 0.1
    clicks = rival_rates(data, data.sets.labels)
    n = truth["n_together"]
    assert n > 1500

    def z(p1: float, p2: float, n1: int) -> float:  # two-proportion z score
        p = (p1 + p2) / 2
        return (p1 - p2) / np.sqrt(2 * p * (1 - p) / n1)

    n_a = int(np.isin(data.item_types, data.rival_pairs[:, 0]).sum())
    assert z(clicks["A"], clicks["B"], n_a) > 2.5  # A: more clicks overall
    assert z(clicks["B_together"], clicks["A_together"], n) > 2.5  # B: more clicks together
    # without the cross-item effect B never overtakes A
    flat = generate_synthetic(SyntheticConfig(num_sets=3000, cross_strength=0.0), seed=0)
    no_cross = rival_rates(flat, flat.sets.relevance)
    assert no_cross["A_together"] > no_cross["B_together"]


def test_position_biased_clicks() -> None:
    data = generate_synthetic(SyntheticConfig(num_sets=1500), seed=2)
    sets, pos = data.sets, data.positions
    # positions are a permutation of 0..n-1 inside every set
    for k in range(0, sets.num_sets, 97):
        a, b = sets.offsets[k], sets.offsets[k + 1]
        assert sorted(pos[a:b].tolist()) == list(range(b - a))
    assert np.allclose(data.examination, 1.0 / (pos + 1.0))
    # clicks per unit of true relevance fall with the position: that is the examination
    for k in (0, 4, 9):  # clicks / relevance at position k estimates 1 / (k + 1)
        ratio = sets.labels[pos == k].mean() / sets.relevance[pos == k].mean()
        assert abs(ratio - 1 / (k + 1)) < 0.05, (k, ratio)
    # without position bias every item is examined: click rate tracks relevance everywhere
    flat = generate_synthetic(SyntheticConfig(num_sets=1500, position_bias=0.0), seed=2)
    assert np.all(flat.examination == 1.0)
    deep = flat.positions >= 9
    assert abs(flat.sets.labels[deep].mean() - flat.sets.relevance[deep].mean()) < 0.03
    # stored order is shuffled unless asked otherwise
    logged = generate_synthetic(SyntheticConfig(num_sets=50, shuffle_items=False), seed=2)
    first = logged.positions[logged.sets.offsets[:-1]]
    assert np.all(first == 0)


def ndcg10(scores: np.ndarray, sets: ExampleSets, gains: np.ndarray) -> float:
    values = []
    for a, b in zip(sets.offsets[:-1], sets.offsets[1:], strict=True):
        g = 2.0 ** gains[a:b] - 1
        disc = 1 / np.log2(np.arange(2, 12))[: b - a]
        top = np.argsort(-scores[a:b], kind="stable")[:10]
        ideal = np.sort(g)[::-1][:10]
        values.append((g[top] * disc[: top.size]).sum() / (ideal * disc[: ideal.size]).sum())
    return float(np.mean(values))


def test_privileged_features_give_the_teacher_a_clear_edge() -> None:
    """Even a linear model trained on clicks ranks much better with the privileged columns."""
    data = generate_synthetic(seed=0)
    splits = synthetic_splits(seed=0)
    train, test = splits["train"], splits["test"]

    def fitted(columns: np.ndarray) -> float:
        x = np.c_[train.features[:, columns], np.ones(train.num_items)]
        w = np.linalg.lstsq(x, train.labels, rcond=None)[0]
        scores = np.c_[test.features[:, columns], np.ones(test.num_items)] @ w
        return ndcg10(scores, test, test.relevance)

    everything = np.arange(test.num_features)
    with_priv, without = fitted(everything), fitted(data.student_columns)
    random = ndcg10(np.random.default_rng(0).random(test.num_items), test, test.relevance)
    assert without > random + 0.15  # the student's columns carry signal
    assert with_priv > without + 0.05  # the privileged columns carry more


def test_config_validation_and_overrides() -> None:
    with pytest.raises(ConfigError, match="min_items"):
        SyntheticConfig(min_items=5, max_items=3)
    with pytest.raises(ConfigError, match="rival_presence"):
        SyntheticConfig(rival_presence=1.5)
    with pytest.raises(ConfigError, match="position_bias"):
        SyntheticConfig(position_bias=-1.0)
    with pytest.raises(ConfigError, match="num_item_types"):
        SyntheticConfig(num_item_types=6, num_rival_pairs=3)
    cfg = SyntheticConfig.from_overrides(
        {"num-sets": "40", "position_bias": "0.5", "shuffle_items": "no"}
    )
    assert (cfg.num_sets, cfg.position_bias, cfg.shuffle_items) == (40, 0.5, False)
    with pytest.raises(ConfigError, match="unknown synthetic option 'sets'"):
        SyntheticConfig.from_overrides({"sets": "3"})
    with pytest.raises(ConfigError, match="expects int"):
        SyntheticConfig.from_overrides({"num_sets": "many"})
    with pytest.raises(ConfigError, match="too small"):
        synthetic_splits(config=SyntheticConfig(num_sets=2))
