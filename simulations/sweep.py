"""``fedrank sweep``: tune loss weights over a scenario, one federation per configuration.

    fedrank sweep SCENARIO --grid            # every point of the scenario's [sweep.space]
    fedrank sweep SCENARIO --random 20       # 20 random points (seeded by --sweep-seed)
    fedrank sweep SCENARIO --optuna 30       # 30 trials of Optuna's TPE (pip install optuna)

Each configuration runs once per seed of the scenario (``--seeds`` overrides). Runs are
separate processes, each its own start of Flower's simulation runtime, at most ``--jobs``
(default: the machine's cores) at a time; a progress line is printed as each one starts and
finishes. A run's folder is ``OUT/runs/<hash>``, the hash of its full configuration, and a run
whose folder already holds a ``summary.json`` is not run again, so an interrupted sweep resumes
where it stopped when given the same command (a run cut short mid-way continues from its last
round checkpoint). Runs share one teacher cache (``OUT/teacher``), so the teacher is trained
once per data and seed. At the end ``OUT/report.*`` and the plots are written (see
:mod:`fedrank.simulations.report`) and the best configuration is printed.

The search space is the scenario's ``[sweep.space]``: each key is a configuration key with a
list of values or a range ``{ low, high, log, int, steps }`` (``steps`` points for ``--grid``;
ranges are sampled for ``--random``/``--optuna``). Without one, the default space covers the
weights of the four loss families and the distillation temperature (:data:`DEFAULT_SPACE`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedrank.server.client_weights as client_weights
from fedrank.common.atomic_io import append_jsonl, atomic_write_json
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.simulations.report import find_runs, write_report
from fedrank.simulations.scenarios import list_scenarios, load_scenario
from fedrank.simulations.search_space import SearchSpace
from fedrank.simulations.simulate import _parse_set, run_federations

__all__ = [
    "PlannedRun",
    "SweepResult",
    "main",
    "plan_runs",
    "run_hash",
    "run_sweep",
]

# keys that do not change what a run computes, so they are not part of its hash
UNHASHED = ("out-dir", "teacher-cache-dir", "resume")


# ---- planning ------------------------------------------------------------------------------------
def run_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits identifying what a run computes (its configuration minus output paths)."""
    body = {k: v for k, v in sorted(config.items()) if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PlannedRun:
    """One federation of a sweep: a point of the space and a seed."""

    params: dict[str, Any]
    seed: int
    config: dict[str, Any]
    dir: Path
    label: str

    @property
    def id(self) -> str:
        return self.dir.name

    def done(self) -> bool:
        return summary_complete(self.dir)


def summary_complete(run_dir: Path) -> bool:
    """True when ``run_dir/summary.json`` is a finished run's summary."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "student" in data


def point_label(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "base"


def plan_runs(
    scenario: Any,
    points: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[list[PlannedRun], list[tuple[dict[str, Any], str]]]:
    """The runs of ``points`` x seeds and the points skipped as invalid (with the reason)."""
    runs: list[PlannedRun] = []
    skipped: list[tuple[dict[str, Any], str]] = []
    teacher_dir = os.fspath(out_dir / "teacher")
    for point in points:
        for seed in seeds or scenario.seeds:
            try:
                config = scenario.run_config(seed, {**dict(overrides or {}), **dict(point)})
            except ConfigError as err:
                if seed == (seeds or scenario.seeds)[0]:
                    skipped.append((dict(point), str(err)))
                break
            run_dir = out_dir / "runs" / run_hash(config)
            config = {**config, "out-dir": os.fspath(run_dir), "teacher-cache-dir": teacher_dir}
            label = f"{point_label(point)} seed={seed}"
            runs.append(PlannedRun(dict(point), int(seed), config, run_dir, label))
    return runs, skipped


# ---- running ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What a sweep did."""

    out_dir: Path
    runs: list[PlannedRun]
    finished: list[PlannedRun] = field(default_factory=list)
    resumed: list[PlannedRun] = field(default_factory=list)
    failed: list[PlannedRun] = field(default_factory=list)
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def _write_meta(run: PlannedRun, scenario: Any, clients: int, threads: int) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run.dir / "sweep.json",
        {
            "label": run.label,
            "params": run.params,
            "seed": run.seed,
            "clients": clients,
            "threads": threads,
            "scenario": scenario.name,
            "client-weights": scenario.client_weights,
            "config": {**run.config, "resume": True},
        },
    )


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return dict(summary["student"]["metrics"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return {}


def _last_error(log_path: Path) -> str:
    """The last line of a worker's log that names an error (or its last line)."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if ln]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


class _Pool:
    """At most ``jobs`` worker processes; each runs a batch of run folders."""

    def __init__(self, jobs: int, verbose: bool, total: int) -> None:
        self.jobs = jobs
        self.verbose = verbose
        self.total = total
        self.count = 0
        self.active: list[tuple[subprocess.Popen, list[PlannedRun], float, Any]] = []
        self.started = 0
        self.stagger = 10.0  # seconds between process starts
        self.last_start = -math.inf

    def _line(self, text: str) -> None:
        print(text, flush=True)

    def start(self, batch: list[PlannedRun]) -> None:
        while len(self.active) >= self.jobs:
            self.wait_one()
        log_path = batch[0].dir / "log.txt"
        log = open(log_path, "ab")  # noqa: SIM115 - closed when the process ends
        cmd = [
            sys.executable,
            "-m",
            "fedrank.simulations.sweep",
            "--worker",
            *[os.fspath(r.dir) for r in batch],
        ]
        if self.verbose:
            cmd.append("--verbose")
        root = Path(__file__).resolve().parents[1]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([os.fspath(root), os.environ.get("PYTHONPATH", "")]),
        }
        wait = self.last_start + self.stagger - time.monotonic()
        if wait > 0:  # runtimes that start at the same moment slow each other's startup
            time.sleep(wait)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.last_start = time.monotonic()
        for run in batch:
            self.started += 1
            self._line(f"[{self.started:>3}/{self.total}] start  {run.id}  {run.label}")
        self.active.append((proc, batch, time.monotonic(), log))

    def wait_one(self) -> list[tuple[PlannedRun, bool]]:
        while True:
            for i, (proc, batch, started, log) in enumerate(self.active):
                if proc.poll() is not None:
                    del self.active[i]
                    log.close()
                    return self._finish(proc, batch, started)
            time.sleep(0.2)

    def _finish(self, proc: subprocess.Popen, batch: list[PlannedRun], started: float) -> list:
        seconds = time.monotonic() - started
        out = []
        for run in batch:
            self.count += 1
            ok = run.done()
            if ok:
                m = _final_metrics(run.dir)
                text = "  ".join(
                    f"{k} {m[k]:.4f}"
                    for k in ("ndcg@10", "log_loss")
                    if isinstance(m.get(k), float)
                )
                self._line(
                    f"[{self.count:>3}/{self.total}] done   {run.id}  {text}  ({seconds:.0f}s)"
                )
            else:
                self._line(
                    f"[{self.count:>3}/{self.total}] FAILED {run.id} (exit {proc.returncode}): "
                    f"{_last_error(batch[0].dir / 'log.txt')}; see {batch[0].dir / 'log.txt'}"
                )
            out.append((run, ok))
        return out

    def drain(self) -> list[tuple[PlannedRun, bool]]:
        out = []
        while self.active:
            out += self.wait_one()
        return out

    def kill(self) -> None:
        for proc, _, _, _log in self.active:
            proc.terminate()
        for proc, _, _, log in self.active:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        self.active = []


def execute(
    runs: Sequence[PlannedRun],
    scenario: Any,
    *,
    clients: int,
    jobs: int,
    batch: int = 1,
    verbose: bool = False,
    progress_total: int | None = None,
    result: SweepResult | None = None,
) -> SweepResult:
    """Run the runs not yet done (``jobs`` processes at a time); fills ``result``."""
    result = result or SweepResult(Path("."), list(runs))
    todo = []
    for run in runs:
        if run.done():
            result.resumed.append(run)
        else:
            todo.append(run)
    total = progress_total or len(runs)
    pool = _Pool(max(1, jobs), verbose, total)
    pool.count = len(result.resumed) + len(result.finished) + len(result.failed)
    pool.started = pool.count
    if result.resumed and pool.count == len(result.resumed):
        print(f"resuming: {len(result.resumed)} of {len(runs)} run(s) already done", flush=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, min(jobs, len(todo) or 1)))
    try:
        for i in range(0, len(todo), max(1, batch)):
            chunk = todo[i : i + max(1, batch)]
            for run in chunk:
                _write_meta(run, scenario, clients, threads)
            pool.start(chunk)
            while len(pool.active) >= pool.jobs:
                _collect(pool.wait_one(), result)
        _collect(pool.drain(), result)
    except KeyboardInterrupt:
        pool.kill()
        print("interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        raise
    return result


def _collect(outcomes: list[tuple[PlannedRun, bool]], result: SweepResult) -> None:
    for run, ok in outcomes:
        (result.finished if ok else result.failed).append(run)


def _objective(runs: Sequence[PlannedRun], metric: str) -> float | None:
    values = [_final_metrics(r.dir).get(metric) for r in runs]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values and len(values) == len(runs) else None


def best_point(
    runs: Sequence[PlannedRun], metric: str = "ndcg@10", direction: str = "maximize"
) -> dict[str, Any] | None:
    """The point with the best mean ``metric`` over its seeds (only points whose runs all
    finished)."""
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.params, sort_keys=True), []).append(run)
    best = None
    for members in groups.values():
        value = _objective(members, metric)
        if value is None:
            continue
        better = best is None or (
            value > best["value"] if direction == "maximize" else value < best["value"]
        )
        if better:
            best = {"params": members[0].params, "value": value, "runs": len(members)}
    return best


def _optuna_sweep(
    scenario: Any,
    space: SearchSpace,
    n: int,
    out_dir: Path,
    *,
    seeds: Sequence[int] | None,
    overrides: Mapping[str, Any],
    clients: int,
    jobs: int,
    batch: int,
    verbose: bool,
    sweep_seed: int,
    metric: str,
    direction: str,
    result: SweepResult,
) -> None:
    try:
        import optuna
    except ImportError:
        raise FedrankError(
            "--optuna needs the optuna package: pip install optuna (or use --grid / --random)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sweep_seed)
    study = optuna.create_study(direction=direction, sampler=sampler)
    distributions = {p.name: p.distribution() for p in space.params}
    # replay trials finished by an earlier, interrupted invocation (recorded in trials.jsonl)
    trials_path = out_dir / "trials.jsonl"
    done_points: list[dict[str, Any]] = []
    if trials_path.is_file():
        for line in trials_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done_points.append(json.loads(line)["params"])
    told = 0
    for point in done_points[:n]:
        runs, _ = plan_runs(scenario, [point], out_dir, seeds=seeds, overrides=overrides)
        value = _objective(runs, metric) if runs and all(r.done() for r in runs) else None
        if value is None:
            continue
        study.add_trial(
            optuna.trial.create_trial(params=point, distributions=distributions, value=value)
        )
        result.runs += runs
        result.resumed += runs
        told += 1
    if told:
        print(f"resuming: {told} of {n} trial(s) already done", flush=True)
    per_trial = len(seeds or scenario.seeds)
    total = n * per_trial

    while told < n:
        wave = min(max(1, jobs), n - told)
        trials = [study.ask() for _ in range(wave)]
        points = [{p.name: p.suggest(t) for p in space.params} for t in trials]
        wave_runs = []
        for trial, point in zip(trials, points, strict=True):
            runs, skipped = plan_runs(scenario, [point], out_dir, seeds=seeds, overrides=overrides)
            if skipped:
                result.skipped += skipped
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            wave_runs.append((trial, point, runs))
        all_runs = [r for _, _, rs in wave_runs for r in rs]
        result.runs += all_runs
        execute(
            all_runs,
            scenario,
            clients=clients,
            jobs=jobs,
            batch=batch,
            verbose=verbose,
            progress_total=total,
            result=result,
        )
        for trial, point, runs in wave_runs:
            value = _objective(runs, metric)
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, value)
                append_jsonl(trials_path, {"params": point, "value": value})
        told += wave


def run_sweep(
    scenario: Any,
    mode: str,
    out_dir: str | os.PathLike[str],
    *,
    n: int = 0,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    clients: int | None = None,
    jobs: int | None = None,
    batch: int = 1,
    sweep_seed: int = 0,
    verbose: bool = False,
    report: bool = True,
) -> SweepResult:
    """Run a sweep of ``scenario`` (``mode`` is ``grid``, ``random`` or ``optuna``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if clients is not None:
        scenario = scenario.replace(clients=int(clients))
    overrides = dict(overrides or {})
    space = SearchSpace.parse(scenario.sweep["space"]) if "space" in scenario.sweep else None
    space = space or SearchSpace.default()
    metric = str(scenario.sweep.get("metric", "ndcg@10"))
    direction = str(scenario.sweep.get("direction", "maximize"))
    seeds = list(seeds) if seeds else list(scenario.sweep.get("seeds", scenario.seeds))
    jobs = max(1, min(int(jobs or os.cpu_count() or 1), os.cpu_count() or 1))
    atomic_write_json(
        out / "sweep.json",
        {
            "scenario": scenario.to_dict(),
            "mode": mode,
            "n": n,
            "seeds": seeds,
            "overrides": overrides,
            "space": space.names,
            "sweep_seed": sweep_seed,
            "metric": metric,
            "direction": direction,
        },
    )
    result = SweepResult(out, [])
    if mode == "optuna":
        _optuna_sweep(
            scenario,
            space,
            n,
            out,
            seeds=seeds,
            overrides=overrides,
            clients=scenario.clients,
            jobs=jobs,
            batch=batch,
            verbose=verbose,
            sweep_seed=sweep_seed,
            metric=metric,
            direction=direction,
            result=result,
        )
    else:
        if mode == "grid":
            points = space.grid()
        elif mode == "random":
            points = space.sample(n, seed=sweep_seed)
        else:
            raise ConfigError(f"unknown sweep mode {mode!r}; valid: grid, random, optuna")
        runs, skipped = plan_runs(scenario, points, out, seeds=seeds, overrides=overrides)
        result.runs, result.skipped = runs, skipped
        for point, reason in skipped:
            print(f"skipped {point_label(point)}: {reason}", flush=True)
        print(
            f"sweep {scenario.name}: {len(points) - len(skipped)} configuration(s) x "
            f"{len(seeds)} seed(s) = {len(runs)} run(s), {jobs} at a time, {scenario.clients} "
            f"clients each; output {out}",
            flush=True,
        )
        execute(
            runs,
            scenario,
            clients=scenario.clients,
            jobs=jobs,
            batch=batch,
            verbose=verbose,
            result=result,
        )
    result.best = best_point(result.runs, metric, direction)
    if report and any(r.done() for r in result.runs):
        write_report(find_runs([out / "runs"]), out)
    return result


# ---- worker (one process: one start of the simulation runtime) ----------------------------------
def _runtime_crashed(err: BaseException) -> bool:
    """True for a failure of the simulation runtime itself (e.g. Ray timing out at startup on
    a busy machine), which is worth one more try; a fedrank error in a run is not."""
    return isinstance(err, RuntimeError) and "Ending simulation" in str(err)


def _worker(run_dirs: Sequence[str], verbose: bool, attempts: int = 3) -> int:
    """Run the federations of ``run_dirs`` in one start of the simulation runtime.

    The process ends with ``os._exit``: after a crash of the runtime the ServerApp thread may
    still be waiting for nodes, and it must not keep the process (and the sweep) alive.
    """

    code = 1
    try:
        dirs = [Path(d) for d in run_dirs]
        metas = [json.loads((d / "sweep.json").read_text(encoding="utf-8")) for d in dirs]
        for meta in metas:
            if meta.get("client-weights"):
                client_weights.policy_config(meta["client-weights"])  # register in this process
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


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds expects integers >= 0, got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "--worker":
        verbose = "--verbose" in args_list
        return _worker([a for a in args_list[1:] if a != "--verbose"], verbose)

    parser = argparse.ArgumentParser(
        prog="fedrank sweep",
        description="Sweep loss weights over a scenario; each configuration is one federated "
        "simulation per seed. Built-in scenarios: " + ", ".join(list_scenarios()),
    )
    parser.add_argument("scenario", help="built-in scenario name or path to a .toml file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", action="store_true", help="every point of the space")
    mode.add_argument("--random", type=int, metavar="N", help="N random points")
    mode.add_argument("--optuna", type=int, metavar="N", help="N Optuna (TPE) trials")
    parser.add_argument("--out", help="sweep folder (default runs/sweep-SCENARIO)")
    parser.add_argument("--jobs", type=int, help="parallel runs (default: the machine's cores)")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="runs per process (one runtime start serves them; default 1)",
    )
    parser.add_argument("--seeds", help="comma-separated seeds (default: the scenario's)")
    parser.add_argument("--clients", type=int, help="override the scenario's client count")
    parser.add_argument("--rounds", type=int, help="override num-server-rounds")
    parser.add_argument("--data", help="override data-path (e.g. ../shared/data/MQ2008/Fold1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any configuration key",
    )
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of --random / --optuna")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    parser.add_argument("--verbose", action="store_true", help="Flower's logs in each run's log")
    args = parser.parse_args(args_list)
    if args.random is not None and args.random < 1 or args.optuna is not None and args.optuna < 1:
        raise ConfigError("--random / --optuna need N >= 1")
    scenario = load_scenario(args.scenario)
    overrides = _parse_set(args.set)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.data is not None:
        overrides["data-path"] = args.data
    seeds = _parse_seeds(args.seeds) if args.seeds else None
    mode_name = "grid" if args.grid else "random" if args.random is not None else "optuna"
    n = args.random or args.optuna or 0
    out = Path(args.out or f"runs/sweep-{scenario.name}")
    if args.dry_run:
        sc = scenario.replace(clients=args.clients) if args.clients else scenario
        space = (
            SearchSpace.parse(sc.sweep["space"]) if "space" in sc.sweep else SearchSpace.default()
        )
        if mode_name == "optuna":
            print(f"optuna: {n} trials over {', '.join(space.names)}")
            return 0
        points = space.grid() if args.grid else space.sample(n, seed=args.sweep_seed)
        runs, skipped = plan_runs(sc, points, out, seeds=seeds, overrides=overrides)
        for run in runs:
            print(f"{run.id}  {'done' if run.done() else 'todo'}  {run.label}")
        print(f"{len(runs)} run(s); {len(skipped)} configuration(s) skipped as invalid")
        return 0
    result = run_sweep(
        scenario,
        mode_name,
        out,
        n=n,
        seeds=seeds,
        overrides=overrides,
        clients=args.clients,
        jobs=args.jobs,
        batch=args.batch,
        sweep_seed=args.sweep_seed,
        verbose=args.verbose,
    )
    print(
        f"\n{len(result.finished)} run(s) finished, {len(result.resumed)} reused, "
        f"{len(result.failed)} failed, {len(result.skipped)} configuration(s) skipped"
    )
    if result.best is not None:
        metric = scenario.sweep.get("metric", "ndcg@10")
        print(
            f"best: {point_label(result.best['params'])}  mean {metric} "
            f"{result.best['value']:.4f} over {result.best['runs']} seed(s)"
        )
    if (out / "report.md").is_file():
        print(f"report: {out / 'report.md'}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
