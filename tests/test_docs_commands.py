"""The commands of docs/deployment.md and README's deployment section hold.

Every command line in the deployment guide's code blocks belongs to a family that a test or
``fedrank fleet up`` runs (the table below names which); the ones that need no servers run
here exactly as printed: ``fedrank certs`` and ``fedrank fleet connection`` on a fresh
``FLWR_HOME``, twice. Placeholder paths are the same everywhere.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "docs" / "deployment.md"
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# command family (regex on the first line of a command) -> what runs it
RUN_BY = {
    r"python3 -m venv \.device$": "test_deployment (README device block)",
    r"\.device/bin/pip install ": "test_deployment (README device block)",
    r"export FLWR_": "every deployment test's environment",
    r"fedrank fleet (up|status|down)\b": "test_deployment (README blocks)",
    r"flwr run \. fedrank --stream ": "test_deployment (README server block)",
    r"fedrank certs --out certs ": "this module",
    r"fedrank fleet connection fedrank ": "this module; fedrank fleet up",
    r"flower-superlink \\$": "fedrank fleet up (deploy_commands; test_certs: as printed)",
    r"fedrank gateway \\$": "fedrank fleet up (deploy_commands; test_certs: as printed)",
    r"flower-supernode \\$": "fedrank fleet up (deploy_commands; test_certs: as printed)",
    r"flwr supernode (register|list) ": "fedrank fleet up, test_deployment",
    r"flwr (ls|log|stop) ": "test_deployment",
    r"flwr run \. fedrank --run-config ": "test_deployment",
    r"fedrank export --run ": "test_deployment (README server block)",
    r"fedrank report runs/fleet": "test_deployment (README server block)",
    r"fedrank score --model ": "test_deployment (README device block), test_export",
    r"ssh-keygen -t ecdsa -b 384 ": "test_deployment (DEVICE_KEYGEN)",
    r"flower-superlink --insecure ": "test_deployment_node_loss",
    r"flower-supernode --insecure ": "test_deployment_node_loss",
}
PLACEHOLDERS = {"/data/full/Fold1", "/data/device-1/letor.txt", "/data/device-2/letor.txt"}


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    out, current = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " \\"
            continue
        out.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return out


def _first_line(block: str) -> list[str]:
    lines = [x.strip() for x in block.splitlines() if x.strip() and not x.strip().startswith("#")]
    starts, joined = [], False
    for line in lines:
        if not joined:
            starts.append(line)
        joined = line.endswith("\\")
    return starts


def test_every_documented_command_is_run_by_a_test() -> None:
    unknown = []
    for block in _blocks(DEPLOYMENT):
        for line in _first_line(block):
            if not any(re.match(p, line) for p in RUN_BY):
                unknown.append(line)
    assert not unknown, f"commands in docs/deployment.md that no test runs: {unknown}"


def test_readme_fleet_blocks_are_the_docs_commands() -> None:
    text = README.read_text(encoding="utf-8")
    for tag in ("server", "device", "down"):
        assert f"<!-- readme-fleet: {tag} -->\n```bash" in text, tag
    readme = {c for b in _blocks(README) for c in _commands(b)}
    docs = [c for b in _blocks(DEPLOYMENT) for c in _commands(b)]
    shared = [c for c in docs if c.startswith(("fedrank fleet up", ".device/", "python3 -m venv"))]
    assert len(shared) >= 4 and all(c in readme for c in shared), shared


def test_placeholders_are_consistent() -> None:
    for doc in (DEPLOYMENT, README):
        text = doc.read_text(encoding="utf-8")
        data = set(re.findall(r"(?<![\w.])/data/[\w./-]+", text))
        assert data <= PLACEHOLDERS, (doc.name, data - PLACEHOLDERS)
        assert set(re.findall(r"/srv/[\w./-]+", text)) <= {"/srv/fedrank/run1"}, doc.name
    assert "/absolute/path/to" not in README.read_text(encoding="utf-8")


def _docs_command(prefix: str) -> str:
    found = [c for b in _blocks(DEPLOYMENT) for c in _commands(b) if c.startswith(prefix)]
    assert found, prefix
    return found[0]


@pytest.mark.parametrize("fresh", [True, False])
def test_certs_and_connection_commands_as_printed(tmp_path: Path, fresh: bool) -> None:
    """`fedrank certs` and `fedrank fleet connection` from the docs, on a fresh FLWR_HOME
    and on one where Flower already wrote its own config.toml; each twice."""
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def run(command: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    if not fresh:
        run("flwr config list")  # Flower writes its default file with its own [superlink]
        assert (home / "config.toml").is_file()
    run(_docs_command("fedrank certs --out certs"))
    connection = _docs_command("fedrank fleet connection fedrank")
    for _ in range(2):
        run(connection)
    text = (home / "config.toml").read_text()
    config = tomllib.loads(text)["superlink"]
    assert text.count("[superlink]") == 1 and text.count("[superlink.fedrank]") == 1
    assert config["fedrank"]["address"] == "127.0.0.1:9093"
    assert config["fedrank"]["root-certificates"] == str(tmp_path / "certs" / "ca.crt")
    assert "fedrank" in run("flwr config list").stdout
