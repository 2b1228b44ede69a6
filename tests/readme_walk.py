"""Walking README's deployment section exactly as printed, and measuring a device install.

README's three ``readme-fleet`` code blocks (``server``, ``device``, ``down``) run in bash in
a copy of the project's files (what a clone holds) beside a link to the shared data; the copy's
``.venv`` links to this project's installed environment, so ``bash scripts/setup.sh`` finds it
installed and keeps it. The blocks use README's fixed ports (9092-9096), so whoever runs them
holds :func:`ports_lock`.

The device measurements: :func:`loaded` runs code in a Python and reports the top-level
modules it loaded and its peak resident memory; :class:`PeakPerRound` watches the
``flwr-clientapp`` processes a SuperNode starts and records their peak resident memory per
round of a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedrank.server.processes import descendants

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
PORTS_LOCK = Path("/tmp/fedrank-fleet-ports.lock")


def readme_block(tag: str) -> str:
    """The bash code of README's ``<!-- readme-fleet: TAG -->`` block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-fleet: {tag} -->\n```bash\n(.*?)```", text, flags=re.S)
    assert match, f"README has no readme-fleet block {tag!r}"
    return match.group(1)


def readme_env() -> dict[str, str]:
    """A user's shell: this environment without Flower settings or an active venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "VIRTUAL_ENV"))}
    env.update({"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def activate_line() -> str:
    """README's environment lines (activate the venv, export FLWR_HOME and the quiet flags),
    for commands run after the server block in a new shell."""
    export = next(
        line for line in readme_block("server").splitlines() if line.startswith("export FLWR_HOME")
    )
    return f". .venv/bin/activate\n{export}\n"


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run ``script`` with ``bash -e`` (a failing command stops it); returns its output."""
    proc = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc={proc.returncode}:\n{out[-6000:]}"
    return out


def clone(dest: Path) -> Path:
    """The project's files as a clone holds them (tracked and not ignored) in
    ``dest/fedrank``, beside a link to the shared data, with this project's installed
    environment linked in as ``.venv``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    project = dest / "fedrank"
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    (project / ".venv").symlink_to(REPO / ".venv")
    (dest / "shared").symlink_to(SHARED.resolve())
    return project


@contextlib.contextmanager
def ports_lock() -> Iterator[None]:
    """Exclusive use of README's fixed ports while the block runs."""
    with open(PORTS_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM) in KiB; 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.M)
    return int(match.group(1)) if match else 0


class PeakPerRound:
    """Polls the ClientApp processes a SuperNode starts; the peak resident memory (VmHWM)
    of any of them while round r runs (r = rows of metrics.jsonl so far)."""

    def __init__(self, supernode_pid: int, metrics: Path) -> None:
        self.pid, self.metrics = supernode_pid, metrics
        self.peaks: dict[int, int] = {}
        self.supernode_kib = 0
        self.programs: set[str] = set()  # the ClientApp's program paths
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _round(self) -> int:
        try:
            return sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self._round()
            self.supernode_kib = max(self.supernode_kib, status_kib(self.pid, "VmRSS"))
            for child, _ in descendants(self.pid):
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if b"flwr-clientapp" in cmd:
                    self.programs.add(" ".join(a.decode() for a in cmd.split(b"\0")[:2]))
                    self.peaks[r] = max(self.peaks.get(r, 0), status_kib(child, "VmHWM"))
            time.sleep(0.1)

    def __enter__(self) -> PeakPerRound:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def loaded(python: Path, code: str, cwd: Path) -> dict:
    """Run ``code`` in ``python``; returns {'modules': top-level modules loaded (and
    fedrank's layers as ``fedrank.<layer>``), 'peak_mib'}."""
    probe = (
        code
        + "\nimport json, sys\nstatus = open('/proc/self/status').read()\n"
        + "hwm = int(status.split('VmHWM:')[1].split()[0]) // 1024\n"
        + "print('LOADED ' + json.dumps({'modules': sorted({m.split('.')[0] for m in "
        + "sys.modules} | {'.'.join(m.split('.')[:2]) for m in sys.modules "
        + "if m.startswith('fedrank.')}), 'peak_mib': hwm}))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOADED "))
    return dict(json.loads(line[len("LOADED ") :]))
