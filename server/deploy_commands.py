"""The hardened deployment commands, defined once.

``docs/deployment.md`` and README print these commands, ``fedrank certs`` prints them with the
folder it wrote, and the deployment test runs them (with free ports and absolute paths), so
what users copy is what is tested:

- the SuperLink on loopback only (its one port serves the Fleet, Control and Runtime APIs),
  TLS and SuperNode authentication on;
- ``fedrank gateway`` on the network address: the Fleet API only, TLS;
- each SuperNode dials the gateway, checks it against the CA and signs with its own key.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = [
    "GATEWAY_PORT",
    "SUPERLINK_PORT",
    "gateway_command",
    "render",
    "superlink_command",
    "supernode_command",
    "hardened_commands",
]

SUPERLINK_PORT = 9093  # loopback only: Control, Fleet and Runtime APIs
GATEWAY_PORT = 9092  # network: the Fleet API only
LOOPBACK = "127.0.0.1"


def superlink_command(certs: str = "certs", port: int = SUPERLINK_PORT) -> list[str]:
    """``flower-superlink`` bound to loopback, TLS and SuperNode authentication on."""
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        f"{certs}/ca.crt",
        "--ssl-certfile",
        f"{certs}/server.pem",
        "--ssl-keyfile",
        f"{certs}/server.key",
        "--enable-supernode-auth",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]


def gateway_command(
    certs: str = "certs",
    listen: str = f"0.0.0.0:{GATEWAY_PORT}",
    superlink: str = f"{LOOPBACK}:{SUPERLINK_PORT}",
) -> list[str]:
    """``fedrank gateway``: the Fleet API on the network address, nothing else."""
    return ["fedrank", "gateway", "--certs", certs, "--listen", listen, "--superlink", superlink]


def supernode_command(
    key: str,
    node_config: str,
    server: str = f"{LOOPBACK}:{GATEWAY_PORT}",
    certs: str = "certs",
    port: int = 9094,
) -> list[str]:
    """``flower-supernode`` dialling the gateway with TLS and its own authentication key."""
    return [
        "flower-supernode",
        "--superlink",
        server,
        "--root-certificates",
        f"{certs}/ca.crt",
        "--auth-supernode-private-key",
        key,
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]


def render(args: Sequence[str]) -> str:
    """A command as the docs print it: shell-quoted, one option (and its value) per line."""
    parts: list[str] = [shlex.quote(args[0])]
    i = 1
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            parts.append(f"{shlex.quote(args[i])} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            parts.append(shlex.quote(args[i]))
            i += 1
    if parts[0] == "fedrank" and len(parts) > 1:  # `fedrank gateway` reads as one word
        parts[:2] = [f"{parts[0]} {parts[1]}"]
    return " \\\n    ".join(parts)


def hardened_commands(certs: str = "certs", server: str = LOOPBACK) -> str:
    """The server's two commands and one SuperNode's, as ``fedrank certs`` prints them."""
    node = supernode_command(
        f"{certs}/node-1",
        'data-path="/data/device-1/letor.txt" threads=1',
        server=f"{server}:{GATEWAY_PORT}",
        certs=certs,
    )
    return "\n".join(
        [
            "# on the server: the SuperLink on loopback, the Fleet API gateway on the network",
            render(superlink_command(certs)) + " &",
            render(gateway_command(certs)) + " &",
            "# on the server: register each node's public key (flwr talks to 127.0.0.1:9093)",
            f"flwr supernode register {certs}/node-1.pub fedrank",
            "# on each device (its own key, the CA certificate, its own data)",
            render(node),
        ]
    )
