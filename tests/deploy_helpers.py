"""Real Flower deployment processes for tests: SuperLink, SuperNodes and the ``flwr`` CLI.

The commands are the hardened ones the docs print (:mod:`fedrank.server.deploy_commands`): the
SuperLink on loopback with TLS and SuperNode authentication, ``fedrank gateway`` serving only
its Fleet API, SuperNodes dialling the gateway. Everything runs on loopback ports chosen free at
run time, in a temporary ``FLWR_HOME``, with
Flower's telemetry, update check and runtime dependency installation off. Every process is
started in its own session and remembered; :meth:`Processes.stop_all` stops each one and every
process it spawned (collected from ``/proc`` by parent PID before the parent is stopped), first
with SIGTERM and then SIGKILL, within a bounded time. Nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from fedrank.server.deploy_commands import gateway_command, superlink_command, supernode_command
from fedrank.server.processes import alive, descendants, process_stat, send_signal

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flower-supernode, flwr
HOST = "127.0.0.1"


# ---- small utilities ---------------------------------------------------------------------------
def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _local_program(args: Sequence[str]) -> list[str]:
    """A documented command with its program taken from this environment's bin folder."""
    return [str(BIN / args[0]), *args[1:]]


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def flwr_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, nothing that calls home."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "200",
        }
    )
    if extra:
        env.update(extra)
    return env


# ---- process tree bookkeeping ----------------------------------------------------------------
def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment holds ``name=value``.

    Used to find strays a test started indirectly (their FLWR_HOME is the test's temp dir).
    """
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in env.split(b"\0") and process_stat(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


@dataclass
class Proc:
    """One started process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    _log_file: Any = None
    stopped: bool = False

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (regex); fails early if the process exits."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            match = regex.search(self.log())
            if match is None and not self.alive():
                match = regex.search(self.log())
                if match is None:
                    raise RuntimeError(
                        f"{self.name} exited (rc={self.popen.returncode}) before logging "
                        f"{pattern!r}; log tail:\n{self.log()[-3000:]}"
                    )
            return match

        return wait_until(found, timeout, what=f"{self.name} to log {pattern!r}")

    def wait_exit(self, timeout: float) -> int:
        return int(self.popen.wait(timeout=timeout))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and every descendant; SIGKILL what is left after ``timeout``."""
        if self.stopped:
            return
        tree = descendants(self.pid)
        if self.alive():
            send_signal(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        # children the parent did not take down with it (e.g. a detached SuperExec)
        tree += [d for d in descendants(self.pid) if d not in tree] if self.alive() else []
        for pid, start in tree:
            if alive(pid, start):
                send_signal(pid, signal.SIGTERM)
        grace = time.monotonic() + 3.0
        while time.monotonic() < grace and any(alive(p, s) for p, s in tree):
            time.sleep(0.1)
        for pid, start in tree:
            if alive(pid, start):
                send_signal(pid, signal.SIGKILL)
        if self.alive():
            send_signal(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5.0)
        if self._log_file is not None:
            self._log_file.close()
        self.stopped = True


@dataclass
class Processes:
    """Starts processes and guarantees they are all stopped (use as a context manager)."""

    workdir: Path
    env: dict[str, str]
    started: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in Proc.stop
        popen = subprocess.Popen(
            list(args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env or self.env),
            cwd=str(cwd or self.workdir),
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path, list(args), log_file)
        self.started.append(proc)
        return proc

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every started process (in parallel, each bounded by ``timeout`` + a few s)."""
        errors = []
        pending = [p for p in self.started if not p.stopped]
        with ThreadPoolExecutor(max_workers=max(1, len(pending))) as pool:
            futures = {pool.submit(proc.stop, timeout): proc for proc in pending}
            for future, proc in futures.items():
                try:
                    future.result()
                except Exception as err:  # keep stopping the others
                    errors.append(f"{proc.name}: {err!r}")
        # anything still running with our private FLWR_HOME was started by us, indirectly
        home = self.env.get("FLWR_HOME")
        if home:
            for pid in processes_with_env("FLWR_HOME", home):
                send_signal(pid, signal.SIGKILL)
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# ---- the flwr CLI and a deployment on loopback -----------------------------------------------
def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    root_certificates: Path | None = None,
    insecure: bool = False,
) -> Path:
    """Write (replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``."""
    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_certificates is not None:
        lines.append(f'root-certificates = "{root_certificates}"')
    if insecure:
        lines.append("insecure = true")
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # valid TOML
    return path


def flwr_cli(
    args: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 60.0,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with a hard timeout; raise with its output when it fails."""
    proc = subprocess.run(
        [str(BIN / "flwr"), *args],
        env=dict(env),
        cwd=str(cwd or REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"flwr {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def flwr_json(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 60.0, cwd: Path | None = None
) -> dict[str, Any]:
    """Run a ``flwr ... --format json`` command and parse its JSON object."""
    out = flwr_cli([*args, "--format", "json"], env, timeout, cwd).stdout
    start = out.index("{")
    return json.loads(out[start:])


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on loopback, driven through the real CLIs.

    ``certs`` is the folder :func:`fedrank.server.certs.make_all` wrote (None: insecure mode).
    """

    procs: Processes
    flwr_home: Path
    certs: Path | None
    auth: bool = True
    connection: str = "fedrank-test"
    port: int = 0
    superlink: Proc | None = None
    supernodes: dict[str, Proc] = field(default_factory=dict)
    gateway_port: int = 0
    gateway: Proc | None = None

    @property
    def address(self) -> str:
        """The SuperLink's loopback address (Control API: the ``flwr`` CLI)."""
        return f"{HOST}:{self.port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes dial: the gateway when one runs, else the SuperLink."""
        return f"{HOST}:{self.gateway_port}" if self.gateway is not None else self.address

    @property
    def env(self) -> dict[str, str]:
        return self.procs.env

    def start_superlink(
        self, extra_args: Sequence[str] = (), timeout: float = 60.0, gateway: bool = True
    ) -> Proc:
        """The documented SuperLink command (and, with TLS and ``gateway``, the documented
        ``fedrank gateway`` in front of it for the SuperNodes)."""
        self.port = self.port or free_port()
        if self.certs is None:
            args = [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ]
        else:
            args = _local_program(superlink_command(str(self.certs), self.port))
            if not self.auth:
                args.remove("--enable-supernode-auth")
        self.superlink = self.procs.start("superlink", [*args, *extra_args])
        self.superlink.wait_for_log(r"Uvicorn running on", timeout)
        if self.certs is not None and gateway:
            self.start_gateway(timeout)
        write_connection(
            self.flwr_home,
            self.connection,
            self.address,
            root_certificates=None if self.certs is None else self.certs / "ca.crt",
            insecure=self.certs is None,
        )
        return self.superlink

    def start_gateway(self, timeout: float = 60.0) -> Proc:
        """``fedrank gateway`` on a free port: the Fleet API only, in front of the SuperLink."""
        assert self.certs is not None, "the gateway serves TLS only"
        self.gateway_port = self.gateway_port or free_port()
        args = gateway_command(str(self.certs), f"{HOST}:{self.gateway_port}", self.address)
        self.gateway = self.procs.start("gateway", _local_program(args))
        wait_until(
            lambda: port_open(HOST, self.gateway_port) or self.gateway.popen.poll() is not None,
            timeout,
            what="the gateway to listen",
        )
        if not self.gateway.alive():
            raise RuntimeError(f"fedrank gateway exited:\n{self.gateway.log()[-3000:]}")
        return self.gateway

    def register(self, public_key: Path, timeout: float = 60.0) -> int:
        """``flwr supernode register`` the key; returns the node id."""
        result = flwr_json(
            ["supernode", "register", str(public_key), self.connection], self.env, timeout
        )
        return int(result["node-id"])

    def start_supernode(
        self,
        name: str,
        private_key: Path | None = None,
        node_config: str = "",
        insecure: bool = False,
        max_wait_time: float | None = None,
        extra_args: Sequence[str] = (),
        root_certificates: bool = True,
    ) -> Proc:
        home = self.procs.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        if (
            self.certs is not None
            and private_key is not None
            and not insecure
            and root_certificates
        ):
            args = _local_program(
                supernode_command(
                    str(private_key),
                    node_config,
                    server=self.fleet_address,
                    certs=str(self.certs),
                    port=free_port(),
                )
            )
            if not node_config:
                args = args[:-2]
        else:  # the refused variants: no key, no TLS, or TLS without the CA certificate
            args = [
                str(BIN / "flower-supernode"),
                "--superlink",
                self.fleet_address,
                "--port",
                str(free_port()),
            ]
            if insecure or self.certs is None:
                args.append("--insecure")
            elif root_certificates:
                args += ["--root-certificates", str(self.certs / "ca.crt")]
            if private_key is not None:
                args += ["--auth-supernode-private-key", str(private_key)]
            if node_config:
                args += ["--node-config", node_config]
        if max_wait_time is not None:
            args += ["--max-retries", "3", "--max-wait-time", str(max_wait_time)]
        args += list(extra_args)
        env = flwr_env(home, {"FLWR_HOME": str(home)})
        # the supernode's own FLWR_HOME differs; remember it so stop_all finds its strays
        proc = self.procs.start(name, args, env=env)
        self.supernodes[name] = proc
        return proc

    def nodes(self) -> list[dict[str, Any]]:
        return list(flwr_json(["supernode", "list", self.connection], self.env)["nodes"])

    def run(self, app: Path, run_config: Mapping[str, Any], timeout: float = 120.0) -> int:
        """``flwr run APP CONNECTION --run-config ...``; returns the run id.

        Refuses an app whose pyproject.toml still has ``[tool.flwr.federations]``: Flower 1.42
        would migrate that section into FLWR_HOME and comment it out in the app's file.
        """
        with open(app / "pyproject.toml", "rb") as fh:
            if "federations" in tomllib.load(fh).get("tool", {}).get("flwr", {}):
                raise RuntimeError(
                    f"{app / 'pyproject.toml'} has [tool.flwr.federations]: `flwr run` would "
                    "rewrite that file; connections belong in $FLWR_HOME/config.toml"
                )
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        args = ["run", str(app), self.connection]
        if overrides:
            args += ["--run-config", overrides]
        result = flwr_json(args, self.env, timeout, cwd=app)
        return int(result["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        result = flwr_json(["list", self.connection, "--run-id", str(run_id)], self.env)
        return dict(result["runs"][0])

    def wait_run(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Wait until the run is finished; returns its ``flwr ls`` entry."""
        return wait_until(
            lambda: (info := self.run_info(run_id))["status"].startswith("finished") and info,
            timeout,
            interval=2.0,
            what=f"run {run_id} to finish",
        )

    def run_log(self, run_id: int) -> str:
        return flwr_cli(["log", str(run_id), self.connection, "--show"], self.env).stdout

    def stop_run(self, run_id: int) -> dict[str, Any]:
        return flwr_json(["stop", str(run_id), self.connection], self.env)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


@contextlib.contextmanager
def deployment(
    workdir: Path, certs: Path | None, auth: bool = True, flwr_home: Path | None = None
) -> Iterator[Deployment]:
    """A :class:`Deployment` whose processes are all stopped on exit, also on failure
    (``flwr_home``: the ``flwr`` CLI's FLWR_HOME, by default ``workdir/flwr-home``)."""
    flwr_home = flwr_home or workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir, flwr_env(flwr_home))
    dep = Deployment(procs, flwr_home, certs, auth)
    try:
        yield dep
    finally:
        homes = [flwr_home] + [workdir / f"home-{n}" for n in dep.supernodes]
        try:
            procs.stop_all()
        finally:
            for home in homes:
                for pid in processes_with_env("FLWR_HOME", str(home)):
                    send_signal(pid, signal.SIGKILL)
