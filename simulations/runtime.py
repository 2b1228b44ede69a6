"""The one place that starts Flower's simulation runtime (``fedrank simulate``, sweep workers).

:func:`start_simulation` runs a ServerApp object against ``num_clients`` simulated SuperNodes
in this process. :class:`RayOptions` says where the simulated clients run: a Ray instance
started for this call (the default, ``num_cpus`` CPUs), or an existing Ray cluster
(``address``, e.g. ``127.0.0.1:6379`` from ``ray start --head``), and what each simulated
client reserves there (``client_cpus``, ``client_memory`` in bytes). Flower passes
``init_args`` of the backend config to ``ray.init`` and ``client_resources`` to each client
actor; when attaching to a cluster Ray refuses ``num_cpus``, so it is only given otherwise.

Why ``flwr.simulation.run_simulation`` (deprecated in Flower 1.42) and not ``flwr run``: the
supported entry point goes through a SuperLink and an app bundle, loads the ServerApp by its
attribute string and takes its configuration as TOML values. fedrank's sweeps and
comparisons hand the runtime a ServerApp *object* bound to in-process state (a study, a list
of federations), which only the Python entry point accepts; Flower 1.42 has no supported
replacement for it (its body, ``flwr.simulation.run_simulation._run_simulation``, is private).
The call is kept here alone, so moving off it is a change to this file.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedrank.common.errors import ConfigError
from fedrank.simulations.message_lookup import engine_message_poll

__all__ = [
    "RayOptions",
    "add_ray_arguments",
    "backend_config",
    "parse_memory",
    "ray_options",
    "start_simulation",
]

# set (unless already set) before the runtime starts
SIMULATION_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int:
    """Bytes from ``"512M"``, ``"2G"``, ``"1.5g"`` or a plain number of bytes."""
    value = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    try:
        amount = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ConfigError(f"memory must be a size like 512M or 2G, got {text!r}") from None
    if amount <= 0:
        raise ConfigError(f"memory must be > 0, got {text!r}")
    return int(amount * _UNITS[unit])


@dataclass(frozen=True)
class RayOptions:
    """Where the simulated clients run and what each reserves (see the module docstring)."""

    address: str | None = None
    num_cpus: int | None = None  # a Ray started here: its CPUs (default: the machine's)
    client_cpus: float = 1.0
    client_memory: int | None = None  # bytes reserved per simulated client

    def __post_init__(self) -> None:
        if self.client_cpus <= 0:
            raise ConfigError(f"client CPUs must be > 0, got {self.client_cpus}")
        if self.address is not None and not self.address.strip():
            raise ConfigError("the Ray address is empty (use HOST:PORT or 'auto')")


def backend_config(options: RayOptions, verbose: bool = False) -> dict[str, Any]:
    """Flower's backend config for ``options``: ``init_args`` (to ``ray.init``) and
    ``client_resources`` (each simulated client's actor)."""
    resources: dict[str, float] = {"num_cpus": float(options.client_cpus), "num_gpus": 0.0}
    if options.client_memory:
        resources["memory"] = float(options.client_memory)
    init_args: dict[str, Any] = {
        "logging_level": "info" if verbose else "error",
        "log_to_driver": verbose,
    }
    if options.address:
        init_args["address"] = options.address
    else:
        # "local": a Ray of its own even when `ray start` left a cluster address on this
        # machine (ray.init() without an address would try to join that cluster)
        init_args.update(address="local", num_cpus=options.num_cpus or os.cpu_count() or 1)
        init_args.update(num_gpus=0, include_dashboard=False)
    return {"client_resources": resources, "init_args": init_args}


def start_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    *,
    ray: RayOptions | None = None,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` to its end with ``num_clients`` simulated SuperNodes."""
    if num_clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {num_clients}")
    for key, value in SIMULATION_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    # Flower's engine polls its message store node by node, checking every message each
    # time: a poll by one scan and a per-node lookup (see message_lookup)
    with engine_message_poll():
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config(ray or RayOptions(), verbose),
            verbose_logging=verbose,
        )


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`RayOptions` on a command line (``simulate`` and ``sweep``)."""
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="attach the simulated clients to a running Ray cluster (`ray start --head` "
        "prints its address; 'auto' finds a local one) instead of starting Ray here",
    )
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs each simulated client reserves on Ray (default 1)",
    )
    parser.add_argument(
        "--client-memory",
        metavar="SIZE",
        help="memory each simulated client reserves on Ray, e.g. 512M or 2G (default none)",
    )


def ray_options(args: argparse.Namespace, num_cpus: int | None = None) -> RayOptions:
    """:class:`RayOptions` from the options :func:`add_ray_arguments` added."""
    memory = parse_memory(args.client_memory) if args.client_memory else None
    return RayOptions(args.ray_address, num_cpus, float(args.client_cpus), memory)
