"""The default data for a new user: seeded synthetic example sets with a click log.

The generated world (see ``docs/data.md`` for the full story):

* every set has **context** features shared by its items (the same values on each item) and
  every item has **item** features that partly reveal its *type*;
* every item also has **privileged** features (think: signals only the server logs, such as
  long-term outcomes) that carry a large share of the item's utility; only the teacher may
  use them, so ``student_columns`` excludes them;
* **cross-item effects**: item types come in *rival pairs* ``(A, B)``. A has the higher base
  utility, so it has the higher positive rate overall; but when A and B are shown in the same
  set, B gains and A loses ``cross_strength / 2`` each, so B wins head to head. A per-item model
  cannot see who else is in the set; a set-aware teacher can. A and B look alike to the
  logging policy, so the reversal shows in the clicks too;
* true **relevance** ``sigmoid(utility)`` (the probability that an examined item is clicked)
  is kept in ``ExampleSets.relevance``;
* **labels are clicks** from a position-biased click model: a logging policy (a noisy linear
  ranker over the visible item features) orders each set; an item at position ``k`` (0-based) is
  examined with probability ``(1 / (k + 1)) ** position_bias``; click = examined and attracted.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``seed``: the same seed and
config give identical arrays. The world (type embeddings, weights) and the sets draw from
separate streams, so changing ``num_sets`` does not change the world.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from fedrank.common.errors import ConfigError
from fedrank.common.example_sets import ExampleSets

__all__ = [
    "RawScaling",
    "SyntheticConfig",
    "SyntheticData",
    "generate_synthetic",
    "raw_like_splits",
    "split_synthetic",
    "synthetic_splits",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic generator (defaults: a quick, clearly learnable problem)."""

    # ---- size ----
    num_sets: int = 2000
    """Sets generated in total; :func:`synthetic_splits` cuts train/vali/test from them."""
    vali_fraction: float = 0.125
    """Share of the sets used for validation (default 250 of 2000)."""
    test_fraction: float = 0.125
    """Share of the sets used for test (default 250 of 2000); the rest (1500) is train."""
    min_items: int = 10
    """Fewest items in a set (sizes are uniform in ``[min_items, max_items]``)."""
    max_items: int = 30
    """Most items in a set."""

    # ---- features ----
    num_context_features: int = 4
    """Set-level context features, repeated on every item of the set (columns first)."""
    num_item_features: int = 8
    """Per-item visible features: type embedding plus noise (columns after the context)."""
    num_privileged_features: int = 4
    """Per-item privileged features, seen only by the teacher (last columns)."""
    num_item_types: int = 12
    """Item types; the first ``2 * num_rival_pairs`` types form the rival pairs."""
    type_signal: float = 1.5
    """Scale of the type embedding in the item features (larger: type easier to recognise)."""
    feature_noise: float = 1.0
    """Std of the per-item noise added to the type embedding in the item features."""
    privileged_noise: float = 0.1
    """Std of the noise between the privileged features and the utility they carry."""

    # ---- utility (the relevance logit) ----
    base_utility: float = -0.5
    """Offset of every utility; lower means fewer attractive items."""
    set_bias_std: float = 0.5
    """Std of a per-set utility offset (some contexts are more engaging than others)."""
    visible_strength: float = 1.0
    """Std of the utility carried linearly by the visible item features."""
    context_strength: float = 0.5
    """Std of the context x item interaction (what a set's context prefers)."""
    type_strength: float = 0.5
    """Std of the per-type base utility of non-rival types."""
    privileged_strength: float = 1.5
    """Std of the utility carried by the privileged features (teacher's advantage)."""
    utility_noise: float = 0.5
    """Std of per-item utility nobody observes (irreducible noise)."""

    # ---- cross-item effects ----
    num_rival_pairs: int = 3
    """Rival pairs (A, B) = types (2k, 2k+1); 0 disables the cross-item effect."""
    rival_presence: float = 0.5
    """Probability that a set shows a given rival pair at all (A, B or both)."""
    rival_cooccurrence: float = 0.15
    """Given a pair is shown, probability that both A and B are in the set."""
    rival_advantage: float = 1.0
    """Base utility of A minus that of B: A's marginal positive rate is the higher."""
    cross_strength: float = 2.0
    """Utility moved from A to B when both are shown (B: +half, A: -half); above
    ``rival_advantage`` B wins head to head."""

    # ---- click model ----
    position_bias: float = 1.0
    """Examination probability ``(1/(k+1)) ** position_bias`` at 0-based position ``k``;
    0 means every item is examined (labels = attraction draws)."""
    logging_noise: float = 1.0
    """Std of the noise of the logging policy's score (linear visible utility + noise; the
    logging policy knows neither type effects, context, privileged nor cross-item effects)."""
    shuffle_items: bool = True
    """Store items in random order (True) rather than in the logged order, so item order
    leaks nothing about the logging policy; the logged position is in ``positions``."""

    # ---- raw feature scales ----
    raw_scale: float = 0.0
    """0: features as generated (about unit scale). Above 1: raw, unnormalised columns like
    web-search LETOR data: each column times its own factor in ``[1, raw_scale]`` (log-uniform)
    and, for half of the columns, through ``exp`` first (log-normal, heavy-tailed, positive
    like counts). Labels, relevance and the ranking information are unchanged (each column
    is mapped monotonically); see :class:`RawScaling`."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(
                    f"SyntheticConfig.{name} must be {what}, got {getattr(self, name)!r}"
                )

        need(self.num_sets >= 1, "num_sets", ">= 1")
        need(1 <= self.min_items <= self.max_items, "min_items", "in 1..max_items")
        for name in ("vali_fraction", "test_fraction", "rival_presence", "rival_cooccurrence"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        need(self.vali_fraction + self.test_fraction < 1.0, "vali_fraction", "< 1 - test_fraction")
        need(self.raw_scale == 0.0 or self.raw_scale >= 1.0, "raw_scale", "0 (off) or >= 1")
        for name in ("num_context_features", "num_item_features", "num_privileged_features"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.num_item_features >= 1, "num_item_features", ">= 1")
        need(self.num_rival_pairs >= 0, "num_rival_pairs", ">= 0")
        need(
            self.num_item_types >= 2 * self.num_rival_pairs + 1,
            "num_item_types",
            "> 2 * num_rival_pairs (at least one non-rival type)",
        )
        need(
            self.min_items >= 2 * self.num_rival_pairs + 1 or self.num_rival_pairs == 0,
            "min_items",
            "> 2 * num_rival_pairs (room for every rival)",
        )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"SyntheticConfig.{f.name} must be finite, got {value!r}")
            if f.name.endswith(("_std", "_noise", "_strength", "_signal", "position_bias")):
                need(value >= 0, f.name, ">= 0")

    @classmethod
    def from_overrides(cls, overrides: dict[str, str | int | float | bool]) -> SyntheticConfig:
        """A config with some fields replaced; string values are converted to the field type."""
        known = {f.name: f for f in fields(cls)}
        values = asdict(cls())
        for key, raw in overrides.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown synthetic option {key!r}; valid: {sorted(known)}")
            kind = type(values[name])
            try:
                if kind is bool and isinstance(raw, str):
                    if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                        raise ValueError(raw)
                    values[name] = raw.lower() in {"1", "true", "yes"}
                elif kind is int and isinstance(raw, str):
                    values[name] = int(raw)
                else:
                    values[name] = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"synthetic option {key!r} expects {kind.__name__}, got {raw!r}"
                ) from None
        return cls(**values)


@dataclass(frozen=True, eq=False)
class SyntheticData:
    """Generated sets plus what a test or a report may want to know about how they were made."""

    sets: ExampleSets  # labels = clicks, relevance = attraction probability
    privileged_columns: np.ndarray  # feature columns only the teacher sees
    student_columns: np.ndarray  # feature columns a device may see
    config: SyntheticConfig
    seed: int
    item_types: np.ndarray  # [items] int type of each item
    rival_pairs: np.ndarray  # [pairs, 2] (A, B) type ids; A has the higher base utility
    cross_effect: np.ndarray  # [types, types]: utility change of row type when column type shown
    positions: np.ndarray  # [items] 0-based position in the logging policy's order
    examination: np.ndarray  # [items] examination probability at that position
    feature_groups: dict[str, np.ndarray] = field(default_factory=dict)  # context/item/privileged


def generate_synthetic(config: SyntheticConfig | None = None, seed: int = 0) -> SyntheticData:
    """Generate ``config.num_sets`` sets (see the module docstring for the model)."""
    cfg = config or SyntheticConfig()
    world_rng, set_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    n_ctx, n_item, n_priv = (
        cfg.num_context_features,
        cfg.num_item_features,
        cfg.num_privileged_features,
    )
    n_types, n_pairs = cfg.num_item_types, cfg.num_rival_pairs

    # ---- the world: shared by every set and every split ----
    type_emb = world_rng.standard_normal((n_types, n_item))
    w_vis = _unit(world_rng.standard_normal(n_item))
    w_vis *= cfg.visible_strength / np.sqrt(cfg.type_signal**2 + cfg.feature_noise**2 + 1e-12)
    w_ctx = world_rng.standard_normal((n_item, max(n_ctx, 1))) / np.sqrt(max(n_ctx, 1) * n_item)
    x_scale = np.sqrt(cfg.type_signal**2 + cfg.feature_noise**2 + 1e-12)
    w_ctx *= cfg.context_strength / x_scale
    w_priv = _unit(world_rng.standard_normal(max(n_priv, 1)))
    type_base = cfg.type_strength * world_rng.standard_normal(n_types)
    pairs = np.arange(2 * n_pairs, dtype=np.int64).reshape(n_pairs, 2)
    cross = np.zeros((n_types, n_types))
    for a, b in pairs:
        # B's type embedding gets A's visible utility, so the logging policy (which ranks by
        # visible features) treats A and B alike; the base utility alone gives A its advantage
        type_emb[b] += (w_vis @ (type_emb[a] - type_emb[b])) * w_vis / float(w_vis @ w_vis)
        type_base[b] = type_base[a] - cfg.rival_advantage
        cross[a, b] = -cfg.cross_strength / 2
        cross[b, a] = +cfg.cross_strength / 2

    # ---- sets ----
    sizes = set_rng.integers(cfg.min_items, cfg.max_items + 1, size=cfg.num_sets)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    set_of = np.repeat(np.arange(cfg.num_sets), sizes)
    types = set_rng.integers(2 * n_pairs, n_types, size=n)  # non-rival types
    presence = set_rng.random((cfg.num_sets, n_pairs)) < cfg.rival_presence
    both = set_rng.random((cfg.num_sets, n_pairs)) < cfg.rival_cooccurrence
    which = set_rng.integers(0, 2, size=(cfg.num_sets, n_pairs))  # A or B when only one
    if n_pairs:
        for s in np.flatnonzero(presence.any(axis=1)):
            slots = offsets[s] + set_rng.permutation(sizes[s])
            k = 0
            for p in np.flatnonzero(presence[s]):
                shown = pairs[p] if both[s, p] else pairs[p, which[s, p] : which[s, p] + 1]
                for t in shown:
                    types[slots[k]] = t
                    k += 1

    context = set_rng.standard_normal((cfg.num_sets, n_ctx))[set_of]
    item_x = cfg.type_signal * type_emb[types] + cfg.feature_noise * set_rng.standard_normal(
        (n, n_item)
    )
    latent_priv = set_rng.standard_normal((n, max(n_priv, 1)))
    priv_x = latent_priv[:, :n_priv] + cfg.privileged_noise * set_rng.standard_normal((n, n_priv))
    set_bias = cfg.set_bias_std * set_rng.standard_normal(cfg.num_sets)[set_of]
    noise = cfg.utility_noise * set_rng.standard_normal(n)
    log_noise = cfg.logging_noise * set_rng.standard_normal(n)
    click_u = set_rng.random(n)
    exam_u = set_rng.random(n)
    shuffle_keys = set_rng.random(n)

    visible = item_x @ w_vis
    ctx_term = np.einsum("ij,jk,ik->i", item_x, w_ctx[:, :n_ctx], context) if n_ctx else np.zeros(n)
    priv_term = (
        cfg.privileged_strength * (latent_priv[:, :n_priv] @ w_priv[:n_priv]) if n_priv else 0.0
    )
    cross_term = _cross_term(types, set_of, cfg.num_sets, cross, pairs)
    utility = cfg.base_utility + set_bias + visible + type_base[types] + ctx_term + priv_term
    utility = utility + cross_term + noise
    relevance = 1.0 / (1.0 + np.exp(-utility))

    # logging policy: rank by the linear visible utility + noise; position-biased examination
    log_score = visible + log_noise
    positions = _positions_within_sets(log_score, set_of, offsets)
    examination = (1.0 / (positions + 1.0)) ** cfg.position_bias
    clicks = (exam_u < examination) & (click_u < relevance)

    order = np.arange(n)
    if not cfg.shuffle_items:  # store items in logged order
        order = np.lexsort((positions, set_of))
    else:
        order = np.lexsort((shuffle_keys, set_of))
    features = np.concatenate([context, item_x, priv_x], axis=1)[order]
    if cfg.raw_scale > 0:
        features = RawScaling.draw(features, seed, max_factor=cfg.raw_scale).apply(features)
    features = features.astype(np.float32)
    names = (
        [f"ctx{i}" for i in range(n_ctx)]
        + [f"item{i}" for i in range(n_item)]
        + [f"priv{i}" for i in range(n_priv)]
    )
    set_ids = np.array([f"s{k:05d}" for k in range(cfg.num_sets)])
    within = np.arange(n) - offsets[set_of]
    item_ids = np.char.add(np.char.add(set_ids[set_of], "-"), within.astype(str))
    sets = ExampleSets(
        features=features,
        labels=clicks[order].astype(np.float32),
        offsets=offsets,
        set_ids=set_ids,
        item_ids=item_ids,
        relevance=relevance[order].astype(np.float32),
        feature_names=tuple(names),
    )
    n_vis = n_ctx + n_item
    return SyntheticData(
        sets=sets,
        privileged_columns=np.arange(n_vis, n_vis + n_priv, dtype=np.int64),
        student_columns=np.arange(n_vis, dtype=np.int64),
        config=cfg,
        seed=int(seed),
        item_types=types[order].astype(np.int64),
        rival_pairs=pairs,
        cross_effect=cross,
        positions=positions[order].astype(np.int64),
        examination=examination[order],
        feature_groups={
            "context": np.arange(n_ctx, dtype=np.int64),
            "item": np.arange(n_ctx, n_vis, dtype=np.int64),
            "privileged": np.arange(n_vis, n_vis + n_priv, dtype=np.int64),
        },
    )


def split_synthetic(data: SyntheticData) -> dict[str, ExampleSets]:
    """Cut train / vali / test from generated sets (sets are i.i.d., so by position)."""
    cfg = data.config
    total = data.sets.num_sets
    n_vali = int(round(total * cfg.vali_fraction))
    n_test = int(round(total * cfg.test_fraction))
    n_train = total - n_vali - n_test
    if (
        n_train < 1
        or (cfg.vali_fraction > 0 and n_vali < 1)
        or (cfg.test_fraction > 0 and n_test < 1)
    ):
        raise ConfigError(
            f"SyntheticConfig.num_sets={total} is too small for the vali/test fractions"
        )
    cuts = {
        "train": (0, n_train),
        "vali": (n_train, n_train + n_vali),
        "test": (n_train + n_vali, total),
    }
    return {name: data.sets.take(np.arange(a, b)) for name, (a, b) in cuts.items() if b > a}


def synthetic_splits(
    seed: int = 0, config: SyntheticConfig | None = None
) -> dict[str, ExampleSets]:
    """Train / vali / test sets of one generated world (same privileged columns in each)."""
    return split_synthetic(generate_synthetic(config, seed=seed))


# ---- raw-like feature scales ------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RawScaling:
    """A seeded, per-column monotone map from normalised features to raw-looking ones.

    Column ``j`` becomes ``factor_j * x_j`` (linear columns) or
    ``factor_j * expm1(rate_j * max(x_j - low_j, 0))`` (exponential columns: heavy-tailed,
    non-negative, zero-inflated where ``x`` sits at its minimum, like counts), with
    ``factor_j`` log-uniform in ``[1, max_factor]``. Ranking information is unchanged (every
    map is non-decreasing); only the scales a model sees change. Tests and benchmarks use it
    to turn the synthetic data or MQ2008 (features in 0..1) into raw-like data.
    """

    factors: np.ndarray  # [F] multiplier of each column
    exp_columns: np.ndarray  # [F] bool: the column goes through exp first
    rates: np.ndarray  # [F] exponent per unit of x (exp columns)
    lows: np.ndarray  # [F] x value that maps to 0 (exp columns)

    @classmethod
    def draw(
        cls,
        reference: np.ndarray,
        seed: int,
        max_factor: float = 1e5,
        exp_fraction: float = 0.5,
    ) -> RawScaling:
        """Parameters for the columns of ``reference`` ``[items, F]`` (e.g. the training
        split; apply the same scaling to every split). Exponential columns get a rate so that
        the column's spread (its standard deviation) spans ``e^1.5`` to ``e^3``."""
        if max_factor < 1:
            raise ConfigError(f"raw scaling: max_factor must be >= 1, got {max_factor}")
        x = np.asarray(reference, dtype=np.float64)
        width = x.shape[1]
        rng = np.random.default_rng([int(seed), 0x5CA1E])  # a stream of its own
        factors = 10.0 ** rng.uniform(0.0, np.log10(max_factor), size=width)
        exp_columns = rng.random(width) < exp_fraction
        spread = rng.uniform(1.5, 3.0, size=width)
        sd = x.std(axis=0) if x.shape[0] else np.ones(width)
        rates = spread / np.where(sd > 1e-12, sd, 1.0)
        lows = x.min(axis=0) if x.shape[0] else np.zeros(width)
        return cls(factors, exp_columns, rates, lows)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """The raw-like features (float64, same shape)."""
        x = np.asarray(features, dtype=np.float64)
        # exponents are capped at 60 (e^60 ~ 1e26, still a finite float32 after the factor)
        exponent = np.minimum(self.rates * np.maximum(x - self.lows, 0.0), 60.0)
        grown = np.expm1(exponent)
        return self.factors * np.where(self.exp_columns, grown, x)


def raw_like_splits(
    splits: dict[str, ExampleSets], seed: int = 0, max_factor: float = 1e5
) -> dict[str, ExampleSets]:
    """Every split with raw-like features (:class:`RawScaling` drawn on the ``train`` split)."""
    scaling = RawScaling.draw(splits["train"].features, seed, max_factor=max_factor)
    out = {}
    for name, sets in splits.items():
        out[name] = ExampleSets(
            features=scaling.apply(sets.features).astype(np.float32),
            labels=sets.labels,
            offsets=sets.offsets,
            set_ids=sets.set_ids,
            item_ids=sets.item_ids,
            relevance=sets.relevance,
            feature_names=sets.feature_names,
        )
    return out


# ---- helpers ---------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _cross_term(
    types: np.ndarray, set_of: np.ndarray, num_sets: int, cross: np.ndarray, pairs: np.ndarray
) -> np.ndarray:
    """Utility change of each item from the other item types shown in its set."""
    out = np.zeros(types.size)
    if pairs.size == 0:
        return out
    rival_types = pairs.ravel()
    shown = np.zeros((num_sets, cross.shape[0]), dtype=bool)  # which rival types each set shows
    for t in rival_types:
        shown[set_of[types == t], t] = True
    effect = shown[:, rival_types].astype(float) @ cross[:, rival_types].T  # [sets, types]
    # an item is not its own rival: cross has a zero diagonal, so no correction needed
    return effect[set_of, types]


def _positions_within_sets(
    score: np.ndarray, set_of: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """0-based rank of each item by descending ``score`` inside its set."""
    order = np.lexsort((-score, set_of))  # by set, then score descending
    positions = np.empty(score.size, dtype=np.int64)
    positions[order] = np.arange(score.size) - offsets[set_of[order]]
    return positions
