"""A sweep worker: one start of Flower's simulation runtime runs many trials of a study.

``python -m fedrank.simulations.sweep_app --storage URL --study NAME --out DIR`` (started by
``fedrank sweep``; see :mod:`fedrank.simulations.sweep`) opens the study, starts the
simulation runtime once with the scenario's simulated clients and runs the ServerApp of
:func:`make_sweep_app`: it asks the study for the next trial, runs one federation per seed on
the same nodes (:func:`fedrank.server.server_app.run_server`), tells the study the mean and
spread, and repeats until the study has no trial left for it or ``--max-trials`` is reached.

A trial's runs write into ``DIR/runs/<hash>`` (the hash of the run's configuration, so a
retried trial continues the run from its last round checkpoint, and a finished run is read,
not run again); the runs share the teacher cache ``DIR/teacher``. A point the configuration
rejects is pruned with the reason; a fedrank error (a run that stopped: too few replies, bad
data) fails the trial with its error and the worker goes on; anything else (the runtime
itself failing, an interrupt) puts the trial back in the queue and ends the worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from fedrank.client.client_app import app as client_app
from fedrank.common.atomic_io import atomic_write_json
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.server.server_app import run_server
from fedrank.simulations.runtime import add_ray_arguments, ray_options, start_simulation
from fedrank.simulations.scenarios import Scenario
from fedrank.simulations.study_store import (
    SweepSpec,
    open_storage,
    open_study,
    seed_spread,
    worker_name,
)

__all__ = [
    "TrialRunner",
    "main",
    "make_sweep_app",
    "next_step",
    "release_trials",
    "retried_numbers",
    "run_hash",
]

# keys that do not change what a run computes, so they are not part of its hash
UNHASHED = ("out-dir", "teacher-cache-dir", "resume")
POLL_SECONDS = 2.0  # how often a worker with nothing to start looks again


def run_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits identifying what a run computes (its configuration minus output paths)."""
    body = {k: v for k, v in sorted(config.items()) if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def point_label(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "base"


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` (None if it has not finished)."""
    try:
        data = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "student" in data else None


@dataclass
class TrialRunner:
    """The objective: one trial = the point's federation for each seed, on ``grid``."""

    spec: SweepSpec
    scenario: Scenario
    out_dir: Path
    worker: str
    grid: Grid | None = None

    def configs(self, point: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The run configuration of each seed (ConfigError: the point is not valid)."""
        teacher = str(self.out_dir / "teacher")
        out = []
        for seed in self.spec.seeds:
            config = self.scenario.run_config(seed, {**self.spec.overrides, **dict(point)})
            run_dir = self.out_dir / "runs" / run_hash(config)
            config["out-dir"] = str(run_dir)
            config["teacher-cache-dir"] = config.get("teacher-cache-dir") or teacher
            config["resume"] = True  # a retried trial continues from the last checkpoint
            out.append(config)
        return out

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", self.worker)
        # a trial put back by an interrupted worker comes with that worker's attributes
        trial.set_user_attr("error", None)
        trial.set_user_attr("released", False)
        point = self.spec.suggest(trial)
        try:
            configs = self.configs(point)
        except ConfigError as err:
            trial.set_user_attr("skipped", str(err))
            raise optuna.TrialPruned(str(err)) from None
        values: dict[str, float] = {}
        runs: list[str] = []
        for seed, config in zip(self.spec.seeds, configs, strict=True):
            run_dir = Path(config["out-dir"])
            runs.append(run_dir.name)
            trial.set_user_attr("runs", runs)
            summary = _finished_summary(run_dir)
            if summary is None:
                self._write_meta(run_dir, trial.number, point, seed, config)
                try:
                    assert self.grid is not None, "the runner needs the ServerApp's grid"
                    summary = run_server(self.grid, config)
                except FedrankError as err:
                    trial.set_user_attr("error", f"seed {seed}: {err}")
                    raise
            value = summary["student"]["metrics"].get(self.spec.metric)
            if not isinstance(value, (int, float)):
                error = f"seed {seed}: the run's summary has no {self.spec.metric!r}"
                trial.set_user_attr("error", error)
                raise FedrankError(error)
            values[str(seed)] = float(value)
            trial.set_user_attr("values", values)
        mean, std = seed_spread(list(values.values()))
        trial.set_user_attr("std", std)
        return mean

    def _write_meta(
        self, run_dir: Path, number: int, point: Mapping[str, Any], seed: int, config: dict
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / "sweep.json",
            {
                "label": f"{point_label(point)} seed={seed}",
                "params": dict(point),
                "seed": seed,
                "trial": number,
                "worker": self.worker,
                "clients": self.scenario.clients,
                "scenario": self.scenario.name,
                "client-weights": self.scenario.client_weights,
                "config": config,
            },
        )


# ---- what a worker does next ----------------------------------------------------------------
def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were queued again (their copy stands for them)."""
    out: set[int] = set()
    for trial in trials:
        out.update(trial.system_attrs.get("retry_history", []))
    return out


def next_step(study: optuna.Study, spec: SweepSpec) -> str:
    """``run`` (a trial is waiting or not yet given out), ``wait`` (only trials running
    elsewhere are left; one may come back if its worker dies) or ``done``."""
    fail_stale_trials(study)  # RDB storage: trials of dead workers fail and are queued again
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    retried = retried_numbers(trials)
    finished = [t for t in trials if t.state.is_finished() and t.number not in retried]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if spec.mode == "grid":
        total = len(spec.space().grid())
        taken = {t.system_attrs.get("grid_id") for t in finished + running}
        if len(taken - {None}) < total and len(finished) + len(running) < spec.trials:
            return "run"
    elif len(finished) + len(running) < spec.trials:
        return "run"
    return "wait" if running else "done"


def release_trials(study: optuna.Study, worker: str, reason: str) -> list[int]:
    """Fail ``worker``'s running trials with ``reason`` and queue each again (same point, same
    grid cell), so an interrupted or crashed worker's trial is run by the next worker."""
    released = []
    retry = RetryHeartbeatStaleTrialCallback()
    storage = study._storage  # noqa: SLF001 - Optuna's own callbacks take the same route
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") != worker:
            continue
        storage.set_trial_user_attr(trial._trial_id, "error", reason)  # noqa: SLF001
        storage.set_trial_user_attr(trial._trial_id, "released", True)  # noqa: SLF001
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry(study, study.get_trials(deepcopy=False)[trial.number])
        released.append(trial.number)
    return released


def make_sweep_app(
    study: optuna.Study,
    runner: TrialRunner,
    max_trials: int = 0,
    stop: threading.Event | None = None,
) -> tuple[ServerApp, dict[str, int]]:
    """The ServerApp that runs the study's trials (at most ``max_trials``; 0: no limit; none
    started once ``stop`` is set) and a counter of the trials it ran."""
    app = ServerApp()
    count = {"trials": 0}
    stop = stop or threading.Event()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        runner.grid = grid
        while (not max_trials or count["trials"] < max_trials) and not stop.is_set():
            step = next_step(study, runner.spec)
            if step == "done":
                break
            if step == "wait":
                time.sleep(POLL_SECONDS)
                continue
            study.optimize(runner, n_trials=1, catch=(FedrankError,))
            count["trials"] += 1

    return app, count


# ---- the worker process -----------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrank.simulations.sweep_app")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-trials", type=int, default=0, help="0: until the study is done")
    parser.add_argument("--verbose", action="store_true")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    worker = worker_name()
    study, spec = open_study(open_storage(args.storage), args.study, None, worker)
    scenario = spec.load_scenario()
    torch.set_num_threads(max(1, args.threads))
    runner = TrialRunner(spec, scenario, Path(args.out), worker)
    stop = threading.Event()
    app, count = make_sweep_app(study, runner, args.max_trials, stop)

    def interrupted(signum: int, frame: object) -> None:
        # put the trials back before anything else: once the runtime stops, Ray may end this
        # process from one of its own threads before the `except` below runs
        if not stop.is_set():
            stop.set()
            release_trials(study, worker, "interrupted")
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    code = 0
    try:
        start_simulation(
            app,
            client_app,
            scenario.clients,
            ray=ray_options(args, num_cpus=max(1, args.threads)),
            verbose=args.verbose,
        )
    except KeyboardInterrupt:
        code = 130
        # again: a trial the ServerApp thread had just started while the handler ran
        release_trials(study, worker, "interrupted")
    except BaseException:  # noqa: BLE001 - the runtime failed: the log gets it, the trial goes back
        traceback.print_exc()
        code = 1
        release_trials(study, worker, "the simulation runtime failed; see the worker's log")
    print(f"worker {worker}: {count['trials']} trial(s)", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # after a failure the ServerApp thread may still wait for nodes: it must not keep the
    # process (and the sweep) alive
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
