"""`fedrank simulate --ray-address`: the simulated clients run on an existing Ray cluster.

A real Ray head starts on loopback (its own ports, ``--block`` so that the head's processes
end with the command), a short simulation attaches to it, and the cluster's job table shows
the simulation's process as one of its drivers. The head is stopped by its PID, never with
``ray stop`` (which stops every Ray instance of the user on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedrank.common.errors import ConfigError
from fedrank.simulations.runtime import RayOptions, backend_config, parse_memory

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_backend_config_local_or_attached() -> None:
    local = backend_config(RayOptions(num_cpus=3, client_cpus=0.5, client_memory=2**29))
    assert local["init_args"]["num_cpus"] == 3 and local["init_args"]["address"] == "local"
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0, "memory": 2.0**29}
    attached = backend_config(RayOptions(address="127.0.0.1:6379"))
    # Ray refuses num_cpus / num_gpus when it connects to a running cluster
    assert attached["init_args"]["address"] == "127.0.0.1:6379"
    assert "num_cpus" not in attached["init_args"] and "num_gpus" not in attached["init_args"]
    assert parse_memory("512M") == 512 * 2**20 and parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ConfigError, match="memory"):
            parse_memory(bad)
    with pytest.raises(ConfigError, match="CPUs"):
        RayOptions(client_cpus=0)


@pytest.mark.slow
def test_simulate_attaches_to_a_running_ray_head(tmp_path: Path) -> None:
    port, client_port, agent_port, agent_grpc, metrics = _free_ports(5)
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    head_log = tmp_path / "head.log"
    # the head's own temp folder (short: Ray's socket paths have a length limit), so its
    # address file does not land in /tmp/ray, where any later ray.init() would find it
    ray_temp = Path(tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp"))
    with open(head_log, "wb") as log:
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--port",
                str(port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--include-dashboard=false",
                "--ray-client-server-port",
                str(client_port),
                "--dashboard-agent-listen-port",
                str(agent_port),
                "--dashboard-agent-grpc-port",
                str(agent_grpc),
                "--metrics-export-port",
                str(metrics),
                "--disable-usage-stats",
                "--temp-dir",
                str(ray_temp),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in head_log.read_bytes():
            assert head.poll() is None, head_log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, head_log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)

        out = tmp_path / "run"
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedrank.cli",
                "simulate",
                "--only",
                "distill",
                "--clients",
                "2",
                "--rounds",
                "1",
                "--data",
                "synthetic:num_sets=120,min_items=8,max_items=12",
                "--out",
                str(out),
                "--ray-address",
                address,
                "--client-cpus",
                "1",
                "--client-memory",
                "256M",
                *("--set", "teacher-epochs=1", "--set", "teacher-d-model=8"),
                *("--set", "teacher-heads=1", "--set", "teacher-layers=1"),
                *("--set", "local-epochs=0", "--set", "local-steps=2"),
                *("--set", "fraction-evaluate=0.0"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": str(REPO)},
        )
        text = sim.communicate(timeout=400)[0].decode(errors="replace")
        assert sim.returncode == 0, text[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["student"]["rounds"] == 1
        assert len(summary["federation"]["client_keys"]) == 2

        # the cluster's job table lists the simulation's process as a driver
        probe = (
            "import json, ray\n"
            f"ray.init(address={address!r}, logging_level='error', log_to_driver=False)\n"
            "from ray._private.state import jobs\n"
            "print(json.dumps([[j['DriverPid'], j['IsDead']] for j in jobs()]))\n"
        )
        listed = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, env=env, timeout=120, check=True
        )
        drivers = json.loads(listed.stdout.decode().strip().splitlines()[-1])
        assert [sim.pid, True] in drivers, (drivers, sim.pid)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_temp, ignore_errors=True)
