"""``fedrank sweep``: tune a scenario's loss weights; an Optuna study that workers share.

    fedrank sweep SCENARIO --grid                 # every point of the scenario's [sweep.space]
    fedrank sweep SCENARIO --random 20            # 20 random points
    fedrank sweep SCENARIO --tpe 30               # 30 trials of Optuna's TPE sampler
    fedrank sweep SCENARIO --grid --workers 2     # two worker processes on this machine
    fedrank sweep SCENARIO --grid --storage URL --study NAME   # the same on every machine

A sweep is an Optuna study (:mod:`fedrank.simulations.study_store`): by default in
``OUT/study.db`` (SQLite) under the scenario's name; ``--storage`` takes any SQLAlchemy URL
(``postgresql://...``) or ``journal:PATH`` (Optuna's journal file), and the same command on
another machine with the same storage and ``--study`` joins the study: its workers take the
trials nobody has taken. ``--workers N`` starts N worker processes here; each starts Flower's
simulation runtime once and runs trial after trial in it (:mod:`fedrank.simulations.sweep_app`),
with the machine's cores shared between them. Progress lines come as trials start and finish.

A trial is one point of the search space; the scenario's seeds (``--seeds``) are its repeats,
and its value is the mean of the metric over them (the spread is reported next to it). An
interrupted sweep (Ctrl-C) puts its running trials back; the same command resumes the study
without running a finished trial again (a trial of a worker killed outright is failed by its
missing heartbeat after a few seconds and queued again). A failed trial keeps its error.

At the end ``OUT/trials.csv``, ``OUT/trials.md`` and ``OUT/trials.png`` show every trial of the
study, ``OUT/report.*`` and its plots the runs of this machine
(:mod:`fedrank.simulations.report`), and the best point is printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from fedrank.common.atomic_io import atomic_path, atomic_write_text
from fedrank.common.errors import ConfigError
from fedrank.simulations.report import find_runs, to_csv, to_markdown, write_report
from fedrank.simulations.runtime import add_ray_arguments, ray_options
from fedrank.simulations.scenarios import Scenario, list_scenarios, load_scenario
from fedrank.simulations.simulate import _parse_set
from fedrank.simulations.study_store import (
    SweepSpec,
    default_storage,
    describe_trial,
    open_storage,
    open_study,
    trial_rows,
    worker_name,
)
from fedrank.simulations.sweep_app import (
    next_step,
    point_label,
    release_trials,
    retried_numbers,
)

__all__ = ["SweepResult", "main", "make_spec", "run_sweep"]

STAGGER_SECONDS = 10.0  # between worker starts here: runtimes starting together slow each other
MAX_RESTARTS = 3  # a worker whose runtime failed is started again at most this often


@dataclass
class SweepResult:
    """What a sweep's study holds after this command."""

    out_dir: Path
    storage: str
    study: str
    trials: list[FrozenTrial] = field(default_factory=list)
    finished_before: int = 0  # trials finished when this command started
    seconds: float = 0.0
    best: dict[str, Any] | None = None

    def count(self, state: TrialState) -> int:
        return sum(1 for t in self.trials if t.state == state)

    @property
    def finished_here(self) -> int:
        """Trials that finished while this command ran (by any worker of the study)."""
        retried = retried_numbers(self.trials)
        done = [t for t in self.trials if t.state.is_finished() and t.number not in retried]
        return len(done) - self.finished_before

    @property
    def completed(self) -> int:
        return self.count(TrialState.COMPLETE)

    @property
    def failed(self) -> list[FrozenTrial]:
        """Failed trials that were not queued again (their error is in ``user_attrs``)."""
        retried = retried_numbers(self.trials)
        return [t for t in self.trials if t.state == TrialState.FAIL and t.number not in retried]


def make_spec(
    scenario: Scenario,
    mode: str,
    *,
    n: int = 0,
    max_trials: int | None = None,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sweep_seed: int = 0,
) -> SweepSpec:
    """The study's :class:`SweepSpec` (validates the space and, for a grid, its size)."""
    spec = SweepSpec(
        scenario=scenario.to_dict(),
        mode=mode,
        trials=max(1, n),
        seeds=[int(s) for s in (seeds or scenario.sweep.get("seeds", scenario.seeds))],
        overrides=dict(overrides or {}),
        sweep_seed=int(sweep_seed),
        metric=str(scenario.sweep.get("metric", "ndcg@10")),
        direction=str(scenario.sweep.get("direction", "maximize")),
    )
    if mode == "grid":
        size = len(spec.space().grid())
        spec = SweepSpec(**{**spec.__dict__, "trials": min(size, max_trials or size)})
    elif max_trials:
        spec = SweepSpec(**{**spec.__dict__, "trials": min(spec.trials, max_trials)})
    return spec


# ---- worker processes ---------------------------------------------------------------------------
class Workers:
    """Worker processes of this machine, one per slot, each logging to ``OUT/logs``."""

    def __init__(self, command: list[str], slots: int, logs: Path, one_trial: bool) -> None:
        self.command = command
        self.slots: list[subprocess.Popen | None] = [None] * slots
        self.restarts = [0] * slots
        self.retired: set[int] = set()
        self.logs = logs
        self.one_trial = one_trial
        self.last_start = -float("inf")
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, slot: int) -> None:
        with open(self.logs / f"worker-{slot}.log", "ab") as log:
            self.slots[slot] = subprocess.Popen(
                self.command + (["--max-trials", "1"] if self.one_trial else []),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.last_start = time.monotonic()

    def tend(self, study: optuna.Study, spec: SweepSpec) -> bool:
        """Start or restart workers where needed; False when none runs and none will."""
        busy = False
        for slot, proc in enumerate(self.slots):
            if proc is not None and proc.poll() is None:
                busy = True
                continue
            if proc is not None:  # it ended
                self.slots[slot] = None
                self.release(study, proc)
                if proc.returncode != 0:
                    self.restarts[slot] += 1
                    if self.restarts[slot] > MAX_RESTARTS:
                        log = self.logs / f"worker-{slot}.log"
                        print(f"worker {slot} keeps failing; see {log}", file=sys.stderr)
                        self.retired.add(slot)
                elif not self.one_trial:
                    self.retired.add(slot)  # it ran until the study had nothing left for it
            if slot in self.retired or next_step(study, spec) == "done":
                continue
            busy = True
            if time.monotonic() - self.last_start >= STAGGER_SECONDS:
                self.start(slot)
        return busy

    def interrupt(self, study: optuna.Study, grace: float = 30.0) -> None:
        """SIGINT to each worker (they put their trials back), then SIGKILL after ``grace``;
        whatever trial a worker still held when it ended is put back here."""
        procs = [p for p in self.slots if p is not None and p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.release(study, proc)

    @staticmethod
    def release(study: optuna.Study, proc: subprocess.Popen) -> None:
        """Put back the trials an ended worker still holds (it crashed, was killed, or the
        runtime ended it before it could), so they run again now, not after a heartbeat."""
        if proc.returncode != 0:
            reason = f"its worker ended (exit code {proc.returncode})"
            release_trials(study, worker_name(proc.pid), reason)


class Progress:
    """Progress lines as trials start and finish."""

    def __init__(self, study: optuna.Study, spec: SweepSpec) -> None:
        self.spec = spec
        self.dims = len(spec.space().names)
        self.started: set[int] = set()
        self.finished: set[int] = set()
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state.is_finished():
                self.started.add(t.number)
                self.finished.add(t.number)
        self.before = len(self.finished - retried_numbers(trials))

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        total = self.spec.trials
        done = len([t for t in trials if t.state.is_finished() and t.number not in retried])
        for t in trials:
            has_point = len(t.params) == self.dims and "worker" in t.user_attrs
            if t.number not in self.started and t.state == TrialState.RUNNING and has_point:
                self.started.add(t.number)
                label = point_label({k: v for k, v in t.params.items()})
                print(
                    f"[{done:>3}/{total}] start  trial {t.number}  {label}  "
                    f"({t.user_attrs.get('worker', '?')})",
                    flush=True,
                )
            if t.number not in self.finished and t.state.is_finished():
                self.finished.add(t.number)
                self.started.add(t.number)
                seconds = (
                    (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start
                    else 0.0
                )
                print(
                    f"[{done:>3}/{total}] done   trial {t.number}  "
                    f"{describe_trial(t, self.spec.metric)}  ({seconds:.0f}s)",
                    flush=True,
                )


# ---- the sweep ----------------------------------------------------------------------------------
def run_sweep(
    scenario: Scenario,
    mode: str,
    out_dir: str | os.PathLike[str],
    *,
    n: int = 0,
    max_trials: int | None = None,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    clients: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    sweep_seed: int = 0,
    one_run_per_process: bool = False,
    worker_args: Sequence[str] = (),
    verbose: bool = False,
    report: bool = True,
) -> SweepResult:
    """Create or join the study of ``scenario`` (``mode``: grid, random or tpe) and run its
    trials with ``workers`` processes here until it has none left (see the module docstring).

    ``one_run_per_process``: every trial in a new process with its own runtime start (how
    sweeps ran before; kept to measure the difference). ``worker_args``: extra options for
    the workers (the Ray options)."""
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if clients is not None:
        scenario = scenario.replace(clients=int(clients))
    spec = make_spec(
        scenario,
        mode,
        n=n,
        max_trials=max_trials,
        seeds=seeds,
        overrides=overrides,
        sweep_seed=sweep_seed,
    )
    url = storage or default_storage(out)
    name = study_name or scenario.name
    study, spec = open_study(open_storage(url), name, spec, worker_name())
    progress = Progress(study, spec)
    if progress.before:
        print(f"resuming study {name!r}: {progress.before} of {spec.trials} trial(s) finished")
    workers = max(1, int(workers))
    threads = max(1, (os.cpu_count() or 1) // workers)
    print(
        f"sweep {scenario.name} ({mode}): {spec.trials} trial(s) x {len(spec.seeds)} seed(s), "
        f"{workers} worker(s) here, {scenario.clients} clients each; study {name!r} in {url}",
        flush=True,
    )
    command = [sys.executable, "-m", "fedrank.simulations.sweep_app"]
    command += ["--storage", url, "--study", name, "--out", str(out), "--threads", str(threads)]
    command += [*worker_args, *(["--verbose"] if verbose else [])]
    pool = Workers(command, workers, out / "logs", one_run_per_process)
    try:
        while pool.tend(study, spec):
            progress.update(study)
            time.sleep(1.0)
        progress.update(study)
    except KeyboardInterrupt:
        pool.interrupt(study)
        progress.update(study)
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        raise
    result = SweepResult(out, url, name, study.get_trials(), progress.before)
    result.seconds = time.perf_counter() - t0
    result.best = best_trial(study)
    if report:
        write_trials(study, spec, out)
        runs = find_runs([out / "runs"]) if (out / "runs").is_dir() else []
        if any(r.complete for r in runs):
            write_report(runs, out)
    return result


def best_trial(study: optuna.Study) -> dict[str, Any] | None:
    """The best completed trial: its point, mean, spread and seeds."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial
        return None
    return {
        "trial": best.number,
        "params": dict(best.params),
        "value": float(best.value),
        "std": float(best.user_attrs.get("std", 0.0)),
        "runs": len(best.user_attrs.get("values", {})),
    }


def write_trials(study: optuna.Study, spec: SweepSpec, out: Path) -> None:
    """``trials.csv``, ``trials.md`` and ``trials.png`` (completed trials, mean ± spread)."""
    header, rows = trial_rows(study, spec)
    atomic_write_text(out / "trials.csv", to_csv(header, rows))
    atomic_write_text(out / "trials.md", to_markdown(header, rows).rstrip("\n") + "\n")
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return
    done.sort(key=lambda t: t.value, reverse=spec.direction == "maximize")
    fig = Figure(figsize=(7, 0.3 * len(done) + 1.5))
    ax = fig.subplots()
    ys = list(range(len(done)))[::-1]
    ax.errorbar(
        [t.value for t in done],
        ys,
        xerr=[t.user_attrs.get("std", 0.0) for t in done],
        fmt="o",
        capsize=3,
    )
    ax.set_yticks(ys, [f"#{t.number} {point_label(t.params)}"[:70] for t in done], fontsize=7)
    ax.set_xlabel(f"{spec.metric}: mean over {len(spec.seeds)} seed(s), bars: ± std")
    ax.set_title(f"{spec.name}: {len(done)} trial(s), best on top")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "trials.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---- the command --------------------------------------------------------------------------------
def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds expects integers >= 0, got {text!r}")
    return seeds


def _ray_worker_args(args: argparse.Namespace) -> list[str]:
    ray_options(args)  # checks them here, before any worker starts
    out = ["--client-cpus", str(args.client_cpus)]
    if args.ray_address:
        out += ["--ray-address", args.ray_address]
    if args.client_memory:
        out += ["--client-memory", args.client_memory]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrank sweep",
        description="Tune a scenario's loss weights: an Optuna study whose trials are "
        "federated simulations (one per seed). Built-in scenarios: " + ", ".join(list_scenarios()),
    )
    parser.add_argument("scenario", help="built-in scenario name or path to a .toml file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", action="store_true", help="every point of the space")
    mode.add_argument("--random", type=int, metavar="N", help="N random points")
    mode.add_argument("--tpe", type=int, metavar="N", help="N trials of Optuna's TPE sampler")
    parser.add_argument("--max-trials", type=int, help="stop the study after this many trials")
    parser.add_argument("--out", help="sweep folder (default runs/sweep-SCENARIO)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes here (1)")
    parser.add_argument(
        "--storage", metavar="URL", help="the study's storage (default sqlite:///OUT/study.db)"
    )
    parser.add_argument("--study", metavar="NAME", help="the study's name (default: scenario)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the scenario's)")
    parser.add_argument("--clients", type=int, help="override the scenario's client count")
    parser.add_argument("--rounds", type=int, help="override num-server-rounds")
    parser.add_argument("--data", help="override data-path (e.g. a LETOR fold folder)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any configuration key",
    )
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the samplers")
    parser.add_argument(
        "--one-run-per-process",
        action="store_true",
        help="start a new process (and simulation runtime) for every trial; slower, kept "
        "for comparisons",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the points, run nothing")
    add_ray_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="Flower's logs in workers' logs")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    for flag, value in (("--random", args.random), ("--tpe", args.tpe)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} needs N >= 1, got {value}")
    if args.max_trials is not None and args.max_trials < 1:
        raise ConfigError(f"--max-trials needs N >= 1, got {args.max_trials}")
    if args.workers < 1:
        raise ConfigError(f"--workers needs N >= 1, got {args.workers}")
    scenario = load_scenario(args.scenario)
    if args.clients is not None:
        if args.clients < 1:
            raise ConfigError(f"--clients must be >= 1, got {args.clients}")
        scenario = scenario.replace(clients=args.clients)
    overrides = _parse_set(args.set)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.data is not None:
        overrides["data-path"] = args.data
    seeds = _parse_seeds(args.seeds) if args.seeds else None
    mode_name = "grid" if args.grid else "random" if args.random is not None else "tpe"
    n = args.random or args.tpe or 0
    out = Path(args.out or f"runs/sweep-{scenario.name}")
    worker_args = _ray_worker_args(args)
    if args.dry_run:
        spec = make_spec(scenario, mode_name, n=n, max_trials=args.max_trials, seeds=seeds)
        if mode_name == "grid":
            for point in spec.space().grid()[: spec.trials]:
                print(point_label(point))
        print(
            f"{mode_name}: {spec.trials} trial(s) x {len(spec.seeds)} seed(s) over "
            f"{', '.join(spec.space().names)}"
        )
        return 0
    result = run_sweep(
        scenario,
        mode_name,
        out,
        n=n,
        max_trials=args.max_trials,
        seeds=seeds,
        overrides=overrides,
        workers=args.workers,
        storage=args.storage,
        study_name=args.study,
        sweep_seed=args.sweep_seed,
        one_run_per_process=args.one_run_per_process,
        worker_args=worker_args,
        verbose=args.verbose,
    )
    print(
        f"\nstudy {result.study!r}: {result.completed} trial(s) complete, "
        f"{len(result.failed)} failed, {result.count(TrialState.PRUNED)} skipped; "
        f"{result.finished_here} finished by this command in {result.seconds:.0f}s"
    )
    for trial in result.failed:
        print(f"  trial {trial.number} failed: {trial.user_attrs.get('error', '?')}")
    if result.best is not None:
        best = result.best
        print(
            f"best: trial {best['trial']}  {point_label(best['params'])}  "
            f"{scenario.sweep.get('metric', 'ndcg@10')} {best['value']:.4f} ± {best['std']:.4f} "
            f"over {best['runs']} seed(s)"
        )
    print(f"trials: {out / 'trials.md'}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
