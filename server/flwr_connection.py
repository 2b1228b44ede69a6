"""The ``flwr`` CLI's side of a deployment: its connection in ``$FLWR_HOME/config.toml``, and
running ``flwr`` commands with JSON output.

Flower 1.42 keeps connections in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``) and writes
that file itself on first use (a ``[superlink]`` table with ``default = "local"`` and two
connections). Appending a second ``[superlink]`` table by hand makes the file invalid TOML
and every later ``flwr`` command fails; :func:`write_connection` adds or replaces one
``[superlink.NAME]`` entry through Flower's own reader and writer instead, so it works on a
fresh ``FLWR_HOME`` and when run twice.

    fedrank fleet connection fedrank --address 127.0.0.1:9093 --root-certificates certs/ca.crt
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from flwr.cli.flower_config import read_flower_config, write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

from fedrank.common.errors import ConfigError

__all__ = ["config_path", "flwr_json", "program", "write_connection"]


def config_path() -> Path:
    """``$FLWR_HOME/config.toml`` (Flower's default home: ``~/.flwr``)."""
    return Path(get_flwr_home()) / "config.toml"


def write_connection(
    name: str, address: str, root_certificates: str | os.PathLike[str] | None = None
) -> Path:
    """Add or replace the connection ``[superlink.NAME]`` (TLS checked against
    ``root_certificates``; without it, an insecure connection) in ``$FLWR_HOME/config.toml``
    with Flower's own writer; other connections and the default are kept. Returns the path."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"connection name {name!r}: use letters, digits, '-' and '_'")
    certificate = None
    if root_certificates is not None:
        cert = Path(root_certificates).expanduser().resolve()
        if not cert.is_file():
            raise ConfigError(f"--root-certificates {root_certificates}: no such file")
        certificate = str(cert)
    connection = SuperLinkConnection(
        name=name,
        address=address,
        root_certificates=certificate,
        insecure=True if certificate is None else None,
    )
    try:
        read_flower_config()  # creates Flower's default file on a fresh FLWR_HOME
        write_superlink_connection(connection)
    except click.ClickException as err:  # e.g. a file damaged by an earlier hand edit
        raise ConfigError(
            f"{config_path()}: {err.message} (fix or move the file; Flower writes a fresh one)"
        ) from None
    return config_path()


def program(name: str) -> str:
    """The path of Flower's or fedrank's program ``name``: this environment's own first (the
    folder of the running interpreter), then ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed in this environment (pip install 'fedrank')")
    return found


def flwr_json(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 120.0, cwd: Path | None = None
) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON object; ConfigError with Flower's
    own message when the command fails."""
    try:
        proc = subprocess.run(
            [program("flwr"), *args, "--format", "json"],
            env=dict(env),
            cwd=None if cwd is None else str(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        command = " ".join(args)
        raise ConfigError(f"`flwr {command}` did not answer within {timeout:.0f} s") from None
    out = proc.stdout
    start = out.find("{")
    try:
        reply = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success", True):
        last = (proc.stderr or out).strip().splitlines()[-1:]
        detail = reply.get("error-message") or " ".join(last) or f"exit code {proc.returncode}"
        raise ConfigError(f"`flwr {' '.join(args)}` failed: {detail}")
    return dict(reply)
