"""Per-client and adaptive loss weights: :class:`~fedrank.server.client_policy.ClientConfigPolicy`
subclasses that the server asks, every round, for each sampled node's settings.

Per-client settings are chosen by the client's ``client-key`` (the simulated partition id; a
checksum of the data path on a device), which the server learns from the node's hello. What a
policy learns is keyed by the server's node id, never by what a reply claims, so one node
cannot change another node's state.

``per-client`` (:class:`PerClientWeights`): fixed settings per client from configuration::

    [client-weights]
    policy = "per-client"
    default = { rank-weight = 1.0 }                # every client not named below
    [[client-weights.groups]]
    clients = [0, 1, 2, 3, 4, 5, 6]                # partition ids
    label-fraction = 0.1                           # these clients are label-scarce ...
    [[client-weights.by-label-fraction]]           # ... so rules by scarcity apply to them
    below = 0.5                                    # label-fraction < 0.5
    label-weight = 0.1
    rank-weight = 2.0

Order: ``default``, then the client's ``groups`` and ``clients."<id>"`` entries, then the first
``by-label-fraction`` rule whose ``below`` exceeds the client's label fraction (its own, or the
run's). Any client setting may be given (loss weights and loss names, ``temperature``,
``label-fraction``, ``learning-rate``, ``local-epochs``, ...).

``adaptive`` (:class:`AdaptiveWeights`): the server picks, per client and per round, one of a
few candidate weight settings with **Exp3** (the exponential-weights algorithm for bandit
feedback, in the loss-estimate form of Bubeck & Cesa-Bianchi, 2012, Thm. 3.1). Why this method:
each round a client trains with one setting and only that setting's outcome is observed
(bandit feedback); the outcome drifts as the global model improves and as the other clients
change theirs (non-stationary, not i.i.d.), and Exp3's regret bound ``sqrt(2 T K ln K)`` holds
for such adversarial reward sequences, while it needs nothing but a metric the client already
reports. The reward of a round is the client's *local validation gain*: NDCG@10 on its
held-out sets after local training minus NDCG@10 of the global model it started from (metrics
``val_ndcg@10`` and ``val_ndcg@10_start`` of the training reply), which isolates the effect of
that client's weights from everyone else's. Gains are mapped to ``[0, 1]`` by
``0.5 + gain / (2 * scale)`` (clipped). Candidate ``a`` is drawn with probability proportional
to ``exp(-eta * L_a)``, ``L_a`` the importance-weighted sum of past losses ``(1 - reward) / p_a``
of the rounds it was drawn, and ``eta = sqrt(2 ln K / (T K))`` for ``K`` candidates and ``T``
rounds (optional uniform mixing ``gamma``, default 0). A reply whose gain is not a finite
number (a NaN validation NDCG) is not learned from. Draws are seeded by the run's seed, the
client key and the round, so runs are reproducible. With few rounds (``T`` = 10) each client sees
about ten rewards, so the policy can only separate candidates whose gains differ clearly;
the benchmark compares it with the best fixed weights::

    [client-weights]
    policy = "adaptive"
    candidates = [ { rank-weight = 0.0 }, { rank-weight = 1.0 }, { rank-weight = 4.0 } ]
    scale = 0.05                                    # a gain of +-0.05 NDCG@10 is a 1 or a 0

How a policy reaches the server: :func:`policy_config` turns the table into run-configuration
keys (``client-policy`` and, when the configuration has it, ``client-policy-options`` holding
the options as JSON). Importing this module registers the policies with
:func:`fedrank.server.client_policy.register_policy`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedrank.common.config import CLIENT_KEYS, FedrankConfig
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.common.reply_schema import metric_key
from fedrank.server.client_policy import ClientConfigPolicy, UniformPolicy

__all__ = [
    "AdaptiveWeights",
    "PerClientWeights",
    "POLICY_NAMES",
    "POLICIES",
    "check_policy_options",
    "make_client_policy",
    "make_policy",
    "policy_config",
    "register_policy",
]

log = logging.getLogger("fedrank.client_weights")

POLICY_NAMES = ("uniform", "per-client", "adaptive")
PER_CLIENT_KEYS = ("policy", "default", "groups", "clients", "by-label-fraction")
ADAPTIVE_KEYS = (
    "policy",
    "candidates",
    "scale",
    "eta",
    "gamma",
    "reward",
    "start-metric",
    "rounds",
)
OPTIONS_KEY = "client-policy-options"
# client keys that must be the same on every client (the data and its split, the score mode)
NOT_PER_CLIENT = (
    "data-path",
    "seed",
    "partition-scheme",
    "partition-alpha",
    "partition-attribute",
    "partition-power",
    "score-mode",
)


def _check_settings(settings: Any, where: str) -> dict[str, Any]:
    """A table of client settings: only client keys, values the configuration accepts."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where} must be a table of client settings, got {settings!r}")
    unknown = sorted(k for k in settings if k not in CLIENT_KEYS or k in NOT_PER_CLIENT)
    if unknown:
        valid = sorted(k for k in CLIENT_KEYS if k not in NOT_PER_CLIENT)
        raise ConfigError(f"{where}: {unknown} are not per-client settings; valid: {valid}")
    try:
        FedrankConfig.from_run_config(dict(settings))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return dict(settings)


def _client_ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} 'clients' must be a non-empty list of client ids")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where} 'clients' holds {v!r}; client ids are integers >= 0")
        out.append(int(v))
    return out


# ---- per-client weights from configuration ----------------------------------------------------
def _client_key(policy: str, node_id: int, node_info: dict[str, Any]) -> int:
    """The node's client key (its partition id) from its hello; FedrankError if unknown."""
    key = node_info.get("client-key")
    if key is None:
        raise FedrankError(
            f"{policy}: the server does not know node {node_id}'s client-key (its partition "
            "id); the node must answer the hello query first"
        )
    return int(key)


class PerClientWeights(ClientConfigPolicy):
    """Fixed per-client settings from configuration (see the module docstring)."""

    def __init__(self, options: Mapping[str, Any], base: FedrankConfig | None = None) -> None:
        check_policy_options({"policy": "per-client", **dict(options)})
        self.default = dict(options.get("default", {}))
        self.groups = [
            (set(g["clients"]), {k: v for k, v in g.items() if k != "clients"})
            for g in options.get("groups", [])
        ]
        self.clients = {int(k): dict(v) for k, v in dict(options.get("clients", {})).items()}
        self.rules = [
            (float(r["below"]), {k: v for k, v in r.items() if k != "below"})
            for r in options.get("by-label-fraction", [])
        ]
        self.base_fraction = 1.0 if base is None else float(base.label_fraction)
        self.assigned: dict[int, dict[str, Any]] = {}

    def settings_for(self, client_key: int) -> dict[str, Any]:
        """The overrides of client ``client_key`` (independent of the round)."""
        out = dict(self.default)
        for members, settings in self.groups:
            if client_key in members:
                out.update(settings)
        out.update(self.clients.get(client_key, {}))
        fraction = float(out.get("label-fraction", self.base_fraction))
        for below, settings in self.rules:
            if fraction < below:
                out.update(settings)
                break
        return out

    def configure(self, server_round: int, node_id: int, node_info: dict[str, Any]) -> dict:
        key = _client_key("per-client weights", node_id, node_info)
        settings = self.settings_for(key)
        self.assigned[key] = settings
        return settings

    def state(self) -> dict[str, Any]:
        return {"assigned": {str(k): v for k, v in sorted(self.assigned.items())}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.assigned = {int(k): dict(v) for k, v in state.get("assigned", {}).items()}


# ---- adaptive weights: Exp3 per client --------------------------------------------------------
class AdaptiveWeights(ClientConfigPolicy):
    """Exp3 per client over candidate settings, rewarded by the local validation gain."""

    wants_validation = True  # clients report val_ndcg@10_start and val_ndcg@10

    def __init__(
        self, options: Mapping[str, Any], base: FedrankConfig | None = None, seed: int | None = None
    ) -> None:
        check_policy_options({"policy": "adaptive", **dict(options)})
        self.candidates = [dict(c) for c in options["candidates"]]
        k = len(self.candidates)
        rounds = int(options.get("rounds", base.num_server_rounds if base is not None else 10))
        self.eta = float(options.get("eta", math.sqrt(2.0 * math.log(k) / (max(rounds, 1) * k))))
        self.gamma = float(options.get("gamma", 0.0))
        self.scale = float(options.get("scale", 0.05))
        # metric names in the current style (older scenarios wrote 'val-ndcg@10')
        self.reward_key = metric_key(str(options.get("reward", "val_ndcg@10")))
        self.start_key = metric_key(str(options.get("start-metric", "val_ndcg@10_start")))
        self.seed = int(seed if seed is not None else (base.seed if base is not None else 0))
        self.losses: dict[int, list[float]] = {}  # node id -> estimated cumulative losses
        self.pending: dict[int, tuple[int, int, float]] = {}  # node id -> (round, arm, prob)
        self.history: list[dict[str, Any]] = []
        self.node_keys: dict[int, int] = {}  # node id -> client key (from its hello)
        self._warned = False

    def probabilities(self, node_id: int) -> np.ndarray:
        """Exp3's distribution over the candidates for node ``node_id``."""
        k = len(self.candidates)
        losses = np.asarray(self.losses.get(node_id, [0.0] * k), dtype=np.float64)
        losses = np.where(np.isfinite(losses), losses, 0.0)  # a corrupt state never spreads
        logits = -self.eta * losses
        w = np.exp(logits - logits.max())
        return (1.0 - self.gamma) * w / w.sum() + self.gamma / k

    def configure(self, server_round: int, node_id: int, node_info: dict[str, Any]) -> dict:
        key = _client_key("adaptive weights", node_id, node_info)
        self.node_keys[node_id] = key
        p = self.probabilities(node_id)
        # seeded by the client key (stable across runs), so runs are reproducible
        rng = np.random.default_rng([self.seed, key, server_round, 7])
        arm = int(rng.choice(len(p), p=p))
        self.pending[node_id] = (server_round, arm, float(p[arm]))
        return dict(self.candidates[arm])

    def reward(self, metrics: Mapping[str, Any]) -> float | None:
        """The ``[0, 1]`` reward of a training reply, or None if it lacks the metrics or they
        are not finite (a NaN validation NDCG is ignored, never learned from)."""
        after, before = metrics.get(self.reward_key), metrics.get(self.start_key)
        if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
            return None
        gain = float(after) - float(before)
        if not math.isfinite(gain):
            return None
        return float(np.clip(0.5 + gain / (2.0 * self.scale), 0.0, 1.0))

    def observe(self, server_round: int, node_id: int, metrics: dict[str, Any]) -> None:
        """Learn from node ``node_id``'s reply: the state is keyed by the server's node id,
        never by what the reply claims (a node cannot touch another node's state)."""
        if node_id not in self.pending:
            return
        rnd, arm, prob = self.pending.pop(node_id)
        reward = self.reward(metrics)
        if reward is None:
            if not self._warned:
                log.warning(
                    "adaptive weights: a training reply lacks finite %r and %r; it is not "
                    "learned from",
                    self.reward_key,
                    self.start_key,
                )
                self._warned = True
            return
        losses = self.losses.setdefault(node_id, [0.0] * len(self.candidates))
        losses[arm] += (1.0 - reward) / prob  # importance-weighted loss estimate
        self.history.append(
            {
                "round": rnd,
                "node": node_id,
                "client": self.node_keys.get(node_id),
                "arm": arm,
                "reward": reward,
            }
        )

    def preferred(self) -> dict[int, int]:
        """Each node's currently most likely candidate."""
        return {node: int(np.argmax(self.probabilities(node))) for node in sorted(self.losses)}

    def state(self) -> dict[str, Any]:
        return {
            "losses": {str(k): v for k, v in self.losses.items()},
            "history": list(self.history),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.losses = {int(k): list(v) for k, v in state.get("losses", {}).items()}
        self.history = list(state.get("history", []))


# ---- checking, building, wiring into the server -----------------------------------------------
def check_policy_options(spec: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the key for anything wrong in a ``[client-weights]`` table."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"client weights must be a table, got {spec!r}")
    name = spec.get("policy", "per-client")
    if name not in POLICY_NAMES:
        raise ConfigError(f"'policy' {name!r} is unknown; valid: {list(POLICY_NAMES)}")
    if name == "uniform":
        if set(spec) - {"policy"}:
            raise ConfigError("policy 'uniform' takes no options")
        return
    valid = PER_CLIENT_KEYS if name == "per-client" else ADAPTIVE_KEYS
    unknown = sorted(k for k in spec if k not in valid)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for policy {name!r}; valid: {list(valid)}")
    if name == "per-client":
        _check_settings(spec.get("default", {}), "'default'")
        groups = spec.get("groups", [])
        if not isinstance(groups, list):
            raise ConfigError("'groups' must be a list of tables")
        for i, group in enumerate(groups):
            where = f"groups[{i}]"
            if not isinstance(group, Mapping):
                raise ConfigError(f"{where} must be a table")
            _client_ids(group.get("clients"), where)
            _check_settings({k: v for k, v in group.items() if k != "clients"}, where)
        clients = spec.get("clients", {})
        if not isinstance(clients, Mapping):
            raise ConfigError("'clients' must be a table: client id -> settings")
        for cid, settings in clients.items():
            if not str(cid).isdigit():
                raise ConfigError(f"clients.{cid}: client ids are integers >= 0")
            _check_settings(settings, f"clients.{cid}")
        rules = spec.get("by-label-fraction", [])
        if not isinstance(rules, list):
            raise ConfigError("'by-label-fraction' must be a list of tables")
        for i, rule in enumerate(rules):
            where = f"by-label-fraction[{i}]"
            below = rule.get("below") if isinstance(rule, Mapping) else None
            if isinstance(below, bool) or not isinstance(below, (int, float)):
                raise ConfigError(f"{where} needs 'below' (a label fraction), got {below!r}")
            _check_settings({k: v for k, v in rule.items() if k != "below"}, where)
        return
    candidates = spec.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise ConfigError("'candidates' must list at least two tables of client settings")
    for i, cand in enumerate(candidates):
        _check_settings(cand, f"candidates[{i}]")
    for key, low, high in (("scale", 0.0, math.inf), ("eta", 0.0, math.inf), ("gamma", 0.0, 1.0)):
        if key in spec:
            v = spec[key]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok or not (low <= v <= high if key == "gamma" else low < v <= high):
                raise ConfigError(f"{key!r} must lie in ({low}, {high}], got {v!r}")
    if "rounds" in spec and (not isinstance(spec["rounds"], int) or spec["rounds"] < 1):
        raise ConfigError(f"'rounds' must be an integer >= 1, got {spec['rounds']!r}")


def make_client_policy(
    spec: Mapping[str, Any], base: FedrankConfig | None = None
) -> ClientConfigPolicy:
    """The policy a ``[client-weights]`` table describes."""
    check_policy_options(spec)
    name = spec.get("policy", "per-client")
    options = {k: v for k, v in spec.items() if k != "policy"}
    if name == "per-client":
        return PerClientWeights(options, base)
    if name == "adaptive":
        return AdaptiveWeights(options, base)
    return ClientConfigPolicy()


def _options_from_config(name: str, config: FedrankConfig) -> dict[str, Any]:
    options = config.policy_options()  # ConfigError naming the key unless a JSON object
    try:
        check_policy_options({"policy": name, **options})
    except ConfigError as err:
        raise ConfigError(f"{OPTIONS_KEY!r}: {err}") from None
    return {"policy": name, **options}


def _factory(name: str) -> Callable[[FedrankConfig], ClientConfigPolicy]:
    return lambda config: make_client_policy(_options_from_config(name, config), config)


#: ``client-policy`` name -> factory taking the run's configuration
POLICIES: dict[str, Callable[[FedrankConfig], ClientConfigPolicy]] = {
    "uniform": lambda config: UniformPolicy(),
    "per-client": _factory("per-client"),
    "adaptive": _factory("adaptive"),
}


def register_policy(name: str, factory: Callable[[FedrankConfig], ClientConfigPolicy]) -> None:
    """Make ``factory`` available as ``client-policy = name``."""
    POLICIES[name] = factory


def make_policy(config: FedrankConfig) -> ClientConfigPolicy:
    """The policy named by ``client-policy``; ConfigError listing the valid names otherwise.

    Factories take the run's configuration (``client-policy-options`` is in it, see
    :meth:`~fedrank.common.config.FedrankConfig.policy_options`).
    """
    name = config.client_policy
    if name not in POLICIES:
        raise ConfigError(
            f"'client-policy' {name!r} is unknown; valid: {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name](config)


def policy_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run-configuration keys that select the policy of a ``[client-weights]`` table: its
    name in ``client-policy`` and its options as JSON in ``client-policy-options``."""
    check_policy_options(spec)
    name = str(spec.get("policy", "per-client"))
    if name == "uniform":
        return {"client-policy": "uniform"}
    options = {k: v for k, v in spec.items() if k != "policy"}
    return {"client-policy": name, OPTIONS_KEY: json.dumps(options, sort_keys=True)}
