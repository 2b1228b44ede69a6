"""Per-client training settings: which loss weights (and other client keys) each node gets.

The server asks its :class:`ClientConfigPolicy` for every node it samples, every round; the
returned keys override the run's configuration in that node's ``ConfigRecord``. After the
round the policy sees each node's reported metrics, so adaptive policies can react.

The default, :class:`UniformPolicy`, gives every client the same settings. Other policies
register themselves in :data:`POLICIES` (name -> factory taking the run's
:class:`~common.config.FedrankConfig`) and are chosen with the ``client-policy`` key.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any

from common.config import CLIENT_KEYS, FedrankConfig
from common.errors import ConfigError

__all__ = ["ClientConfigPolicy", "UniformPolicy", "POLICIES", "make_policy", "register_policy"]


class ClientConfigPolicy:
    """Base class: per-node overrides of the client keys (hyphenated, e.g. ``rank-weight``).

    ``node_info`` holds what the server knows about the node: ``num-sets`` (sets it holds,
    once it has reported them), ``client-key`` (a stable id such as the simulated partition)
    and the last metrics it reported under ``last-metrics``.

    ``wants_validation = True`` makes the server set ``report-validation`` in every training
    ``ConfigRecord``: clients then add ``val-ndcg@10-start`` (the received global model on
    their held-out sets) and ``val-ndcg@10`` (after local training) to their training reply.
    Off by default: it costs two evaluations per client and round.
    """

    wants_validation: bool = False

    def configure(self, server_round: int, node_id: int, node_info: dict[str, Any]) -> dict:
        """Keys to override for ``node_id`` this round (``{}``: the run's settings)."""
        return {}

    def observe(self, server_round: int, node_id: int, metrics: dict[str, Any]) -> None:
        """Metrics ``node_id`` reported after training in ``server_round``."""

    def state(self) -> dict[str, Any]:
        """JSON-able state to checkpoint (adaptive policies); restored by :meth:`load_state`."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""


class UniformPolicy(ClientConfigPolicy):
    """Every client trains with the run's loss weights and settings."""


EXTRA_POLICIES = "simulations.client_weights"  # imported on an unknown policy name
POLICIES: dict[str, Callable[[FedrankConfig], ClientConfigPolicy]] = {
    "uniform": lambda config: UniformPolicy(),
}


def register_policy(name: str, factory: Callable[[FedrankConfig], ClientConfigPolicy]) -> None:
    """Make ``factory`` available as ``client-policy = name``."""
    POLICIES[name] = factory


def make_policy(config: FedrankConfig) -> ClientConfigPolicy:
    """The policy named by ``client-policy``; ConfigError listing the valid names otherwise.

    Factories take the run's configuration (``client-policy-options`` is in it, see
    :meth:`~common.config.FedrankConfig.policy_options`). An unknown name first imports
    :mod:`simulations.client_weights` (which registers ``per-client`` and ``adaptive``), so
    those work under ``flwr run`` too.
    """
    name = config.client_policy
    if name not in POLICIES:
        with contextlib.suppress(ModuleNotFoundError):  # a deployment without simulations
            importlib.import_module(EXTRA_POLICIES)
    if name not in POLICIES:
        raise ConfigError(
            f"'client-policy' {name!r} is unknown; valid: {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name](config)


def check_overrides(overrides: dict[str, Any], node_id: int) -> dict[str, Any]:
    """Validate a policy's overrides: only client keys, and values the config accepts."""
    unknown = sorted(k for k in overrides if k not in CLIENT_KEYS)
    if unknown:
        raise ConfigError(
            f"client policy returned keys that are not client settings for node {node_id}: "
            f"{unknown}; valid: {sorted(CLIENT_KEYS)}"
        )
    return overrides
