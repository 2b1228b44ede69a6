"""Run prepared run folders in one start of the simulation runtime (benchmarks use it).

``python -m fedrank.simulations.run_batch DIR...``: each ``DIR/sweep.json`` holds a run's
``config`` (with its ``out-dir``), the simulated ``clients``, the torch ``threads`` and
optionally a ``client-weights`` table. Folders whose ``summary.json`` is complete are skipped,
so the same command resumes; a failure of the runtime itself (Ray timing out at start on a
busy machine) is retried twice. The process ends with ``os._exit``: after a crash of the
runtime the ServerApp thread may still wait for nodes and must not keep the process alive.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from fedrank.server.client_weights import policy_config
from fedrank.simulations.simulate import run_federations

__all__ = ["main", "summary_complete"]


def summary_complete(run_dir: Path) -> bool:
    """True when ``run_dir/summary.json`` is a finished run's summary."""
    try:
        data = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "student" in data


def _runtime_crashed(err: BaseException) -> bool:
    """True for a failure of the simulation runtime itself, worth one more try."""
    return isinstance(err, RuntimeError) and "Ending simulation" in str(err)


def main(argv: Sequence[str] | None = None, attempts: int = 3) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    code = 1
    try:
        dirs = [Path(a) for a in args if a != "--verbose"]
        metas = [json.loads((d / "sweep.json").read_text(encoding="utf-8")) for d in dirs]
        for meta in metas:
            if meta.get("client-weights"):
                policy_config(meta["client-weights"])  # checks and registers the policy
        threads = int(metas[0].get("threads", 1))
        torch.set_num_threads(threads)
        for attempt in range(1, attempts + 1):
            todo = [
                m["config"] for d, m in zip(dirs, metas, strict=True) if not summary_complete(d)
            ]
            if not todo:
                code = 0
                break
            try:
                run_federations(
                    todo, num_clients=int(metas[0]["clients"]), verbose=verbose, num_cpus=threads
                )
                code = 0
                break
            except Exception as err:  # noqa: BLE001 - reported in the log, decided below
                traceback.print_exc()
                if attempt == attempts or not _runtime_crashed(err):
                    break
                print(f"simulation runtime failed (attempt {attempt}); retrying", flush=True)
                time.sleep(5.0 * attempt)
    except BaseException:  # noqa: BLE001 - the log gets the traceback, the exit code says it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
