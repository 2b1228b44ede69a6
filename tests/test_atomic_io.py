"""Atomic writes and command outputs: never half a file, never a rename over a device or link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedrank.common.atomic_io import atomic_path, atomic_write_bytes, resolve_output, write_output
from fedrank.common.errors import OutputError


def test_atomic_write_replaces_a_regular_file_and_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    fresh = tmp_path / "sub" / "b.txt"  # missing folders are made; mode as open() gives it
    atomic_write_bytes(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.rglob(".*.tmp"))


def test_mode_is_set_before_any_byte_is_written(tmp_path: Path, monkeypatch) -> None:
    """A private key's temp file is 0600 from its creation, never 0644 while it holds data."""
    seen: list[int] = []
    original = Path.write_bytes

    def spy(self: Path, data: bytes) -> int:
        seen.append(stat.S_IMODE(self.stat().st_mode))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    atomic_write_bytes(tmp_path / "key", b"secret", mode=0o600)
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_atomic_path_follows_symlinks_and_refuses_special_files(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made" / "later.txt")
    atomic_write_bytes(dangling, b"made")
    assert (tmp_path / "made" / "later.txt").read_bytes() == b"made" and dangling.is_symlink()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="cannot be replaced"), atomic_path(fifo):
        pass
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="too many levels"):
        atomic_write_bytes(loop, b"x")
    assert not list(tmp_path.glob(".*.tmp"))


def test_resolve_output_treats_dev_and_proc_as_in_place(tmp_path: Path) -> None:
    assert resolve_output("/dev/null") == (Path("/dev/null"), True)
    assert resolve_output("/dev/stdout")[1] is True
    link = tmp_path / "out"
    link.symlink_to("/dev/null")
    assert resolve_output(link) == (Path("/dev/null"), True)
    assert resolve_output(tmp_path / "plain.txt") == (tmp_path / "plain.txt", False)


def test_write_output_writes_dev_null_in_place(tmp_path: Path) -> None:
    """The measured failure: `--out /dev/null` as root renamed a file over the device."""
    assert resolve_output("/dev/null")[1], "never write below unless it goes in place"
    before = os.stat("/dev/null")
    assert write_output("/dev/null", b"discarded") == "in place"
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (
        before.st_ino,
        before.st_rdev,
    )
    assert write_output(tmp_path / "r.txt", "text") == "atomically"
    assert (tmp_path / "r.txt").read_text() == "text"
