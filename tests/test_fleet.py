"""`fedrank fleet`: its errors, its PID bookkeeping and its process stopping, with real processes.

A real fleet (SuperLink, gateway, SuperNodes) runs in ``test_deployment.py``; here the
fleet's state holds ordinary processes this test starts (``sleep``, a shell with a child),
which is enough to check that ``status`` and ``down`` act on exactly the recorded processes
and that a stale PID file never stops a stranger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrank.cli import main as fedrank
from fedrank.server.processes import ProcessRecord, descendants, is_ours, start


def _state(folder: Path, records: list[ProcessRecord]) -> None:
    (folder / "pids").mkdir(parents=True, exist_ok=True)
    state = {
        "dir": str(folder),
        "cwd": str(folder),
        "connection": "fedrank",
        "superlink": "127.0.0.1:9093",
        "gateway": "127.0.0.1:9092",
        "data": "unused",
        "nodes": [],
        "processes": [r.to_dict() for r in records],
    }
    (folder / "fleet.json").write_text(json.dumps(state))
    for r in records:
        (folder / "pids" / f"{r.name}.pid").write_text(f"{r.pid}\n")


@pytest.fixture
def strangers() -> Iterator[list[subprocess.Popen]]:
    """Processes the fleet must never stop; killed by the test at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _stranger(strangers: list[subprocess.Popen]) -> subprocess.Popen:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    strangers.append(proc)
    return proc


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_down_stops_the_recorded_process_and_its_children(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "fleet"
    record = start(
        "node-1",
        ["bash", "-c", "sleep 300 & sleep 301; wait"],
        folder / "logs" / "node-1.log",
        dict(os.environ),
        tmp_path,
        address="127.0.0.1:9094",
    )
    deadline = time.monotonic() + 10
    while len(descendants(record.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [pid for pid, _ in descendants(record.pid)]
    assert len(children) == 2 and is_ours(record)
    _state(folder, [record])

    assert fedrank(["fleet", "status", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"node-1     pid {record.pid}" in out and "alive" in out

    assert fedrank(["fleet", "down", "--dir", str(folder), "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert f"node-1: pid {record.pid} stopped" in out
    assert not any(_alive(pid) for pid in [record.pid, *children])
    assert not (folder / "fleet.json").exists() and not list((folder / "pids").iterdir())
    assert (folder / "logs" / "node-1.log").exists()  # logs are kept

    assert fedrank(["fleet", "status", "--dir", str(folder)]) == 1
    assert "no fleet in" in capsys.readouterr().out


def test_stale_pid_files_never_stop_a_stranger(tmp_path: Path, strangers, capsys) -> None:
    folder = tmp_path / "fleet"
    other = _stranger(strangers)
    ticks = int(Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    records = [
        # the PID now runs something else than what the fleet started
        ProcessRecord("superlink", other.pid, ticks, ("flower-superlink", "--port", "9093"), "x"),
        # the same command line, but the PID was reused: another start time
        ProcessRecord("gateway", other.pid, ticks - 1, ("sleep", "300"), "x"),
        # a PID that is gone
        ProcessRecord("node-1", 2**22 + 12345, 1, ("flower-supernode",), "x"),
    ]
    _state(folder, records)
    assert fedrank(["fleet", "status", "--dir", str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.count("STOPPED") == 3
    assert fedrank(["fleet", "down", "--dir", str(folder), "--timeout", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("stale PID file") == 3, out
    assert other.poll() is None  # the stranger still runs
    assert not (folder / "fleet.json").exists() and not list((folder / "pids").iterdir())

    # PID files without the fleet's state: nothing to check them against, so nothing stopped
    (folder / "pids" / "superlink.pid").write_text(f"{other.pid}\n")
    assert fedrank(["fleet", "down", "--dir", str(folder)]) == 0
    assert "is not stopped; file removed" in capsys.readouterr().out
    assert other.poll() is None and not list((folder / "pids").iterdir())


def test_up_refuses_a_fleet_that_is_up(tmp_path: Path, strangers, capsys) -> None:
    folder = tmp_path / "fleet"
    running = start("superlink", ["sleep", "300"], folder / "logs" / "s.log", os.environ, tmp_path)
    try:
        _state(folder, [running])
        rc = fedrank(["fleet", "up", "--nodes", "2", "--data", "synthetic", "--dir", str(folder)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"a fleet is already up in {folder}: superlink (pid {running.pid})" in err
        assert "fedrank fleet down" in err
        assert is_ours(running)
    finally:
        os.killpg(running.pid, signal.SIGKILL)


def test_up_names_a_port_in_use_and_starts_nothing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "fleet"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = fedrank(
            ["fleet", "up", "--nodes", "1", "--data", "synthetic", "--dir", str(folder)]
            + ["--superlink-port", str(port)]
        )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"port {port} (superlink) on 127.0.0.1 is in use" in err
    assert not (folder / "fleet.json").exists() and not (folder / "certs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be 1..64"),
        (["--nodes", "2", "--gateway-port", "80"], "--gateway-port must be a port in 1024..65535"),
        (["--nodes", "2", "--node-config", 'data-path="x"'], "'data-path' is set by the fleet"),
        (["--nodes", "2", "--sets-per-node", "-1"], "--sets-per-node must be >= 0"),
        (["--nodes", "3", "--node-port", "9091"], "must all differ"),
    ],
)
def test_up_option_errors_are_one_line(tmp_path: Path, capsys, args, message) -> None:
    rc = fedrank(["fleet", "up", "--data", "synthetic", "--dir", str(tmp_path / "f"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_up_refuses_data_with_fewer_sets_than_nodes(tmp_path: Path, capsys) -> None:
    data = tmp_path / "tiny.txt"
    data.write_text("".join(f"1 qid:q{k} 1:0.5\n0 qid:q{k} 1:0.1\n" for k in range(6)))
    rc = fedrank(["fleet", "up", "--nodes", "9", "--data", str(data), "--dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "training sets cannot be dealt to 9 nodes" in err, err
    assert not (tmp_path / "f" / "fleet.json").exists()


def test_connection_is_written_with_flowers_own_writer(tmp_path: Path, monkeypatch) -> None:
    """On a fresh FLWR_HOME and run twice: one valid file, Flower's defaults kept."""
    from fedrank.server.certs import make_all

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    certs = make_all(tmp_path / "certs", nodes=0)
    for address in ("127.0.0.1:9093", "127.0.0.1:9193"):
        args = ["fleet", "connection", "fedrank", "--address", address]
        assert fedrank([*args, "--root-certificates", str(certs.ca_cert)]) == 0
    text = (home / "config.toml").read_text()
    config = tomllib.loads(text)
    assert text.count("[superlink.fedrank]") == 1 and text.count("[superlink]") == 1
    assert config["superlink"]["default"] == "local"  # Flower's own default, kept
    assert config["superlink"]["fedrank"] == {
        "address": "127.0.0.1:9193",
        "root-certificates": str(certs.ca_cert.resolve()),
    }
    # the flwr CLI reads it
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "config", "list"],
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "fedrank" in proc.stdout, proc.stdout + proc.stderr


def test_connection_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    args = ["fleet", "connection", "fedrank", "--address", "127.0.0.1:9093"]
    assert fedrank([*args, "--root-certificates", str(tmp_path / "missing.crt")]) == 2
    assert "missing.crt: no such file" in capsys.readouterr().err
    assert fedrank(["fleet", "connection", "bad name", "--address", "127.0.0.1:9093"]) == 2
    assert "use letters, digits" in capsys.readouterr().err
    # a file damaged by hand (a second [superlink] table): named, with what to do
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text("[superlink]\n[superlink]\n")
    assert fedrank(args) == 2
    err = capsys.readouterr().err
    assert "config.toml" in err and "valid TOML" in err and err.count("\n") == 1, err
