"""`fedrank certs`: keys private from their creation, the export signing pair, and the
hardened deployment commands it prints (the ones docs/deployment.md gives)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from fedrank.cli import main as fedrank
from fedrank.common.signing import load_private_key, load_public_key, sign_text, verify_text
from fedrank.server.certs import make_all
from fedrank.server.deploy_commands import (
    gateway_command,
    render,
    superlink_command,
    supernode_command,
)

ROOT = Path(__file__).resolve().parents[1]


def test_private_keys_are_never_readable_by_others(tmp_path: Path, monkeypatch) -> None:
    modes: dict[str, int] = {}
    original = Path.write_bytes

    def spy(self: Path, data: bytes) -> int:
        if b"PRIVATE KEY" in data:
            modes[self.name] = stat.S_IMODE(self.stat().st_mode)
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    paths = make_all(tmp_path, nodes=2)
    assert set(modes.values()) == {0o600}, modes  # 0600 while the key bytes are written
    assert len(modes) == 5  # CA, SuperLink, two nodes, export signing
    for key in [paths.ca_key, paths.server_key, paths.signing_key, *paths.node_private_keys]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_signing_pair_signs_and_verifies(tmp_path: Path) -> None:
    paths = make_all(tmp_path, nodes=0)
    assert paths.signing_key is not None and paths.signing_public_key is not None
    private, public = load_private_key(paths.signing_key), load_public_key(paths.signing_public_key)
    signature = sign_text(private, '{"a": 1}')
    assert verify_text(public, '{"a": 1}', signature)
    assert not verify_text(public, '{"a": 2}', signature)
    assert not verify_text(public, '{"a": 1}', "not base64!")
    # node public keys (OpenSSH) load as verification keys too
    assert load_public_key(make_all(tmp_path / "n", nodes=1).node_public_keys[0])


def test_certs_prints_the_hardened_commands(tmp_path: Path, capsys) -> None:
    out = tmp_path / "certs"
    assert fedrank(["certs", "--out", str(out), "--nodes", "1", "--host", "fl.example"]) == 0
    text = capsys.readouterr().out
    assert render(superlink_command(str(out))) in text
    assert render(gateway_command(str(out))) in text
    assert "--host 127.0.0.1" in text and "--superlink fl.example:9092" in text
    assert "0.0.0.0:9093" not in text


def _commands_in(markdown: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return "\n".join(blocks)


def test_docs_print_the_hardened_commands() -> None:
    """docs/deployment.md gives the commands `fedrank fleet up` and the deployment test run
    (README starts them with `fedrank fleet up`)."""
    node = supernode_command(
        "certs/node-1",
        'data-path="/data/device-1/letor.txt" threads=1 max-steps=50 batch-size=8',
    )
    for doc in (ROOT / "docs" / "deployment.md",):
        code = _commands_in(doc.read_text(encoding="utf-8"))
        for command in (superlink_command(), gateway_command(), node):
            assert render(command) in code, (doc.name, command[0])
        # the SuperLink is never bound to the network; the Control API stays on loopback
        assert not re.search(r"flower-superlink[^\n]*(\\\n[^\n]*)*--host 0\.0\.0\.0", code)
