"""The deployment path with real processes, walked the way README prints it.

One fleet serves the module: README's deployment blocks run in bash, exactly as printed, in
a copy of the project (``tests/readme_walk.py``): the server block (set-up, ``fedrank fleet
up`` with 3 SuperNodes, TLS and SuperNode authentication, a 3-round ``flwr run``, a signed
export), then the tests below, then README's shutdown block (``fedrank fleet down``), after
which no process of the fleet may be left. ``fedrank fleet up`` runs the hardened commands
the docs print (``fedrank.server.deploy_commands``): the SuperLink with TLS and
``--enable-supernode-auth`` on loopback, ``fedrank gateway`` serving only its Fleet API (the
"network address"), registered SuperNodes dialling the gateway, each with its own LETOR file
of MQ2008 training sets.

Against that fleet: README's device block (a device install in a fresh virtual environment
scores the signed student; a SuperNode from it joins the fleet and trains; the device
footprint is measured), nodes that must be refused (a key never registered, a node without
TLS, a node without the CA certificate), the network address serving nothing but the Fleet
API, ``flwr stop``, a SuperNode restart, and ``--trusted-entities``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_helpers import (
    BIN,
    HOST,
    REPO,
    Deployment,
    Proc,
    deployment,
    flwr_cli,
    flwr_env,
    flwr_json,
    processes_with_env,
    wait_until,
    write_connection,
)
from readme_walk import (
    PeakPerRound,
    activate_line,
    bash,
    clone,
    du,
    loaded,
    ports_lock,
    readme_block,
    readme_env,
)
from support import MQ2008_FOLD1, SERVER_SIDE

from fedrank.common.letor import read_letor
from fedrank.server.certs import make_all
from fedrank.server.deploy_commands import supernode_command
from fedrank.server.processes import ProcessRecord, is_ours, stop

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 400.0  # seconds for one federated run (a busy 2-core machine is slow)
# docs/deployment.md, "Real, separate machines": each device makes its own key pair
DEVICE_KEYGEN = 'ssh-keygen -t ecdsa -b 384 -N "" -C node-1 -f certs/node-1'
DEVICE_NODE_PORT = 9098  # README's fleet uses 9092-9096
# what a device install must neither hold nor import
CLIENT_APP_MODULE = "fedrank.client.client_app"

# a small, quick federation for the tests' own runs (README's run uses the defaults)
BASE_CONFIG = {
    "num-server-rounds": 2,
    "teacher-epochs": 1,
    "teacher-d-model": 16,
    "teacher-heads": 2,
    "teacher-layers": 1,
    "local-epochs": 1,
    "fraction-evaluate": 0.0,
    "min-available-nodes": 3,
    "round-timeout": 120.0,
    "score-mode": "targeted",
}


@dataclass
class Fleet:
    dep: Deployment
    work: Path
    project: Path  # the copy of the project README's commands run in
    env: dict[str, str]  # the user's shell
    readme_out: str  # what README's server block printed
    node_ids: list[int]
    device_files: list[Path]
    keys: list[Path]  # node-1..3: the fleet's; node-4; node-5 never registered; a device's own
    public_keys: list[Path]
    intruder: Proc
    plain: Proc
    unverified: Proc
    registered: set[int]  # every node id registered so far (the fleet's and the tests')

    def config(self, name: str, **overrides: object) -> dict[str, object]:
        return {
            **BASE_CONFIG,
            "data-path": str(MQ2008_FOLD1.resolve()),
            "out-dir": str(self.work / "runs" / name),
            **overrides,
        }


def _wait_for_run_output(out_dir: Path, run_id: int, dep: Deployment, timeout: float) -> dict:
    """Wait for the ServerApp's summary.json (cheap file polls; the CLI only every 20 s, to
    notice a run that ended without one), then for the run's status in ``flwr ls``."""
    summary = out_dir / "summary.json"
    last_check = [time.monotonic()]

    def done() -> bool:
        if summary.is_file():
            return True
        if dep.superlink is not None and not dep.superlink.alive():
            raise RuntimeError(f"the SuperLink died:\n{dep.superlink.log()[-3000:]}")
        if time.monotonic() - last_check[0] > 20:
            last_check[0] = time.monotonic()
            status = dep.run_info(run_id)["status"]
            if status.startswith("finished") and not summary.is_file():
                raise AssertionError(
                    f"run {run_id} ended with status {status} and no summary; log:\n"
                    + dep.run_log(run_id)[-4000:]
                )
        return False

    try:
        wait_until(done, timeout, interval=0.5, what=f"{summary}")
    except TimeoutError:
        info = dep.run_info(run_id)
        raise AssertionError(
            f"run {run_id} did not finish in {timeout:.0f}s (status {info['status']}); log:\n"
            + dep.run_log(run_id)[-4000:]
        ) from None
    return dep.wait_run(run_id, 60.0)


def _rows(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@dataclass
class FleetProcess:
    """A process ``fedrank fleet up`` started, seen through the Proc interface the tests use."""

    record: ProcessRecord

    def log(self) -> str:
        return Path(self.record.log).read_text(errors="replace")

    def alive(self) -> bool:
        return is_ours(self.record)

    def stop(self, timeout: float = 10.0) -> None:
        stop(self.record, timeout)


def _fedrank(
    args: list[str], env: dict[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "fedrank"), *args],
        env=env,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, f"fedrank {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    project = clone(work)
    fleet_dir = project / "fleet"
    env = readme_env()
    down = ""
    with ports_lock(), deployment(work, fleet_dir / "certs", flwr_home=project / ".flwr") as dep:
        try:
            # README, server block: set-up, a fleet of 3, a 3-round run, a signed export
            readme_out = bash(readme_block("server"), project, env, timeout=1800)
            state = json.loads((fleet_dir / "fleet.json").read_text())
            dep.connection = "fedrank"
            dep.port = int(state["superlink"].rsplit(":", 1)[1])
            dep.gateway_port = int(state["gateway"].rsplit(":", 1)[1])
            started = {
                r["name"]: FleetProcess(ProcessRecord.from_dict(r)) for r in state["processes"]
            }
            dep.superlink, dep.gateway = started["superlink"], started["gateway"]
            dep.supernodes.update({f"node{i}": started[f"node-{i}"] for i in (1, 2, 3)})
            # two more keys (node-4 for the trusted-entities node, node-5 never registered) and
            # a device's own key pair, made on the device with the command the docs give
            certs = make_all(fleet_dir / "certs", nodes=5)
            device = work / "device"
            (device / "certs").mkdir(parents=True)
            subprocess.run(DEVICE_KEYGEN, shell=True, cwd=device, check=True, capture_output=True)
            keys = [*certs.node_private_keys, device / "certs" / "node-1"]
            public_keys = [*certs.node_public_keys, device / "certs" / "node-1.pub"]
            # a key the SuperLink does not know, a node that does not speak TLS, and one that
            # speaks TLS without the CA certificate
            intruder = dep.start_supernode("unregistered", keys[4], max_wait_time=8)
            plain = dep.start_supernode("insecure", None, insecure=True, max_wait_time=8)
            unverified = dep.start_supernode(
                "no-ca", keys[4], root_certificates=False, max_wait_time=8
            )
            yield Fleet(
                dep,
                work,
                project,
                env,
                readme_out,
                [int(n["node_id"]) for n in state["nodes"]],
                [Path(n["data"]) for n in state["nodes"]],
                keys,
                public_keys,
                intruder,
                plain,
                unverified,
                {int(n["node_id"]) for n in state["nodes"]},
            )
        finally:
            for proc in dep.procs.started:  # the tests' own nodes first
                proc.stop()
            # README, shutdown block
            down = bash(activate_line() + readme_block("down"), project, env, timeout=300)
            homes = [dep.flwr_home, *(fleet_dir / "nodes").glob("node-*/flwr-home")]
            left = {str(h): processes_with_env("FLWR_HOME", str(h)) for h in homes}
    assert "superlink: pid" in down and "fleet down" in down, down
    assert not (fleet_dir / "fleet.json").exists()
    assert not list((fleet_dir / "pids").glob("*.pid"))
    assert not any(left.values()), f"processes of the fleet left running: {left}"


def test_readme_fleet_trains_three_nodes_over_tls(fleet: Fleet):
    """README's server block: `fleet up` brought 3 nodes online, `fleet status` showed 5
    processes alive, the 3-round run finished with every node training in every round on
    the teacher scores of exactly its own sets, and the student was exported signed."""
    out, dep = fleet.readme_out, fleet.dep
    alive = re.findall(r"^\s+[\w-]+\s+pid \d+\s+alive\s", out, flags=re.M)
    assert "3 SuperNodes online" in out and len(alive) == 5, out[-4000:]
    run_dir = fleet.project / "runs" / "fleet"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["clients"] == 3
        assert {int(c["node"]) for c in row["clients_train"]} == set(fleet.node_ids)
        assert 0.0 <= row["ndcg@10"] <= 1.0
        assert all(c["num_examples"] > 0 for c in row["clients_train"])
    # teacher scores travel once per node (round 1), then the nodes use their cached copy
    assert rows[1]["bytes_scores_to_clients"] > 0 and rows[1]["score_deliveries"] == 3
    assert rows[2]["bytes_scores_to_clients"] == 0 and rows[2]["score_deliveries"] == 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student"]["rounds"] == 3
    assert (fleet.project / "student.safetensors").is_file()
    # targeted mode: each device got the scores of exactly its own sets, no other client's
    deliveries = summary["federation"]["score_deliveries"]
    assert len(deliveries) == 3 and all(d["exact_match"] for d in deliveries)
    files = zip(fleet.node_ids, fleet.device_files, strict=True)
    sizes = {i: len(read_letor(f).set_ids) for i, f in files}
    for d in deliveries:  # a device's sets minus those it keeps for local testing
        assert 0 < d["num_sets"] <= sizes[int(d["node_id"])]

    # `flwr ls` in the block showed the run finished; the CLI sees it and its log
    runs = flwr_json(["ls", dep.connection], dep.env)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    run_log = dep.run_log(int(runs[0]["run-id"]))
    assert "round 3/3" in run_log
    # per device: one log line per node and round, summary.json per node, the report's table
    for node in fleet.node_ids:
        assert f"round 3: node {node}: trained loss" in run_log
        entry = summary["per_node"][str(node)]
        assert entry["rounds_trained"] == 3 and entry["rounds_evaluated"] == 3
        assert 0.0 <= entry["eval"]["ndcg@10"] <= 1.0
    assert "per device:" in out
    table = (run_dir / "devices.csv").read_text().splitlines()
    assert len(table) == 4 and all(any(str(n) in r for r in table) for n in fleet.node_ids)
    nodes = {int(n["node-id"]): n["status"] for n in dep.nodes()}
    assert set(fleet.node_ids) <= set(nodes)

    # `fleet up` again: one line saying so, nothing started
    again = bash(
        activate_line() + "fedrank fleet up --nodes 3 --data x || echo rc=$?",
        fleet.project,
        fleet.env,
        timeout=120,
    )
    assert "rc=2" in again and "a fleet is already up in fleet" in again, again
    assert "Traceback" not in again


def test_device_install_scores_and_trains(fleet: Fleet, tmp_path: Path):
    """README's device block: a device install in a fresh virtual environment verifies and
    scores the signed student. It holds and imports nothing server-side, scores an ONNX
    export without loading torch, and a SuperNode started from it, with the key pair the
    device made itself, joins the fleet and trains in a 2-round run (teacher from the shared
    cache). The device footprint is measured on the way and printed."""
    project, dep = fleet.project, fleet.dep
    out = bash(readme_block("device"), project, fleet.env, timeout=1800)
    assert re.search(r"signature by \S+ verified; ndcg@10 0\.\d+", out), out[-3000:]
    device_bin = project / ".device" / "bin"
    figures: dict[str, object] = {}

    # nothing server-side installed or imported
    imported = loaded(device_bin / "python", f"import {CLIENT_APP_MODULE}", tmp_path)
    assert not set(imported["modules"]) & set(SERVER_SIDE), imported["modules"]
    figures["client_import_mib"] = imported["peak_mib"]
    distributions = [m for m in SERVER_SIDE if not m.startswith("fedrank.")]
    probe = f"import importlib.util\nfound = [m for m in {distributions!r} if importlib.util."
    loaded(device_bin / "python", probe + "find_spec(m)]\nassert not found, found", tmp_path)
    # ONNX scoring: no torch loaded; the safetensors student needs torch
    bash(
        activate_line() + "fedrank export --run runs/fleet --format onnx --out student.onnx "
        "--sign-key fleet/certs/student-signing.key",
        project,
        fleet.env,
        timeout=300,
    )
    for fmt in ("onnx", "safetensors"):
        run = loaded(
            device_bin / "python",
            "from fedrank.cli import main\nassert main(['score', '--model', "
            f"'student.{fmt}', '--verify-key', 'fleet/certs/student-signing.pub', "
            "'--data', 'fleet/nodes/node-1/letor.txt', '--out', 'r.jsonl']) == 0",
            project,
        )
        figures[f"score_{fmt}_mib"] = run["peak_mib"]
        assert ("torch" in run["modules"]) == (fmt == "safetensors"), fmt
    assert figures["score_onnx_mib"] < figures["score_safetensors_mib"], figures
    site = next((project / ".device" / "lib").glob("python3*/site-packages"))
    total = du(project / ".device")
    torch_bytes = sum(du(p) for p in (*site.glob("torch*"), *site.glob("nvidia*")))
    figures["install_mib"] = round(total / 2**20)
    figures["install_torch_mib"] = round(torch_bytes / 2**20)
    figures["install_without_torch_mib"] = round((total - torch_bytes) / 2**20)

    # a SuperNode from the device install, with the device's own key, joins and trains
    device_id = dep.register(fleet.public_keys[5])
    fleet.registered.add(device_id)
    data = (MQ2008_FOLD1 / "vali.txt.gz").resolve()
    args = supernode_command(
        str(fleet.keys[5]),
        f'data-path="{data}" threads=1',
        server=dep.fleet_address,
        certs=str(project / "fleet" / "certs"),
        port=DEVICE_NODE_PORT,
    )
    home = fleet.work / "home-device"
    home.mkdir()
    env = flwr_env(home, {"PATH": f"{device_bin}{os.pathsep}{fleet.env['PATH']}"})
    env["FLWR_HOME"] = str(home)
    node = dep.procs.start("device", [str(device_bin / args[0]), *args[1:]], env, project)
    dep.supernodes["device"] = node  # its home is swept for strays at the end

    def online() -> set[int]:
        return {int(n["node-id"]) for n in dep.nodes() if n["status"] == "online"}

    wait_until(lambda: device_id in online(), 120, 2.0, "the device's SuperNode online")
    out_dir = fleet.work / "runs" / "device"
    config = {"data-path": str(MQ2008_FOLD1.resolve()), "num-server-rounds": 2}
    config.update({"min-available-nodes": 4, "out-dir": str(out_dir)})
    try:
        with PeakPerRound(node.pid, out_dir / "metrics.jsonl") as peaks:
            run_id = dep.run(project, config)
            info = _wait_for_run_output(out_dir, run_id, dep, RUN_TIMEOUT)
    finally:
        node.stop()
    assert info["status"] == "finished:completed", info
    rows = _rows(out_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert device_id in {int(c["node"]) for c in row["clients_train"]}, row
    # README's run trained this teacher: a new out-dir takes it from the shared cache
    assert json.loads((out_dir / "summary.json").read_text())["teacher"]["cached"] is True
    # the device's ClientApp processes ran from the device install
    assert peaks.programs and all("/.device/bin/" in p for p in peaks.programs), peaks.programs
    # r = rows written so far; a ClientApp still exiting after the last row belongs to round 2
    per_round: dict[int, int] = {}
    for r, kib in peaks.peaks.items():
        if r >= 1:
            per_round[min(r, 2)] = max(per_round.get(min(r, 2), 0), round(kib / 1024))
    figures["clientapp_peak_mib_per_round"] = dict(sorted(per_round.items()))
    figures["supernode_rss_mib"] = round(peaks.supernode_kib / 1024)
    assert set(per_round) == {1, 2}, peaks.peaks
    print("\ndevice footprint:", json.dumps(figures, indent=1))
    report = os.environ.get("FEDRANK_FOOTPRINT_OUT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=1))
    # the stopped node leaves the fleet (it deactivates itself), so later runs do not wait
    wait_until(lambda: device_id not in online(), 120, 2.0, "the device's SuperNode offline")


def test_unregistered_key_is_refused(fleet: Fleet):
    rc = fleet.intruder.wait_exit(timeout=120)
    assert rc != 0
    assert "Failed to activate SuperNode" in fleet.intruder.log()
    assert fleet.dep.superlink is not None
    assert "No SuperNode found with the given public key" in fleet.dep.superlink.log()
    assert {int(n["node-id"]) for n in fleet.dep.nodes()} == fleet.registered


def test_insecure_node_is_refused(fleet: Fleet):
    rc = fleet.plain.wait_exit(timeout=120)
    assert rc != 0
    assert "Failed to initialize the connection to the SuperLink" in fleet.plain.log()
    assert {int(n["node-id"]) for n in fleet.dep.nodes()} == fleet.registered


def test_node_without_the_ca_certificate_is_refused(fleet: Fleet):
    rc = fleet.unverified.wait_exit(timeout=120)
    assert rc != 0
    log = fleet.unverified.log()
    assert "Using system certificates for TLS connection" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert {int(n["node-id"]) for n in fleet.dep.nodes()} == fleet.registered


def _listening_hosts(port: int) -> set[str]:
    """The IPv4/IPv6 addresses a TCP socket listens on at ``port`` (from /proc/net)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                if width == 8:
                    hosts.add(".".join(str(b) for b in reversed(raw)))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    hosts.add(str(ipaddress.IPv6Address(words)))
    return hosts


def test_control_api_is_not_on_the_network_address(fleet: Fleet):
    """The SuperLink listens on loopback only; the network address (the gateway) serves the
    Fleet API, through which the nodes joined, and nothing else."""
    dep = fleet.dep
    assert _listening_hosts(dep.port) == {"127.0.0.1"}
    ca = fleet.project / "fleet" / "certs" / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca))
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/docs"):
        reply = httpx.post(f"https://{dep.fleet_address}{path}", verify=context, content=b"")
        assert reply.status_code == 404 and "only the Fleet API" in reply.text, path
    # the flwr CLI pointed at the network address can neither list runs nor register a key
    home = fleet.work / "flwr-home-outsider"
    write_connection(home, "outsider", dep.fleet_address, root_certificates=ca)
    env = flwr_env(home)
    for args in (
        ["ls", "outsider"],
        ["supernode", "register", str(fleet.public_keys[3]), "outsider"],
    ):
        assert flwr_cli(args, env, timeout=120, check=False).returncode != 0, args
    assert {int(n["node-id"]) for n in dep.nodes()} == fleet.registered
    assert dep.fleet_address != dep.address and dep.fleet_address.startswith(HOST)


def test_flwr_stop_ends_a_run(fleet: Fleet):
    dep = fleet.dep
    out = fleet.work / "runs" / "stopped"
    run_id = dep.run(REPO, fleet.config("stopped", **{"num-server-rounds": 50}))
    # wait until the ServerApp runs (it logs round 0; the teacher comes from the cache)
    wait_until(
        lambda: (out / "metrics.jsonl").is_file() and len(_rows(out)) >= 1,
        RUN_TIMEOUT,
        interval=0.5,
        what="the run to stop to start",
    )
    result = dep.stop_run(run_id)
    assert result["success"] is True
    info = dep.wait_run(run_id, 90.0)
    assert info["status"] == "finished:stopped"
    assert len(_rows(out)) < 51


def test_supernode_restart_rejoins_and_gets_its_scores(fleet: Fleet):
    """node2 is stopped after round 1 and started again with the same key: it keeps its node
    id, rejoins and trains in a later round with teacher scores (cached or fetched again)."""
    dep = fleet.dep
    out = fleet.work / "runs" / "restart"
    run_id = dep.run(REPO, fleet.config("restart", **{"num-server-rounds": 3}))
    wait_until(
        lambda: (out / "metrics.jsonl").is_file() and len(_rows(out)) >= 2,
        RUN_TIMEOUT,
        interval=0.5,
        what="round 1 before the restart",
    )
    old = dep.supernodes["node2"]
    old.stop(timeout=10)
    assert not old.alive()
    # `fedrank fleet status` shows the stopped node (and fails), the others alive
    status = _fedrank(["fleet", "status"], dep.env, fleet.project, check=False)
    assert status.returncode == 1, status.stdout
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if "pid" in line}
    assert "STOPPED" in lines["node-2"] and str(old.record.pid) in lines["node-2"]
    assert all("alive" in lines[n] for n in ("superlink", "gateway", "node-1")), lines
    restarted = dep.start_supernode(
        "node2",
        fleet.keys[1],
        node_config=f'data-path="{fleet.device_files[1]}" threads=1',
    )
    restarted.wait_for_log(r"SuperNode ID: \d+", 60)
    info = _wait_for_run_output(out, run_id, dep, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    last = rows[-1]
    assert {int(c["node"]) for c in last["clients_train"]} == set(fleet.node_ids)
    summary = json.loads((out / "summary.json").read_text())
    node2 = fleet.node_ids[1]
    node2_deliveries = [
        d for d in summary["federation"]["score_deliveries"] if d["node_id"] == node2
    ]
    assert node2_deliveries, "node2 never received teacher scores"
    # a new out-dir, the same data and teacher settings: the teacher from the shared cache
    cache = Path(os.environ["FEDRANK_CACHE_DIR"]) / "teachers"
    assert summary["teacher"]["cached"] is True
    assert Path(summary["teacher"]["path"]).parent == cache


def test_trusted_entities_refuse_an_app_built_here(fleet: Fleet):
    """``flower-supernode --trusted-entities`` runs only apps whose signature by a trusted
    Ed25519 key the SuperLink got from Flower Hub; an app started with ``flwr run .`` carries
    none, so such a node refuses it (docs/deployment.md: which apps a SuperNode runs)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    dep = fleet.dep
    operator = ed25519.Ed25519PrivateKey.generate().public_key()
    openssh = operator.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    trusted = fleet.work / "trusted-entities.yaml"
    trusted.write_text(f'fedrank-operator: "{openssh}"\n')
    node_id = dep.register(fleet.public_keys[3])
    fleet.registered.add(node_id)
    node = dep.start_supernode(
        "trusting",
        fleet.keys[3],
        node_config=f'data-path="{fleet.device_files[0]}" threads=1',
        extra_args=["--trusted-entities", str(trusted)],
    )
    wait_until(
        lambda: any(int(n["node-id"]) == node_id and n["status"] == "online" for n in dep.nodes()),
        120,
        interval=2.0,
        what="the trusting SuperNode online",
    )
    run_id = dep.run(REPO, fleet.config("trusting", **{"min-available-nodes": 4}))
    try:
        node.wait_for_log(r"The FAB could not be verified", RUN_TIMEOUT)
    finally:
        dep.stop_run(run_id)
        node.stop(timeout=10)


def test_device_settings_from_node_config():
    from fedrank.client.device import DeviceSettings
    from fedrank.client.trainer import TrainSettings
    from fedrank.common.errors import ConfigError

    s = DeviceSettings.from_node_config(
        {"data-path": "x", "threads": 1, "max-steps": 5, "max-seconds": 2.5, "batch-size": 4}
    )
    assert (s.threads, s.max_steps, s.max_seconds, s.batch_size) == (1, 5, 2.5, 4)
    used = s.train_settings(TrainSettings(max_steps=0, batch_size=16))
    assert used.max_steps == 5 and used.batch_size == 4
    assert s.train_settings(TrainSettings(max_steps=3, batch_size=2)).max_steps == 3
    assert DeviceSettings(memory_mb=1).batch_size_for(64, max_items=100, num_features=46) < 64
    report = s.report(used)
    assert report["device_batch_size"] == 4 and report["device_max_steps"] == 5
    with pytest.raises(ConfigError, match="'max-step'.*did you mean 'max-steps'"):
        DeviceSettings.from_node_config({"data-path": "x", "max-step": 5})
    with pytest.raises(ConfigError, match="'threads' must be an integer >= 0"):
        DeviceSettings.from_node_config({"threads": -1})
    with pytest.raises(ConfigError, match="'max-seconds' must be a number"):
        DeviceSettings.from_node_config({"max-seconds": "soon"})


def test_certs_cover_loopback_and_node_keys_are_ecdsa(tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    paths = make_all(tmp_path, hosts=["fedrank.example"], nodes=2)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert {"localhost", "fedrank.example"} <= set(san.get_values_for_type(x509.DNSName))
    for priv, pub in zip(paths.node_private_keys, paths.node_public_keys, strict=True):
        assert isinstance(load_ssh_private_key(priv.read_bytes(), None), ec.EllipticCurvePrivateKey)
        assert isinstance(load_ssh_public_key(pub.read_bytes()), ec.EllipticCurvePublicKey)
        assert (priv.stat().st_mode & 0o077) == 0  # private keys: owner only
    # running again keeps the CA nodes already trust
    before = paths.ca_cert.read_bytes()
    make_all(tmp_path, nodes=2)
    assert paths.ca_cert.read_bytes() == before
