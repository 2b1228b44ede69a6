"""`fedrank gateway`: its options fail in one line; the deployment test runs it for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrank.cli import main as fedrank
from fedrank.common.errors import ConfigError
from fedrank.server.certs import make_all
from fedrank.server.fleet_gateway import parse_address


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9093", "--superlink") == ("127.0.0.1", 9093)
    assert parse_address("[::1]:9093", "--superlink") == ("::1", 9093)
    for bad in ("9093", "host:", "host:0", "host:70000", ":9093"):
        with pytest.raises(ConfigError, match="--listen must be HOST:PORT"):
            parse_address(bad, "--listen")


def test_superlink_must_be_on_loopback(tmp_path: Path, capsys) -> None:
    make_all(tmp_path, nodes=0)
    rc = fedrank(["gateway", "--certs", str(tmp_path), "--superlink", "10.1.2.3:9093"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "must listen on loopback only" in err
    (tmp_path / "server.key").unlink()
    assert fedrank(["gateway", "--certs", str(tmp_path)]) == 2
    assert "server.key is missing" in capsys.readouterr().err
