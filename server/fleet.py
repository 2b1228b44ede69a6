"""A local fleet in one command: ``fedrank fleet up|status|down|connection``.

``fedrank fleet up --nodes N --data PATH [--dir DIR]`` starts, on this machine, the hardened
deployment the docs describe (the commands of :mod:`fedrank.server.deploy_commands`):

1. certificates in ``DIR/certs`` (:func:`fedrank.server.certs.make_all`; existing files are kept);
2. each node's own slice of the data's training sets as a LETOR file,
   ``DIR/nodes/node-<i>/letor.txt`` (a seeded shuffle of the sets, dealt out in turn);
3. ``flower-superlink`` with TLS and SuperNode authentication, on loopback;
4. ``fedrank gateway``: the Fleet API only, for the SuperNodes;
5. the connection ``fedrank`` in ``$FLWR_HOME/config.toml`` (Flower's own writer);
6. ``flwr supernode register`` for each node's public key;
7. one ``flower-supernode`` per node, dialling the gateway with its own key and data;

then waits until every node is online. Each process runs detached, with its log in
``DIR/logs/NAME.log``, its PID in ``DIR/pids/NAME.pid`` and its command line and start time in
``DIR/fleet.json``. Runs start as usual: ``flwr run . fedrank``.

``fedrank fleet status`` prints each process (PID, alive, address, log tail).
``fedrank fleet down`` stops exactly the processes ``up`` started, and what they started:
a PID counts only while it still runs the recorded command line and started at the recorded
time, so a stale PID file never stops another process. SIGTERM first, SIGKILL after
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.atomic_io import atomic_write_json, atomic_write_text
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.common.letor import write_letor
from fedrank.server.certs import make_all
from fedrank.server.deploy_commands import (
    GATEWAY_PORT,
    LOOPBACK,
    SUPERLINK_PORT,
    gateway_command,
    superlink_command,
    supernode_command,
)
from fedrank.server.flwr_connection import flwr_json, program, write_connection
from fedrank.server.processes import (
    ProcessRecord,
    is_ours,
    log_tail,
    read_pid_file,
    start,
    stop,
)

__all__ = ["FleetPlan", "down", "main", "running", "status", "up"]

STATE_FILE = "fleet.json"
DEFAULT_DIR = "fleet"
CONNECTION = "fedrank"
FIRST_NODE_PORT = 9094  # each SuperNode's local Runtime API port: 9094, 9095, ...
# Flower processes of a local fleet neither call home nor install packages (`uv sync`)
QUIET_FLOWER = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
Say = Callable[[str], None]


@dataclass(frozen=True)
class FleetPlan:
    """What ``fedrank fleet up`` starts."""

    dir: Path
    nodes: int
    data: str
    superlink_port: int = SUPERLINK_PORT
    gateway_port: int = GATEWAY_PORT
    node_port: int = FIRST_NODE_PORT
    connection: str = CONNECTION
    sets_per_node: int = 0  # 0: every training set is dealt out
    node_config: str = "threads=1"
    seed: int = 0
    wait: float = 180.0

    def check(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise ConfigError(f"--nodes must be 1..64, got {self.nodes}")
        if self.sets_per_node < 0:
            raise ConfigError(f"--sets-per-node must be >= 0, got {self.sets_per_node}")
        ports = {"--superlink-port": self.superlink_port, "--gateway-port": self.gateway_port}
        ports["--node-port"] = self.node_port
        for option, port in ports.items():
            if not 1024 <= port <= 65535 - (self.nodes if option == "--node-port" else 0):
                raise ConfigError(f"{option} must be a port in 1024..65535, got {port}")
        used = list(self.ports().values())
        if len(set(used)) != len(used):
            raise ConfigError(
                "--superlink-port, --gateway-port and the node ports (--node-port and the "
                f"{self.nodes - 1} after it) must all differ"
            )
        if "data-path" in self.node_config:
            raise ConfigError("--node-config: 'data-path' is set by the fleet (each node's slice)")

    def ports(self) -> dict[str, int]:
        """Every port the fleet listens on, by process name."""
        out = {"superlink": self.superlink_port, "gateway": self.gateway_port}
        out.update({f"node-{i}": self.node_port + i - 1 for i in range(1, self.nodes + 1)})
        return out


# ---- state on disk ---------------------------------------------------------------------------
def _state_path(folder: Path) -> Path:
    return folder / STATE_FILE


def _pid_path(folder: Path, name: str) -> Path:
    return folder / "pids" / f"{name}.pid"


def _load_state(folder: Path) -> dict[str, Any] | None:
    path = _state_path(folder)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        state["processes"] = [ProcessRecord.from_dict(p) for p in state["processes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is damaged ({type(err).__name__}: {err}); check the processes of the PIDs "
            f"in {folder / 'pids'} by hand, then remove {path}"
        ) from None
    return state


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    out = {**state, "processes": [p.to_dict() for p in state["processes"]]}
    atomic_write_json(_state_path(folder), out)


def _remember(folder: Path, state: dict[str, Any], record: ProcessRecord) -> None:
    """Record a started process: in the state file first, then its PID file."""
    state["processes"].append(record)
    _save_state(folder, state)
    atomic_write_text(_pid_path(folder, record.name), f"{record.pid}\n")


def _forget(folder: Path) -> None:
    for pid_file in sorted((folder / "pids").glob("*.pid")):
        pid_file.unlink(missing_ok=True)
    _state_path(folder).unlink(missing_ok=True)


# ---- helpers ---------------------------------------------------------------------------------
def _port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _environment(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in QUIET_FLOWER.items():
        env.setdefault(key, value)
    # the programs a SuperLink or SuperNode starts (flwr-serverapp, flwr-clientapp) come from
    # this environment too
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _local(args: list[str]) -> list[str]:
    """A documented command with its program resolved in this environment."""
    return [program(args[0]), *args[1:]]


def _died(record: ProcessRecord) -> FedrankError:
    tail = "\n    ".join(log_tail(record.log, lines=8)) or "(empty log)"
    return FedrankError(f"{record.name} exited at start-up; {record.log} ends:\n    {tail}")


def _wait_listening(record: ProcessRecord, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if not is_ours(record):
            raise _died(record)
        if time.monotonic() > deadline:
            raise FedrankError(
                f"{record.name} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s "
                f"(see {record.log})"
            )
        time.sleep(0.2)


def _write_slices(plan: FleetPlan, say: Say) -> list[tuple[Path, int]]:
    """Each node's own training sets as a LETOR file; returns (path, sets) per node."""
    dataset = load_dataset(plan.data, seed=plan.seed)
    train = dataset.splits["train"]
    if train.num_sets < plan.nodes:
        raise ConfigError(
            f"--data {plan.data}: {train.num_sets} training sets cannot be dealt to "
            f"{plan.nodes} nodes"
        )
    order = np.random.default_rng(plan.seed).permutation(train.num_sets)
    out = []
    for i in range(plan.nodes):
        mine = order[i :: plan.nodes]
        mine = np.sort(mine[: plan.sets_per_node] if plan.sets_per_node else mine)
        path = plan.dir / "nodes" / f"node-{i + 1}" / "letor.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_letor(train.take(mine), path)
        out.append((path.resolve(), int(mine.size)))
    say(
        f"data: {sum(n for _, n in out)} of {train.num_sets} training sets of {plan.data} "
        f"dealt to {plan.nodes} nodes ({plan.dir / 'nodes'}/node-<i>/letor.txt)"
    )
    return out


def _online(connection: str, env: dict[str, str]) -> set[int]:
    nodes = flwr_json(["supernode", "list", connection], env).get("nodes", [])
    return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}


# ---- up, status, down ------------------------------------------------------------------------
def running(folder: Path) -> list[ProcessRecord]:
    """The fleet processes in ``folder`` that still run (as recorded)."""
    state = _load_state(folder)
    return [p for p in state["processes"] if is_ours(p)] if state else []


def up(plan: FleetPlan, say: Say = print) -> dict[str, Any]:
    """Start the fleet ``plan`` describes (see the module docstring); returns its state.

    On any failure every process started so far is stopped and the error names the process
    and the end of its log."""
    plan.check()
    folder = plan.dir
    alive = running(folder)
    if alive:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in alive)
        raise ConfigError(
            f"a fleet is already up in {folder}: {names}; `fedrank fleet status --dir {folder}` "
            f"shows it, `fedrank fleet down --dir {folder}` stops it"
        )
    if _state_path(folder).exists() or any((folder / "pids").glob("*.pid")):
        say(f"{folder}: the previous fleet's processes are gone; its state is replaced")
        _forget(folder)
    busy = [f"{port} ({name})" for name, port in plan.ports().items() if not _port_free(port)]
    if busy:
        raise ConfigError(
            f"port {busy[0]} on {LOOPBACK} is in use by another process"
            + (f" (also {', '.join(busy[1:])})" if busy[1:] else "")
            + "; stop it or choose other ports (--superlink-port, --gateway-port, --node-port)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    certs = make_all(folder / "certs", nodes=plan.nodes)
    say(f"certificates: {folder / 'certs'} (CA, SuperLink certificate, {plan.nodes} node keys)")
    slices = _write_slices(plan, say)
    cwd = Path.cwd()
    env = _environment()
    state: dict[str, Any] = {
        "dir": str(folder.resolve()),
        "cwd": str(cwd),
        "connection": plan.connection,
        "superlink": f"{LOOPBACK}:{plan.superlink_port}",
        "gateway": f"{LOOPBACK}:{plan.gateway_port}",
        "data": plan.data,
        "nodes": [],
        "processes": [],
    }
    certs_dir = str((folder / "certs").resolve())
    logs = folder.resolve() / "logs"

    def launch(
        name: str, args: list[str], address: str, process_env: dict[str, str] = env
    ) -> ProcessRecord:
        """Start one fleet process with its log under ``logs`` and record it."""
        record = start(name, _local(args), logs / f"{name}.log", process_env, cwd, address=address)
        _remember(folder, state, record)
        return record

    try:
        link = launch(
            "superlink",
            superlink_command(certs_dir, plan.superlink_port),
            f"{LOOPBACK}:{plan.superlink_port} (Control, Fleet and Runtime APIs)",
        )
        _wait_listening(link, plan.superlink_port, 60.0)
        say(f"superlink: pid {link.pid}, {link.address}, TLS, SuperNode authentication")
        gateway = launch(
            "gateway",
            gateway_command(certs_dir, f"{LOOPBACK}:{plan.gateway_port}", state["superlink"]),
            f"{state['gateway']} (Fleet API only)",
        )
        _wait_listening(gateway, plan.gateway_port, 60.0)
        say(f"gateway: pid {gateway.pid}, {gateway.address}")
        where = write_connection(plan.connection, state["superlink"], certs.ca_cert)
        say(f"connection {plan.connection!r} -> {state['superlink']} written to {where}")
        node_ids = []
        for pub in certs.node_public_keys:
            reply = flwr_json(["supernode", "register", str(pub), plan.connection], env)
            node_ids.append(int(reply["node-id"]))
        say(f"registered {plan.nodes} node keys: node ids {', '.join(map(str, node_ids))}")
        for i, ((data, sets), key) in enumerate(
            zip(slices, certs.node_private_keys, strict=True), start=1
        ):
            name = f"node-{i}"
            config = f'data-path="{data}" {plan.node_config}'.strip()
            args = supernode_command(
                str(key.resolve()),
                config,
                server=state["gateway"],
                certs=certs_dir,
                port=plan.ports()[name],
            )
            home = folder.resolve() / "nodes" / name / "flwr-home"
            home.mkdir(parents=True, exist_ok=True)
            launch(
                name,
                args,
                f"{LOOPBACK}:{plan.ports()[name]} (its Runtime API), node id "
                f"{node_ids[i - 1]}, {sets} sets",
                _environment(home),
            )
            state["nodes"].append({"name": name, "node_id": node_ids[i - 1], "data": str(data)})
            _save_state(folder, state)
        _wait_online(plan, state, set(node_ids), env, say)
    except BaseException:
        for record in reversed(state["processes"]):
            stop(record)
        _forget(folder)
        raise
    say(
        f"fleet up: {plan.nodes} SuperNodes online; `fedrank fleet status --dir {folder}`, "
        f"`fedrank fleet down --dir {folder}`"
    )
    return state


def _wait_online(
    plan: FleetPlan, state: dict[str, Any], ids: set[int], env: dict[str, str], say: Say
) -> None:
    t0 = time.monotonic()
    while True:
        for record in state["processes"]:
            if not is_ours(record):
                raise _died(record)
        online = _online(plan.connection, env) & ids
        if online == ids:
            say(f"{len(ids)} SuperNodes online after {time.monotonic() - t0:.0f} s")
            return
        if time.monotonic() - t0 > plan.wait:
            raise FedrankError(
                f"{len(online)} of {len(ids)} SuperNodes online after {plan.wait:.0f} s; "
                f"their logs: {plan.dir / 'logs'}/node-<i>.log"
            )
        time.sleep(2.0)


def status(folder: Path, say: Say = print, lines: int = 2) -> int:
    """Print each fleet process: name, PID, alive, address, log tail. Returns 0 when every
    process runs, 1 otherwise (also when there is no fleet in ``folder``)."""
    state = _load_state(folder)
    if state is None:
        say(f"no fleet in {folder} (start one: fedrank fleet up --nodes N --data PATH)")
        return 1
    say(f"fleet in {folder}: connection {state['connection']!r} -> {state['superlink']}")
    all_alive = True
    for record in state["processes"]:
        alive = is_ours(record)
        all_alive &= alive
        pid_file = read_pid_file(_pid_path(folder, record.name))
        note = "" if pid_file == record.pid else " (PID file missing)"
        say(
            f"  {record.name:<10} pid {record.pid:<8} {'alive' if alive else 'STOPPED':<8} "
            f"{record.address}{note}"
        )
        for line in log_tail(record.log, lines):
            say(f"  {'':<10} | {line[:160]}")
    return 0 if all_alive else 1


def down(folder: Path, timeout: float = 10.0, say: Say = print) -> int:
    """Stop the fleet's processes (SuperNodes, then the gateway, then the SuperLink) and
    remove its PID files and state; returns 0."""
    state = _load_state(folder)
    pid_files = sorted((folder / "pids").glob("*.pid"))
    if state is None:
        for pid_file in pid_files:  # no record of what they ran: never signal them
            say(
                f"{pid_file}: no fleet state beside it, so pid {read_pid_file(pid_file)} is "
                "not stopped; file removed"
            )
            pid_file.unlink(missing_ok=True)
        if not pid_files:
            say(f"no fleet in {folder}")
        return 0
    order = sorted(state["processes"], key=lambda p: ("node" not in p.name, p.name == "superlink"))
    for record in order:
        outcome = stop(record, timeout)
        if outcome == "not running":
            say(f"{record.name}: pid {record.pid} no longer runs it (stale PID file)")
        else:
            say(f"{record.name}: pid {record.pid} {outcome}")
    _forget(folder)
    say(f"fleet down: {folder} (logs kept in {folder / 'logs'})")
    return 0


# ---- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrank fleet",
        description="A local fleet: SuperLink (TLS, SuperNode authentication, loopback), the "
        "Fleet API gateway and N SuperNodes, each with its own slice of the data.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="start the fleet")
    p_up.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    p_up.add_argument(
        "--data",
        required=True,
        help="LETOR fold folder or file, or 'synthetic': its training sets are dealt to the nodes",
    )
    p_up.add_argument("--sets-per-node", type=int, default=0, help="at most K sets per node")
    p_up.add_argument(
        "--node-config",
        default="threads=1",
        help="node settings added to each node's data-path (default threads=1)",
    )
    p_up.add_argument("--superlink-port", type=int, default=SUPERLINK_PORT)
    p_up.add_argument("--gateway-port", type=int, default=GATEWAY_PORT)
    p_up.add_argument(
        "--node-port", type=int, default=FIRST_NODE_PORT, help="first SuperNode's local port"
    )
    p_up.add_argument("--connection", default=CONNECTION, help="connection name for flwr")
    p_up.add_argument("--seed", type=int, default=0, help="seed of the data slices")
    p_up.add_argument(
        "--wait", type=float, default=180.0, help="seconds to wait for the nodes to be online"
    )
    p_status = sub.add_parser("status", help="each process: PID, alive, address, log tail")
    p_status.add_argument("--lines", type=int, default=2, help="log lines per process")
    p_down = sub.add_parser("down", help="stop exactly the processes `up` started")
    p_down.add_argument(
        "--timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    for p in (p_up, p_status, p_down):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"fleet folder (default {DEFAULT_DIR})")
    p_conn = sub.add_parser(
        "connection", help="add or replace a connection in $FLWR_HOME/config.toml"
    )
    p_conn.add_argument("name", help="connection name, e.g. fedrank")
    p_conn.add_argument("--address", required=True, help="the SuperLink's HOST:PORT")
    p_conn.add_argument("--root-certificates", help="CA certificate (ca.crt); without it: insecure")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def say(line: str) -> None:
        print(line, flush=True)

    if args.action == "connection":
        path = write_connection(args.name, args.address, args.root_certificates)
        say(f"connection {args.name!r} -> {args.address} written to {path}")
        return 0
    folder = Path(args.dir)
    if args.action == "status":
        return status(folder, say, lines=args.lines)
    if args.action == "down":
        return down(folder, args.timeout, say)
    plan = FleetPlan(
        dir=folder,
        nodes=args.nodes,
        data=args.data,
        superlink_port=args.superlink_port,
        gateway_port=args.gateway_port,
        node_port=args.node_port,
        connection=args.connection,
        sets_per_node=args.sets_per_node,
        node_config=args.node_config,
        seed=args.seed,
        wait=args.wait,
    )
    up(plan, say)
    return 0
