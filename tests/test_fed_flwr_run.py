"""`flwr run .` runs the app from pyproject.toml in Flower's local simulation, offline.

Uses a temporary FLWR_HOME, the environment variables that keep `flwr run` from installing
packages and from calling home, and stops the background SuperLink it starts (by PID).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROL_PORT = 39093  # the local SuperLink's Control API (flwr.cli.constant)

pytestmark = pytest.mark.slow


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the `flower-superlink` processes started for this FLWR_HOME."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_flwr_run_default_local_simulation(tmp_path: Path) -> None:
    assert not _port_in_use(CONTROL_PORT), (
        f"another local SuperLink already listens on port {CONTROL_PORT}; `flwr run` would "
        "submit to it instead of starting its own"
    )
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "out"
    env = {
        **os.environ,
        # `flwr run` starts `flower-superlink` by name: take the one beside this interpreter
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    overrides = (
        'num-server-rounds=1 data-path="synthetic:num_sets=120" teacher-epochs=1 '
        f'teacher-d-model=8 teacher-heads=2 local-epochs=1 out-dir="{out}"'
    )
    flwr = str(Path(sys.executable).with_name("flwr"))
    try:
        proc = subprocess.run(
            [flwr, "run", str(ROOT), "--stream", "--run-config", overrides],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _stop(_superlink_pids(flwr_home))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Successfully started run" in log
    assert (flwr_home / "config.toml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"]["rounds"] == 1
    assert summary["config"]["num-server-rounds"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2
    # what `flwr run` left behind was stopped by PID; a killed SuperLink may take a moment to go
    deadline = time.monotonic() + 30
    while _superlink_pids(flwr_home) and time.monotonic() < deadline:
        _stop(_superlink_pids(flwr_home))
        time.sleep(0.5)
    assert not _superlink_pids(flwr_home)
