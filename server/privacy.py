"""Optional client-level differential privacy: Flower's DP strategy wrapper and its budget.

Configuration keys (all optional; DP is off while ``dp-noise-multiplier`` is 0):

==========================  ================================================================
``dp-noise-multiplier``     sigma of the Gaussian mechanism (noise std = sigma * clip / n)
``dp-clipping-norm``        L2 bound of each client's update ``w_client - w_global``
``dp-delta``                the delta of the reported (epsilon, delta) budget (default 1e-5)
==========================  ================================================================

:func:`wrap_strategy` puts a strategy inside Flower's
``DifferentialPrivacyServerSideFixedClipping`` (server-side clipping of every client update,
Gaussian noise on the aggregate), as DP-FedAvg with a fixed denominator (McMahan et al., 2018,
"Learning differentially private recurrent language models"):

- ``n``, the number of clients sampled per round, is fixed when the run starts (the connected
  nodes times ``fraction-train``); a round never samples more than ``n``;
- each usable update is clipped to ``C = dp-clipping-norm`` here (Flower's own clipping
  divides by the update's norm and fails on a client that did not move; it also touches
  integer arrays), and the new model is ``w_global + (sum of clipped updates) / n`` plus
  Gaussian noise of std ``sigma * C / n``. A missing or rejected reply adds nothing to the sum
  but never shrinks ``n``: adding or removing one client changes the sum by at most ``C``, so
  the sensitivity is ``C / n`` whatever the clients do, and the noise is sized for it;
- integer buffers (the student's feature columns) are kept out of clipping and noise;
- ``update-norm-ratio`` is off under DP (a bound relative to the round's median lets one
  client change how much of the others' updates is kept); ``max-update-norm`` stays;
- after each round :attr:`FedrankDPFixedClipping.budget` holds the cumulative epsilon at
  ``dp-delta`` (:func:`epsilon`), for the round's log line and ``metrics.jsonl``.

The budget is computed with Renyi DP of the Gaussian mechanism composed over rounds, for
add/remove-one-client adjacency, without credit for client sampling (a valid upper bound
whatever fraction of clients train). Only a plain average of the clipped updates keeps that
sensitivity: :func:`~fedrank.common.config.check_dp_strategy` refuses DP with server optimisers
(``fedadam`` applies its step after the noise) and with rules that select or trim updates
(``fedtrimmedavg``, ``fedmedian``, ``krum``, ``multikrum``, ``bulyan``). What DP does not
protect: the metrics a client reports (losses, NDCG, example counts, timing), the set ids it
reports at hello in ``targeted`` mode, and whether and when it takes part. Attribute reads the
wrapper does not know (``policy``, ``nodes``...) go to the wrapped strategy."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedrank.common.config import DP_STRATEGIES, FedrankConfig, check_dp_strategy
from fedrank.common.errors import ConfigError
from fedrank.server.strategy import RoundEntryPoints, TrainPlan, TrainResult

__all__ = [
    "DPSettings",
    "DP_STRATEGIES",
    "FedrankDPFixedClipping",
    "epsilon",
    "wrap_strategy",
]

# Renyi orders searched when converting to (epsilon, delta)
ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128.0, 256.0])


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` compositions of the Gaussian mechanism with ``noise_multiplier``
    (sensitivity 1, noise std ``noise_multiplier``) at ``delta``; ``inf`` without noise.

    RDP of one release at order a is ``a / (2 sigma^2)``; the conversion is the one of Balle
    et al. (2020), ``eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1)``.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ConfigError(f"'dp-delta' must lie in (0, 1), got {delta}")
    best = math.inf
    for a in ORDERS:
        rdp = rounds * a / (2.0 * noise_multiplier**2)
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


@dataclass(frozen=True)
class DPSettings:
    """The DP part of a run configuration (``dp-*`` keys, checked by
    :class:`~fedrank.common.config.FedrankConfig`)."""

    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    delta: float = 1e-5

    @classmethod
    def from_config(cls, cfg: FedrankConfig) -> DPSettings:
        """The ``dp-*`` keys of ``cfg`` (validated there)."""
        return cls(cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


class FedrankDPFixedClipping(RoundEntryPoints, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper with equal client weights, integer
    buffers kept, and the cumulative budget after every round (see the module docstring)."""

    def __init__(self, strategy: Any, settings: DPSettings, num_sampled_clients: int) -> None:
        super().__init__(
            strategy,
            noise_multiplier=settings.noise_multiplier,
            clipping_norm=settings.clipping_norm,
            num_sampled_clients=num_sampled_clients,
        )
        self.settings = settings
        self.rounds_released = 0
        self._plan: TrainPlan | None = None
        # a bound relative to the round's median would let one client change how much of
        # the others' updates is kept: more than C / n. The fixed max-update-norm stays.
        defences = getattr(strategy, "defences", None)
        if defences is not None:
            strategy.defences = dataclasses.replace(defences, update_norm_ratio=0.0)
        self.budget: dict[str, float] = {"epsilon": 0.0, "delta": settings.delta}

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the wrapper lacks: the wrapped strategy's bookkeeping
        inner = self.__dict__.get("strategy")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainPlan:
        """The wrapped strategy's plan, with at most ``n`` messages (the fixed sample size)."""
        plan = self.strategy.configure_round(server_round, arrays, config, grid)
        if len(plan.messages) > self.num_sampled_clients:  # more nodes than at the start
            rng = random.Random(f"fedrank-dp-{server_round}")
            plan = plan.only(rng.sample(plan.messages, self.num_sampled_clients))
        return plan

    def aggregate_round(self, plan: TrainPlan, replies: Iterable[Message]) -> TrainResult:
        """Clip each usable update to ``dp-clipping-norm``, average them with equal weights
        through the wrapped strategy (which also screens the replies), scale the average to
        ``sum / n`` with the fixed ``n``, add Gaussian noise of std ``sigma * clip / n`` to the
        float weights, and update the budget."""
        full = plan.arrays
        floats = [k for k in full if full[k].numpy().dtype.kind == "f"]
        base = {k: full[k].numpy().astype(np.float64) for k in floats}
        key = self.strategy.weighted_by_key
        prepared = [self._clip(m, key, base) for m in replies]
        result = self.strategy.aggregate_round(plan, prepared)
        if result.arrays is None:
            return result
        used = len(result.clients)
        n = self.num_sampled_clients
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, n)
        noisy = [
            base[k]
            + (np.asarray(result.arrays[k].numpy(), dtype=np.float64) - base[k]) * (used / n)
            for k in floats
        ]
        add_gaussian_noise_inplace(noisy, std)
        out = ArrayRecord()
        for k in full:
            if k in base:
                out[k] = Array(np.asarray(noisy[floats.index(k)], dtype=full[k].numpy().dtype))
            else:  # integer buffers: never clipped, averaged or noised
                out[k] = Array(np.array(full[k].numpy()))
        self.rounds_released += 1
        eps = epsilon(self.settings.noise_multiplier, self.rounds_released, self.settings.delta)
        self.budget = {"epsilon": eps, "delta": self.settings.delta, "noise_std": std}
        return dataclasses.replace(result, arrays=out, budget=dict(self.budget))

    def _clip(self, msg: Message, weight_key: str, base: dict[str, np.ndarray]) -> Message:
        """The reply with weight 1 and its update clipped; replies that cannot be clipped
        (errors, missing keys, wrong shapes, NaN) pass unchanged for the screening to reject."""
        if msg.has_error():
            return msg
        records: dict[str, Any] = {}
        for name, record in msg.content.items():
            if isinstance(record, MetricRecord) and weight_key in record:
                record = MetricRecord({**dict(record), weight_key: 1})
            elif isinstance(record, ArrayRecord) and all(k in record for k in base):
                diffs = {k: record[k].numpy().astype(np.float64) - base[k] for k in base}
                if all(d.shape == base[k].shape for k, d in diffs.items()):
                    norm = math.sqrt(sum(float(np.sum(d * d)) for d in diffs.values()))
                    if math.isfinite(norm):
                        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
                        clipped = ArrayRecord()
                        for k in record:
                            value = record[k].numpy()
                            if k in base:
                                value = np.asarray(base[k] + diffs[k] * scale, dtype=value.dtype)
                            clipped[k] = Array(np.array(value))
                        record = clipped
            records[name] = record
        return Message(RecordDict(records), metadata=msg.metadata)


def wrap_strategy(strategy: Any, settings: DPSettings, num_sampled_clients: int) -> Any:
    """``strategy`` inside :class:`FedrankDPFixedClipping` when DP is on, else unchanged;
    ConfigError when DP's accounting does not cover the strategy."""
    if not settings.enabled:
        return strategy
    check_dp_strategy(str(getattr(strategy, "rule_name", "")), settings.noise_multiplier)
    if num_sampled_clients < 1:
        raise ConfigError(f"DP needs at least one sampled client, got {num_sampled_clients}")
    return FedrankDPFixedClipping(strategy, settings, num_sampled_clients)
