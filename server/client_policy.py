"""Per-client training settings: which loss weights (and other client keys) each node gets.

The server asks its :class:`ClientConfigPolicy` for every node it samples, every round; the
returned keys override the run's configuration in that node's ``ConfigRecord``. After the
round the policy sees each node's reported metrics, so adaptive policies can react.

The default, :class:`UniformPolicy`, gives every client the same settings; ``per-client`` and
``adaptive`` are in :mod:`fedrank.server.client_weights`, which also holds the registry of
policies (``client-policy`` names one) and :func:`~fedrank.server.client_weights.make_policy`.
"""

from __future__ import annotations

from typing import Any

from fedrank.common.config import CLIENT_KEYS
from fedrank.common.errors import ConfigError

__all__ = ["ClientConfigPolicy", "UniformPolicy", "check_overrides"]


class ClientConfigPolicy:
    """Base class: per-node overrides of the client keys (hyphenated, e.g. ``rank-weight``).

    ``node_info`` holds what the server knows about the node: ``num-sets`` (sets it holds,
    once it has reported them), ``client-key`` (a stable id such as the simulated partition)
    and the last metrics it reported under ``last-metrics``.

    ``wants_validation = True`` makes the server set ``report-validation`` in every training
    ``ConfigRecord``: clients then add ``val_ndcg@10_start`` (the received global model on
    their held-out sets) and ``val_ndcg@10`` (after local training) to their training reply.
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


def check_overrides(overrides: dict[str, Any], node_id: int) -> dict[str, Any]:
    """Validate a policy's overrides: only client keys, and values the config accepts."""
    unknown = sorted(k for k in overrides if k not in CLIENT_KEYS)
    if unknown:
        raise ConfigError(
            f"client policy returned keys that are not client settings for node {node_id}: "
            f"{unknown}; valid: {sorted(CLIENT_KEYS)}"
        )
    return overrides
