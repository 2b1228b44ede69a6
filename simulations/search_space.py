"""The search space of a sweep: which configuration keys vary, over which values.

A space is a table ``{key: [values] | {low, high, log, int, steps}}`` of configuration keys (a
scenario's ``[sweep.space]``): a list gives those values, a range is sampled by Optuna's
samplers (``--random``, ``--tpe``; :meth:`Param.suggest`) or cut into ``steps`` points
(``--grid``). Without one a sweep covers the weights of the four loss families and the
distillation temperature (:data:`DEFAULT_SPACE`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError

__all__ = ["DEFAULT_SPACE", "Param", "SearchSpace"]

# the weights of the four loss families and the temperature of the rank losses
DEFAULT_SPACE: dict[str, Any] = {
    "label-weight": [0.0, 0.2, 1.0],
    "score-weight": [0.0, 1.0],
    "rank-label-weight": [0.0, 1.0],
    "rank-weight": [0.0, 1.0, 4.0],
    "temperature": [1.0, 2.0],
}
# pair-weight options join the default space when the configuration has them
OPTIONAL_DEFAULTS: dict[str, Any] = {"pair-weight": ["none", "log_discount"]}
PAIR_KEYS = ("pair-weight", "weight-ranks")


# ---- search space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One dimension: a list of ``values``, or a range ``[low, high]`` (``log``/``int``)."""

    name: str
    values: tuple[Any, ...] | None = None
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    integer: bool = False
    steps: int = 0

    def grid(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        if self.steps < 1:
            raise ConfigError(
                f"{self.name!r} is a range without 'steps': --grid needs a list of values or "
                "'steps' (use --random or --tpe to sample ranges)"
            )
        if self.log:
            points = np.geomspace(self.low, self.high, self.steps)
        else:
            points = np.linspace(self.low, self.high, self.steps)
        return [self._cast(v) for v in points]

    def suggest(self, trial: optuna.Trial) -> Any:
        """This dimension's value in an Optuna trial (a list: categories; a range: sampled)."""
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def _cast(self, value: float) -> Any:
        return int(round(value)) if self.integer else round(float(value), 6)


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a sweep, in a fixed order."""

    params: tuple[Param, ...]

    @classmethod
    def parse(cls, space: Mapping[str, Any]) -> SearchSpace:
        """From ``{key: [values] | {low, high, log, int, steps}}``; keys must be config keys."""

        if not isinstance(space, Mapping) or not space:
            raise ConfigError("the search space must be a non-empty table of configuration keys")
        valid = FedrankConfig.keys()
        params = []
        for name, spec in space.items():
            if name not in valid or name in ("seed", "out-dir"):
                raise ConfigError(f"{name!r} is not a configuration key that can be swept")
            if isinstance(spec, list):
                if not spec:
                    raise ConfigError(f"{name!r}: the list of values is empty")
                # pair weights need a pairwise loss: the point's other keys decide (a point
                # without one is skipped, naming the reason), so probe the value with one
                probe = {"rank-loss": "rank_pairwise_ce"} if name in PAIR_KEYS else {}
                for value in spec:
                    try:
                        FedrankConfig.from_run_config({name: value, "label-weight": 1, **probe})
                    except ConfigError as err:
                        if name.endswith("-weight"):  # all-zero weights are fine in a sweep
                            if "are 0" not in str(err):
                                raise ConfigError(f"{name!r} value {value!r}: {err}") from None
                        else:
                            raise ConfigError(f"{name!r} value {value!r}: {err}") from None
                params.append(Param(name, values=tuple(spec)))
            elif isinstance(spec, Mapping):
                bad = sorted(k for k in spec if k not in ("low", "high", "log", "int", "steps"))
                if bad:
                    raise ConfigError(f"{name!r}: unknown range key(s) {bad}")
                try:
                    low, high = float(spec["low"]), float(spec["high"])
                except (KeyError, TypeError, ValueError):
                    raise ConfigError(f"{name!r}: a range needs numbers 'low' and 'high'") from None
                log = bool(spec.get("log", False))
                if not low < high or (log and low <= 0):
                    raise ConfigError(
                        f"{name!r}: need low < high (and low > 0 for log), got {low}, {high}"
                    )
                steps = int(spec.get("steps", 0))
                params.append(
                    Param(name, None, low, high, log, bool(spec.get("int", False)), steps)
                )
            else:
                raise ConfigError(f"{name!r}: give a list of values or a range table")
        return cls(tuple(params))

    @classmethod
    def default(cls) -> SearchSpace:

        space = dict(DEFAULT_SPACE)
        keys = FedrankConfig.keys()
        space.update({k: v for k, v in OPTIONAL_DEFAULTS.items() if k in keys})
        return cls.parse(space)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def grid(self) -> list[dict[str, Any]]:
        axes = [p.grid() for p in self.params]
        return [dict(zip(self.names, point, strict=True)) for point in itertools.product(*axes)]
