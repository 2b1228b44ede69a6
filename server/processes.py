"""Long-running processes started in the background, tracked by PID file, stopped exactly.

:func:`start` runs a command detached (its own session, stdin closed, output appended to a
log file) and returns a :class:`ProcessRecord`: PID, start time (clock ticks since boot, from
``/proc/PID/stat``) and argv. :func:`is_ours` holds only while that PID still runs that argv
and started at that time, so a stale PID file (the process ended and the PID was reused) never
matches a stranger. :func:`stop` stops the process and everything it started (its process
group and every descendant, collected from ``/proc`` before the first signal): SIGTERM, then
SIGKILL for whatever is left after the grace period.

Linux only (``/proc``), like the Flower deployment it manages.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessRecord",
    "alive",
    "descendants",
    "is_ours",
    "process_stat",
    "log_tail",
    "read_pid_file",
    "send_signal",
    "start",
    "stop",
]


@dataclass(frozen=True)
class ProcessRecord:
    """One started process: what the PID file and the fleet's state remember about it."""

    name: str
    pid: int
    start_ticks: int
    argv: tuple[str, ...]
    log: str
    address: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["argv"] = list(self.argv)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_ticks=int(data["start_ticks"]),
            argv=tuple(str(a) for a in data["argv"]),
            log=str(data["log"]),
            address=str(data.get("address", "")),
        )


def process_stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a running ``pid``; None when it is gone or a
    zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()  # fields after "(comm)": state ppid ...
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[1]), int(rest[19])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    cwd: Path,
    address: str = "",
) -> ProcessRecord:
    """Start ``argv`` detached from this process, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=str(cwd),
            start_new_session=True,
        )
    info = process_stat(popen.pid)
    # a process that died at once still gets a record: status and down report it as stopped
    ticks = info[1] if info is not None else -1
    popen.returncode = 0  # detached on purpose: Popen's destructor must not warn about it
    return ProcessRecord(name, popen.pid, ticks, tuple(argv), str(log), address)


def is_ours(record: ProcessRecord) -> bool:
    """True while ``record.pid`` is the process that was started: same start time, and its
    command line ends with the recorded arguments (a Python entry point shows the interpreter
    first)."""
    info = process_stat(record.pid)
    if info is None or info[1] != record.start_ticks:
        return False
    cmd = _cmdline(record.pid)
    args = list(record.argv)
    if len(cmd) < len(args) or cmd[len(cmd) - len(args) + 1 :] != args[1:]:
        return False
    program = os.path.basename(args[0])
    return any(os.path.basename(part) == program for part in cmd[: len(cmd) - len(args) + 1])


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every living descendant of ``pid`` as (PID, start ticks), children first."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = process_stat(int(entry.name))
            if info is not None:
                children.setdefault(info[0], []).append((int(entry.name), info[1]))
    out: list[tuple[int, int]] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            out.append(child)
            queue.append(child[0])
    return out


def _group(pgid: int) -> list[tuple[int, int]]:
    """Every living process of process group ``pgid`` as (PID, start ticks): what a process
    started in its own session left behind, also after being re-parented."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        rest = raw[raw.rindex(")") + 2 :].split()
        if rest[0] not in ("Z", "X") and int(rest[2]) == pgid:
            found.append((int(entry.name), int(rest[19])))
    return found


def alive(pid: int, ticks: int) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``ticks`` (not a
    later process that reuses the number)."""
    info = process_stat(pid)
    return info is not None and info[1] == ticks


def send_signal(pid: int, sig: int) -> None:
    """``os.kill`` that ignores a process already gone or not ours to signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop(record: ProcessRecord, timeout: float = 10.0) -> str:
    """Stop the recorded process and every process it started. Returns what happened:
    ``"stopped"``, ``"killed"`` (SIGKILL after ``timeout`` s) or ``"not running"`` (the PID is
    gone or belongs to another process now, which is left alone).

    The process itself gets SIGTERM first and up to ``timeout`` s to shut down cleanly (a
    SuperNode deactivates itself at the SuperLink, which it cannot do once its helpers are
    gone); then whatever it started and left behind gets SIGTERM, and SIGKILL 3 s later."""
    if not is_ours(record):
        return "not running"
    tree = [(record.pid, record.start_ticks), *descendants(record.pid)]
    send_signal(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(record.pid, record.start_ticks):
        time.sleep(0.1)
    killed = alive(record.pid, record.start_ticks)
    tree += [d for d in descendants(record.pid) + _group(record.pid) if d not in tree]
    for pid, ticks in tree[1:]:
        if alive(pid, ticks):
            send_signal(pid, signal.SIGTERM)
    grace = time.monotonic() + 3.0
    while time.monotonic() < grace and any(alive(p, t) for p, t in tree):
        time.sleep(0.1)
    for pid, ticks in tree:
        if alive(pid, ticks):
            send_signal(pid, signal.SIGKILL)
    grace = time.monotonic() + 5.0
    while time.monotonic() < grace and any(alive(p, t) for p, t in tree):
        time.sleep(0.05)
    return "killed" if killed else "stopped"


def read_pid_file(path: Path) -> int | None:
    """The PID in ``path``; None when the file is missing or holds no PID."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_tail(path: str | Path, lines: int = 3, max_bytes: int = 16384) -> list[str]:
    """The last ``lines`` non-empty lines of a log file (read from its last ``max_bytes``),
    without terminal colour codes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    text = _ANSI.sub("", text)
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
