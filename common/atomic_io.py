"""File writes that never leave half a file behind and never replace what is not a file.

- :func:`atomic_path` / :func:`atomic_write_bytes`: a reader sees the old file or the new one,
  never half of one. The data goes to a temporary file in the target's real folder, which then
  replaces the target with one ``rename``. A symlink is followed (its target is replaced, the
  link stays); an existing target keeps its permission bits; ``mode`` (e.g. ``0o600`` for
  private keys) is the file's mode from its creation on, never set after the data is in it.
  A target that exists and is not a regular file (a device, a FIFO, a folder) is refused:
  renaming over it would replace the device node itself.
- :func:`write_output`: what a command writes to a user's ``--out``: ``-`` is standard output;
  FIFOs, character devices and anything under ``/dev`` or ``/proc`` (``/dev/stdout``,
  ``/dev/null``, ``/proc/self/fd/1``) are written in place, as a shell redirect would; regular
  files (or symlinks to them) atomically as above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrank.common.errors import CheckpointError, OutputError

__all__ = [
    "append_jsonl",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_default",
    "read_format_json",
    "sha256_file",
    "resolve_output",
    "write_output",
]

STDOUT = "-"
# folders whose entries are device nodes or kernel magic links: written in place, never renamed
_IN_PLACE_ROOTS = ("/dev", "/proc")
_MAX_LINKS = 40  # as the kernel's limit on nested symlinks


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _under_in_place_root(path: Path) -> bool:
    return any(path == Path(r) or Path(r) in path.parents for r in _IN_PLACE_ROOTS)


def resolve_output(path: str | os.PathLike[str]) -> tuple[Path, bool]:
    """Where a write to ``path`` lands and whether it must go in place (no rename).

    Symlinks are followed hop by hop, so a link into ``/dev`` or ``/proc`` (whose entries are
    devices and magic links) is recognised before the kernel's answer for it is used. Returns
    ``(target, in_place)``; ``in_place`` is True for FIFOs, character devices and anything
    under ``/dev`` or ``/proc``. Raises :class:`OutputError` for a folder, a block device, a
    socket or a symlink loop.
    """
    current = Path(os.path.abspath(os.fspath(path)))
    for _ in range(_MAX_LINKS):
        current = Path(os.path.realpath(current.parent)) / current.name
        if _under_in_place_root(current):
            return current, True
        if not current.is_symlink():
            break
        link = Path(os.readlink(current))
        current = Path(os.path.normpath(link if link.is_absolute() else current.parent / link))
    else:
        raise OutputError(f"{path}: too many levels of symbolic links")
    try:
        mode = os.stat(current).st_mode
    except FileNotFoundError:
        return current, False
    if stat.S_ISREG(mode):
        return current, False
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return current, True
    raise OutputError(f"{path} is {_kind(mode)}: cannot write a file there")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``'s real target; on success it replaces the target.

    ``mode``: the new file's permission bits from its creation on (default: those of the file
    it replaces, else what ``open()`` would give, 0666 minus the umask). On an exception the
    temporary file is removed and the target is left untouched. Raises :class:`OutputError`
    when the target exists and is not a regular file.
    """
    target, in_place = resolve_output(path)
    if in_place:
        raise OutputError(
            f"{path} is a device, FIFO or kernel file ({target}): it cannot be replaced by a "
            "file; give the path of a regular file"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
    # mkstemp creates the file 0600 (O_EXCL); widening it is safe, it is still empty
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        yield tmp
        with open(tmp, "rb") as fh:  # flush file content to disk before the rename
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def write_output(path: str | os.PathLike[str], data: bytes | str) -> str:
    """Write a command's output to ``path``: ``-`` is stdout, devices and FIFOs are written in
    place, regular files atomically. Returns how it was written (``stdout``, ``in place``,
    ``atomically``) for the command's note."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if os.fspath(path) == STDOUT:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        return "stdout"
    target, in_place = resolve_output(path)
    if not in_place:
        atomic_write_bytes(target, raw)
        return "atomically"
    # the path as given: for /dev/stdout or /proc/self/fd/N the kernel resolves it for us
    try:
        with open(path, "wb") as fh:
            fh.write(raw)
    except BrokenPipeError:
        pass
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror or err}") from None
    return "in place"


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON object as one line (a single write, so lines never interleave)."""
    line = json.dumps(obj, sort_keys=True, default=json_default) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for what results contain: numpy scalars/arrays, paths."""
    # numpy scalars and arrays, Paths: the types our results actually contain
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_format_json(path: str | os.PathLike[str], fmt: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` that fedrank wrote with ``"format": fmt``; a
    CheckpointError naming ``what`` and the file when it is missing, not JSON or another
    format."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{what} {file} does not exist")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} {file} is corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{what} {file} has format {found!r}, expected {fmt!r}")
    return meta


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
