"""Every tunable of a fedrank federation, in one place.

:class:`FedrankConfig` is the single source of truth for the keys of ``[tool.flwr.app.config]``
(hyphenated, as Flower writes them) and their defaults; the dataclass fields are the same names
in snake_case. :meth:`FedrankConfig.from_run_config` validates a mapping of keys (a Flower
``run_config``, ``--run-config`` overrides or a dict from Python) and raises
:class:`~fedrank.common.errors.ConfigError` naming the key for any unknown key or bad value, so a
bad configuration fails before the first round.

The server sends the client-side keys (:data:`CLIENT_KEYS`) to every client in its train and
evaluate ``ConfigRecord``; a device needs nothing but ``data-path`` in its own ``node_config``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedrank.common.errors import ConfigError
from fedrank.common.features import restrict_features
from fedrank.common.losses import (
    LOSSES,
    PAIR_WEIGHTS,
    WEIGHT_RANKS,
    CompositeLoss,
    LossTerm,
    WeightSchedule,
    losses_of,
)

__all__ = [
    "CHOICES",
    "CLIENT_KEYS",
    "DP_STRATEGIES",
    "check_dp_strategy",
    "FedrankConfig",
    "LOSS_KEYS",
    "to_key",
    "to_field",
]

# allowed values of the string options that are a choice
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": (
        "fedavg",
        "fedprox",
        "fedadam",
        "fedtrimmedavg",
        "fedmedian",
        "krum",
        "multikrum",
        "bulyan",
    ),
    "score_mode": ("broadcast", "targeted"),
    "score_dtype": ("float32", "float16"),
    "optimizer": ("adam", "sgd"),
    "student_features": ("device", "all"),
    "partition_scheme": ("iid", "dirichlet", "sizes"),
    "eval_split": ("test", "vali"),
    "partition_attribute": ("positive_rate", "cluster"),
    "pair_weight": PAIR_WEIGHTS,
    "weight_ranks": WEIGHT_RANKS,
    "teacher_kind": ("set-transformer", "lightgbm", "imported"),
}

# strategies whose aggregate is a plain average of the (clipped) updates: what DP's
# accounting covers (fedrank.server.privacy)
DP_STRATEGIES = ("fedavg", "fedprox")
# loss family -> (key of the loss name, key of the weight)
LOSS_KEYS: dict[str, tuple[str, str]] = {
    "label": ("label_loss", "label_weight"),
    "score": ("score_loss", "score_weight"),
    "rank_label": ("rank_label_loss", "rank_label_weight"),
    "rank": ("rank_loss", "rank_weight"),
}


# ---- upper bounds: a value past them would fail later with a traceback (or fill memory) ----
#: Flower's records carry integers as int64.
INT64_MAX = 2**63 - 1
#: numpy's legacy seeding and many tools take 32-bit seeds.
MAX_SEED = 2**32 - 1
MAX_STUDENT_WIDTH = 4096
MAX_STUDENT_LAYERS = 8
UPPER_BOUNDS: dict[str, int] = {
    "seed": MAX_SEED,
    "teacher_d_model": 4096,
    "teacher_layers": 48,
    "batch_size": 65536,
}


def check_dp_strategy(strategy: str, noise_multiplier: float) -> None:
    """ConfigError unless DP's accounting covers ``strategy`` (:data:`DP_STRATEGIES`); the
    configuration checks it, and so does the server when it wraps a strategy for DP."""
    if strategy not in DP_STRATEGIES:
        raise ConfigError(
            f"'strategy' {strategy!r} cannot run with differential privacy "
            f"('dp-noise-multiplier' {noise_multiplier:g}): DP's accounting covers a plain "
            f"average of clipped updates only ({' or '.join(map(repr, DP_STRATEGIES))}); a "
            "server optimiser steps after the noise and selecting or trimming rules change the "
            "sensitivity, so the reported epsilon would not hold"
        )


def to_key(field_name: str) -> str:
    """``local_epochs`` -> ``local-epochs`` (the Flower configuration key)."""
    return field_name.replace("_", "-")


def to_field(key: str) -> str:
    """``local-epochs`` -> ``local_epochs``."""
    return key.replace("-", "_")


@dataclass(frozen=True)
class FedrankConfig:
    """All settings of a run; see ``docs/federation.md`` for each key.

    Field ``x_y`` is the configuration key ``x-y``. Defaults give a quick run on the default
    synthetic data: a small student, five rounds, rank distillation on.
    """

    # ---- data and models ------------------------------------------------------------------
    data_path: str = "synthetic"
    seed: int = 0
    student_hidden: str = "16"
    student_features: str = "device"
    device_features: str = ""
    # per-column feature normalisation fitted by the server, inside the student
    feature_transform: bool = True
    # ---- federation -----------------------------------------------------------------------
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_nodes: int = 2
    min_replies: int = 1
    round_timeout: float = 600.0
    per_node_log: bool = True
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.05
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    trim_beta: float = 0.2
    score_mode: str = "targeted"
    score_dtype: str = "float32"
    client_policy: str = "uniform"
    client_policy_options: str = ""
    # ---- optional differential privacy (server-side clipping + Gaussian noise) ------------
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    # ---- local training on the clients ----------------------------------------------------
    local_epochs: int = 2
    local_steps: int = 0
    # floor of the optimiser steps per round (a client with a dozen sets still trains)
    min_local_steps: int = 20
    learning_rate: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 16
    label_loss: str = "label_sigmoid_ce"
    label_weight: float | str = 0.2
    score_loss: str = "score_sigmoid_ce"
    score_weight: float | str = 0.0
    rank_label_loss: str = "label_softmax"
    rank_label_weight: float | str = 1.0
    rank_loss: str = "rank_softmax_ce"
    rank_weight: float | str = 1.0
    temperature: float = 1.0
    pair_weight: str = "none"
    weight_ranks: str = "teacher"
    label_fraction: float = 1.0
    # ---- simulated clients ----------------------------------------------------------------
    partition_scheme: str = "iid"
    partition_alpha: float = 0.5
    partition_attribute: str = "positive_rate"
    partition_power: float = 1.0
    # ---- teacher (trained once on the server, cached) -------------------------------------
    teacher_epochs: int = 30
    teacher_d_model: int = 64
    teacher_layers: int = 2
    teacher_heads: int = 4
    teacher_lr: float = 0.002
    teacher_cache_dir: str = ""
    # ---- teacher kind: the built-in set transformer, LightGBM LambdaMART or imported scores -
    teacher_kind: str = "set-transformer"
    teacher_scores: str = ""
    lightgbm_trees: int = 500
    lightgbm_leaves: int = 31
    lightgbm_learning_rate: float = 0.05
    lightgbm_min_data_in_leaf: int = 20
    lightgbm_early_stopping: int = 50
    # ---- evaluation and outputs -----------------------------------------------------------
    eval_split: str = "test"
    out_dir: str = "runs/fedrank"
    resume: bool = False
    # ---- slow, failing and hostile nodes (docs/federation.md, "Robustness") -------------------
    node_wait_timeout: float = 60.0
    max_update_norm: float = 10.0
    update_norm_ratio: float = 3.0
    max_examples_per_node: int = 0
    num_malicious_nodes: int = 1
    num_nodes_to_select: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()
        self._check_bounds()
        self._check_cross_keys()
        self._check_robustness()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """Every configuration key (hyphenated), in declaration order."""
        return [to_key(f.name) for f in fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{key: default}`` for every key: what ``[tool.flwr.app.config]`` holds."""
        return {to_key(f.name): f.default for f in fields(cls)}

    @classmethod
    def from_run_config(
        cls, mapping: Mapping[str, Any] | None = None, **overrides: Any
    ) -> FedrankConfig:
        """Validate ``mapping`` (hyphenated or snake_case keys) on top of the defaults.

        Unknown keys and bad values raise :class:`ConfigError` naming the key.
        """
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in {**dict(mapping or {}), **overrides}.items():
            name = to_field(str(key))
            if name not in names:
                raise ConfigError(
                    f"unknown configuration key {key!r}; valid keys: {', '.join(cls.keys())}"
                )
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """``{key: value}`` with hyphenated keys (JSON-able; what ``config.json`` holds)."""
        return {to_key(k): v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> FedrankConfig:
        """A copy with ``changes`` (hyphenated or snake_case keys), validated again."""
        return FedrankConfig.from_run_config({**self.to_dict(), **changes})

    def client_dict(self) -> dict[str, Any]:
        """The keys a client needs, to travel in its ``ConfigRecord``."""
        return {k: v for k, v in self.to_dict().items() if k in CLIENT_KEYS}

    # ---- derived objects ----------------------------------------------------------------
    def hidden_sizes(self) -> tuple[int, ...]:
        """``student-hidden`` as layer widths; ``""`` gives a linear student."""
        text = self.student_hidden.strip()
        if not text:
            return ()
        try:
            widths = tuple(int(p) for p in text.replace(" ", "").split(","))
        except ValueError:
            raise ConfigError(
                f"'student-hidden' must be comma-separated widths such as '32,16' or '' "
                f"for a linear student, got {self.student_hidden!r}"
            ) from None
        if any(w < 1 for w in widths):
            raise ConfigError(f"'student-hidden' widths must be >= 1, got {self.student_hidden!r}")
        return widths

    def loss_terms(self) -> list[LossTerm]:
        """The :class:`~fedrank.common.losses.LossTerm` list of the composite loss (zero weights
        kept, so each term's value is still logged). ``temperature`` goes to every teacher loss
        that takes one; ``pair-weight`` and ``weight-ranks`` to every pairwise loss."""
        terms = []
        weighted = self.pair_weight != "none"
        takers: list[str] = []
        for family, (loss_field, weight_field) in LOSS_KEYS.items():
            loss = getattr(self, loss_field)
            weight = getattr(self, weight_field)
            if loss not in losses_of(family):
                raise ConfigError(
                    f"{to_key(loss_field)!r}: unknown loss {loss!r} for the {family} term; "
                    f"valid: {', '.join(losses_of(family))}"
                )
            try:
                WeightSchedule.parse(weight, context=to_key(weight_field))
            except ConfigError as err:
                raise ConfigError(f"{to_key(weight_field)!r}: {err}") from None
            info = LOSSES[loss]
            options: dict[str, Any] = {}
            if info.target == "teacher" and info.takes("temperature"):
                options["temperature"] = float(self.temperature)
            if weighted and info.pairwise:
                options["pair_weight"] = self.pair_weight
                options["weight_ranks"] = self.weight_ranks
                takers.append(f"{to_key(loss_field)} = {loss}")
            terms.append(LossTerm(family, loss, weight, options))
        if weighted and not takers:
            pairwise = [name for name, info in LOSSES.items() if info.pairwise]
            raise ConfigError(
                f"'pair-weight' {self.pair_weight!r} needs a loss that takes pair weights, but "
                f"'rank-loss' {self.rank_loss!r} and 'rank-label-loss' {self.rank_label_loss!r} "
                f"do not; losses that do: {', '.join(pairwise)} (or set 'pair-weight' = none)"
            )
        return terms

    def composite_loss(self) -> Any:
        """The client's training loss :class:`~fedrank.common.losses.CompositeLoss`."""

        return CompositeLoss(self.loss_terms())

    @property
    def uses_teacher(self) -> bool:
        """True when some loss term with a non-zero weight needs the teacher's scores."""
        return bool(self.composite_loss().needs_teacher)

    def device_columns(self, num_features: int, default: Any = None) -> list[int] | None:
        """Feature columns of the student, from ``student-features`` and ``device-features``.

        ``student-features = "all"``: None (every column). Otherwise ``device-features``
        ``""`` gives ``default`` (the dataset's device columns); a count (``"20"``), a fraction
        (``"0.5"``) or a comma list of column indices (``"1,2,5"``) picks the columns with
        :func:`fedrank.common.features.restrict_features` (seeded by ``seed``). ConfigError naming
        ``device-features`` when the value does not fit ``num_features``.
        """
        if self.student_features == "all":
            return None
        keep = self._device_keep()
        if keep is None:
            return None if default is None else [int(c) for c in default]

        try:
            cols = restrict_features(int(num_features), keep, seed=self.seed)
        except ConfigError as err:
            raise ConfigError(
                f"'device-features' {self.device_features!r} does not fit the data's "
                f"{num_features} feature columns: {err}"
            ) from None
        return [int(c) for c in cols]

    def _device_keep(self) -> int | float | list[int] | None:
        """``device-features`` parsed: None, a count, a fraction or a list of columns."""
        text = self.device_features.strip().replace(" ", "")
        if not text:
            return None
        expected = (
            "must be '' (the data's device columns), a column count such as '20', a "
            "fraction in (0, 1] such as '0.5' or a comma list of column indices such as "
            f"'1,2,5', got {self.device_features!r}"
        )
        try:
            if "," in text:
                cols = [int(p) for p in text.split(",")]
                if any(c < 0 for c in cols):
                    raise ValueError
                return cols
            if text.isdigit():
                if int(text) < 1:
                    raise ValueError
                return int(text)
            fraction = float(text)
            if not 0.0 < fraction <= 1.0:
                raise ValueError
            return fraction
        except ValueError:
            raise ConfigError(f"'device-features' {expected}") from None

    def policy_options(self) -> dict[str, Any]:
        """``client-policy-options`` as a dict (``{}`` when empty); ConfigError naming the key
        when it is not a JSON object."""

        text = self.client_policy_options.strip()
        if not text:
            return {}
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"'client-policy-options' is not valid JSON ({err.msg}): "
                f"{self.client_policy_options!r}"
            ) from None
        if not isinstance(options, dict):
            raise ConfigError(
                "'client-policy-options' must hold a JSON object ({...}), got "
                f"{self.client_policy_options!r}"
            )
        return options

    def check_data_path(self, base: str | Path | None = None) -> None:
        """Raise ConfigError naming ``data-path`` unless it is ``synthetic`` or exists."""
        if self.data_path == "synthetic" or self.data_path.startswith("synthetic:"):
            return
        path = Path(self.data_path)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        if not path.exists():
            raise ConfigError(
                f"'data-path' {self.data_path!r} does not exist; give 'synthetic' or a LETOR "
                "file or fold folder (e.g. ../shared/data/MQ2008/Fold1)"
            )

    # ---- validation ---------------------------------------------------------------------
    def _check_teacher_kind(self) -> None:
        """``teacher-kind`` against ``teacher-scores`` and the ``lightgbm-*`` settings."""
        if self.teacher_kind == "imported" and not self.teacher_scores.strip():
            raise ConfigError(
                "'teacher-kind' = imported needs 'teacher-scores': a table folder written by "
                "`fedrank teacher --scores` or a TREC run / CSV / Parquet file of scores"
            )
        if self.teacher_kind != "imported" and self.teacher_scores.strip():
            raise ConfigError(
                f"'teacher-scores' is set but 'teacher-kind' is {self.teacher_kind!r}; "
                "set 'teacher-kind' = imported to distil those scores"
            )
        for name, low in (
            ("lightgbm_trees", 1),
            ("lightgbm_leaves", 2),
            ("lightgbm_min_data_in_leaf", 1),
            ("lightgbm_early_stopping", 0),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"{to_key(name)!r} must be >= {low}, got {getattr(self, name)!r}")
        if self.lightgbm_learning_rate <= 0:
            raise ConfigError(
                f"'lightgbm-learning-rate' must be > 0, got {self.lightgbm_learning_rate!r}"
            )

    def _check_robustness(self) -> None:
        """The keys of slow, failing and hostile nodes, and what DP's accounting covers."""

        def fail(name: str, what: str) -> None:
            raise ConfigError(f"{to_key(name)!r} {what}, got {getattr(self, name)!r}")

        if self.node_wait_timeout <= 0:
            fail("node_wait_timeout", "must be > 0 (seconds)")
        if self.max_update_norm < 0:
            fail("max_update_norm", "must be >= 0 (0: no bound)")
        if self.update_norm_ratio != 0 and self.update_norm_ratio < 1:
            fail("update_norm_ratio", "must be 0 (no bound) or >= 1 (times the round's median)")
        if self.max_examples_per_node < -1:
            fail("max_examples_per_node", "must be >= -1 (-1: no cap, 0: the server's set count)")
        for name in ("num_malicious_nodes", "num_nodes_to_select"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.dp_noise_multiplier > 0:
            check_dp_strategy(self.strategy, self.dp_noise_multiplier)

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            key = to_key(f.name)
            expected = type(f.default)
            if f.name.endswith("_weight"):
                # a number or a schedule string ('linear:START:END:STEPS', 'step:V0:V1:AT')
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ConfigError(
                        f"{key!r} must be a number or a schedule string, got {value!r}"
                    )
                if not isinstance(value, str):
                    object.__setattr__(self, f.name, float(value))
                continue
            if expected is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"{key!r} must be true or false, got {value!r}")
            elif expected is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        object.__setattr__(self, f.name, int(value))
                        continue
                    raise ConfigError(f"{key!r} must be an integer, got {value!r}")
            elif expected is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{key!r} must be a number, got {value!r}")
                if not math.isfinite(float(value)):
                    raise ConfigError(f"{key!r} must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif expected is str and not isinstance(value, str):
                raise ConfigError(f"{key!r} must be a string, got {value!r}")

    def _check_values(self) -> None:
        def fail(name: str, what: str) -> None:
            raise ConfigError(f"{to_key(name)!r} {what}, got {getattr(self, name)!r}")

        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                fail(name, f"must be one of {', '.join(valid)}")
        if not self.data_path.strip():
            fail("data_path", "is missing: give 'synthetic' or a LETOR file or fold folder")
        if not self.out_dir.strip():
            fail("out_dir", "must name an output folder")
        for name in (
            "num_server_rounds",
            "min_available_nodes",
            "min_replies",
            "batch_size",
            "teacher_epochs",
        ):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("teacher_d_model", "teacher_heads"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("local_epochs", "local_steps", "teacher_layers", "seed"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.min_local_steps < 0:
            fail("min_local_steps", "must be >= 0")
        if self.local_epochs == 0 and self.local_steps == 0 and self.min_local_steps == 0:
            fail(
                "local_epochs",
                "and 'local-steps' and 'min-local-steps' are all 0: clients would not train",
            )
        if not 0.0 < self.fraction_train <= 1.0:
            fail("fraction_train", "must lie in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            fail("fraction_evaluate", "must lie in [0, 1]")
        for name in ("learning_rate", "server_learning_rate", "teacher_lr", "temperature"):
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        for name in ("round_timeout", "partition_alpha", "server_tau"):
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        for name in ("proximal_mu", "weight_decay", "dp_noise_multiplier", "partition_power"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.dp_clipping_norm <= 0:
            fail("dp_clipping_norm", "must be > 0")
        if not 0.0 < self.dp_delta < 1.0:
            fail("dp_delta", "must lie in (0, 1)")
        for name in ("server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must lie in [0, 1)")
        if not 0.0 <= self.trim_beta < 0.5:
            fail("trim_beta", "must lie in [0, 0.5)")
        if not 0.0 <= self.label_fraction <= 1.0:
            fail("label_fraction", "must lie in [0, 1]")
        if self.teacher_d_model % self.teacher_heads:
            fail("teacher_d_model", f"must be divisible by 'teacher-heads' ({self.teacher_heads})")
        self._check_teacher_kind()
        self.hidden_sizes()
        if self._device_keep() is not None and self.student_features == "all":
            fail(
                "device_features",
                "needs 'student-features' = device (with 'all' the student reads every column)",
            )
        self.policy_options()
        loss = self.composite_loss()  # unknown loss names, wrong family, negative weights
        if all(t.schedule.always_zero for t in loss.terms):
            raise ConfigError(
                "all loss weights ('label-weight', 'score-weight', 'rank-label-weight', "
                "'rank-weight') are 0: clients would have nothing to train on"
            )
        if self.label_fraction == 0 and not loss.needs_teacher:
            fail("label_fraction", "is 0 and no teacher loss has a weight: nothing to learn from")
        # 'client-policy' names a policy of fedrank.server.client_policy: checked there, on the
        # server, when the federation is set up (before any round)

    # ---- upper bounds and keys that contradict each other --------------------------------
    def _check_bounds(self) -> None:
        """Every integer fits in int64; sizes and the seed stay within :data:`UPPER_BOUNDS`."""
        for name, top in UPPER_BOUNDS.items():
            if getattr(self, name) > top:
                raise ConfigError(f"{to_key(name)!r} must be <= {top}, got {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
                raise ConfigError(f"{to_key(f.name)!r} must fit in 64 bits, got {value!r}")
        widths = self.hidden_sizes()
        if len(widths) > MAX_STUDENT_LAYERS or any(w > MAX_STUDENT_WIDTH for w in widths):
            raise ConfigError(
                f"'student-hidden' allows at most {MAX_STUDENT_LAYERS} layers of at most "
                f"{MAX_STUDENT_WIDTH} units (a device student), got {self.student_hidden!r}"
            )

    def _check_cross_keys(self) -> None:
        if self.min_replies > self.min_available_nodes:
            raise ConfigError(
                f"'min-replies' ({self.min_replies}) must be <= 'min-available-nodes' "
                f"({self.min_available_nodes}): a round starts once that many nodes are "
                "connected, and asking for more replies than that can stall or stop the run"
            )


# keys that travel to clients in every train/evaluate ConfigRecord
CLIENT_KEYS: frozenset[str] = frozenset(
    to_key(n)
    for n in (
        "data_path",
        "seed",
        "local_epochs",
        "local_steps",
        "min_local_steps",
        "learning_rate",
        "optimizer",
        "weight_decay",
        "batch_size",
        "label_loss",
        "label_weight",
        "score_loss",
        "score_weight",
        "rank_label_loss",
        "rank_label_weight",
        "rank_loss",
        "rank_weight",
        "temperature",
        "label_fraction",
        "partition_scheme",
        "partition_alpha",
        "partition_attribute",
        "partition_power",
        "pair_weight",
        "weight_ranks",
        "score_mode",
    )
)
