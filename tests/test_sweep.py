"""Sweeps: an Optuna study in a store that workers share, resume and join.

The fast tests drive the study logic on real SQLite and journal stores without the simulation
runtime; the slow ones run real sweeps of tiny scenarios through Flower's simulation runtime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fedrank.common.errors import ConfigError, FedrankError
from fedrank.simulations.report import find_runs
from fedrank.simulations.scenarios import load_scenario, parse_scenario
from fedrank.simulations.study_store import (
    default_storage,
    open_storage,
    open_study,
    worker_name,
)
from fedrank.simulations.sweep import Workers, main, make_spec, run_sweep
from fedrank.simulations.sweep_app import TrialRunner, next_step, release_trials

REPO = Path(__file__).resolve().parents[1]

# twelve grid points, two clients, 80 short rounds of two local steps: seconds a trial,
# so one worker cannot finish the grid while the second one starts (the interrupt test needs
# both busy), and an interrupted trial has round checkpoints to continue from
GRID_POINTS = 12
TWELVE_POINTS = """
description = "twelve-point grid for tests"
clients = 2
seeds = [0]
[config]
data-path = "synthetic:num_sets=120,min_items=8,max_items=12"
num-server-rounds = 80
local-epochs = 0
local-steps = 2
batch-size = 8
student-hidden = "8"
teacher-epochs = 1
teacher-d-model = 8
teacher-heads = 1
teacher-layers = 1
fraction-evaluate = 0.0
[sweep]
[sweep.space]
rank-weight = [0.0, 0.5, 1.0, 2.0]
temperature = [1.0, 2.0, 4.0]
"""


def _study(tmp_path: Path, mode: str = "grid", n: int = 0, **kw) -> tuple[optuna.Study, object]:  # noqa: ANN003
    spec = make_spec(load_scenario("tiny"), mode, n=n, **kw)
    return open_study(open_storage(default_storage(tmp_path)), "s", spec, "test:1")


# ---- the study, without the runtime -----------------------------------------------------------
def test_spec_sizes_samplers_and_a_different_sweep_on_the_same_study(tmp_path: Path) -> None:
    tiny = load_scenario("tiny")  # space: rank-weight in [0.0, 1.0]
    assert make_spec(tiny, "grid").trials == 2
    assert make_spec(tiny, "grid", max_trials=1).trials == 1
    assert make_spec(tiny, "tpe", n=7).trials == 7
    assert make_spec(tiny, "random", n=7, max_trials=3).trials == 3
    spec = make_spec(tiny, "grid", seeds=[3, 4])
    assert spec.seeds == [3, 4]
    assert isinstance(spec.sampler("a"), optuna.samplers.GridSampler)
    assert isinstance(make_spec(tiny, "random", n=2).sampler("a"), optuna.samplers.RandomSampler)
    assert isinstance(make_spec(tiny, "tpe", n=2).sampler("a"), optuna.samplers.TPESampler)

    study, stored = _study(tmp_path)
    assert stored == make_spec(tiny, "grid")
    # a worker needs only the storage and the name: the spec comes from the study
    _, loaded = open_study(open_storage(default_storage(tmp_path)), "s", None, "test:2")
    assert loaded == stored
    with pytest.raises(ConfigError, match="different sweep.*seeds"):
        _study(tmp_path, seeds=[5])
    with pytest.raises(ConfigError, match="does not exist"):
        open_study(open_storage(default_storage(tmp_path)), "other", None, "test:2")


def test_storage_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        open_storage(str(tmp_path / "study.db"))
    with pytest.raises(ConfigError, match="does not exist"):
        open_storage(f"journal:{tmp_path / 'missing' / 'j.log'}")
    with pytest.raises(FedrankError, match="cannot open"):
        open_storage("sqlite:////nonexistent-folder/x/study.db")
    # a journal file: the same study API, shared through one file
    journal = f"journal:{tmp_path / 'study.log'}"
    spec = make_spec(load_scenario("tiny"), "random", n=2)
    study, _ = open_study(open_storage(journal), "j", spec, "test:1")
    trial = study.ask()
    study.tell(trial, 0.5)
    again, _ = open_study(open_storage(journal), "j", None, "test:2")
    assert [t.value for t in again.get_trials()] == [0.5]
    # the default store opens with Optuna's own API (what optuna-dashboard does)
    _study(tmp_path)
    names = optuna.get_all_study_names(storage=default_storage(tmp_path))
    assert names == ["s"]


def test_next_step_grid_resume_and_released_trials(tmp_path: Path) -> None:
    study, spec = _study(tmp_path)  # a grid of two points

    def objective(value: float):  # noqa: ANN202 - a trial as a worker runs it, minus the runs
        def run(trial: optuna.Trial) -> float:
            trial.set_user_attr("worker", "w:1")
            spec.suggest(trial)
            return value

        return run

    assert next_step(study, spec) == "run"
    elsewhere = study.ask()  # a trial running on another worker
    elsewhere.set_user_attr("worker", "w:2")
    spec.suggest(elsewhere)
    assert next_step(study, spec) == "run"  # one grid point is still free
    # another worker (its own sampler) takes the other point, not the one running elsewhere
    other, _ = open_study(open_storage(default_storage(tmp_path)), "s", None, "w:1")
    other.optimize(objective(0.7), n_trials=1)
    assert other.get_trials()[1].params != other.get_trials()[0].params
    assert next_step(study, spec) == "wait"  # the other point runs elsewhere
    # worker 2 is interrupted: its trial fails with the reason and is queued again
    assert release_trials(study, "w:2", "interrupted") == [0]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["error"] == "interrupted"
    assert trials[2].state == TrialState.WAITING and trials[2].params == trials[0].params
    assert next_step(study, spec) == "run"
    # the next worker takes the queued copy: the same grid cell, not the finished one
    study.optimize(objective(0.6), n_trials=1)
    trials = study.get_trials()
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == trials[0].params
    assert trials[2].params != trials[1].params
    assert next_step(study, spec) == "done"


def test_the_pool_puts_back_what_a_dead_worker_held(tmp_path: Path) -> None:
    """A worker that ends without putting its trial back (killed, or ended by the runtime
    before its own handler ran) has it put back by the pool that started it."""
    study, spec = _study(tmp_path)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = study.ask()
    held.set_user_attr("worker", worker_name(killed.pid))
    spec.suggest(held)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])  # a clean exit holds nothing
    finished.wait()
    pool = Workers(["unused"], 2, tmp_path / "logs", one_trial=False)
    pool.slots = [killed, finished]
    pool.interrupt(study, grace=0.0)  # no grace: SIGINT, then SIGKILL at once
    assert killed.returncode != 0
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert "exit code" in trials[0].user_attrs["error"]
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert next_step(study, spec) == "run"


def test_next_step_counts_the_budget_of_random_and_tpe(tmp_path: Path) -> None:
    study, spec = _study(tmp_path, "tpe", n=2)
    for value in (0.1, 0.2):
        assert next_step(study, spec) == "run"
        trial = study.ask()
        spec.suggest(trial)
        study.tell(trial, value)
    assert next_step(study, spec) == "done"


def test_sweep_cli_mistakes_are_clear(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        main(["tiny"])  # a mode is required
    with pytest.raises(FedrankError, match="--seeds"):
        main(["tiny", "--grid", "--seeds", "a,b", "--dry-run"])
    with pytest.raises(FedrankError, match="--tpe needs N >= 1"):
        main(["tiny", "--tpe", "0", "--dry-run"])
    with pytest.raises(FedrankError, match="memory"):
        main(["tiny", "--grid", "--client-memory", "lots", "--dry-run"])
    with pytest.raises(FedrankError, match="SQLAlchemy URL"):
        main(["tiny", "--grid", "--storage", "study.db", "--out", str(tmp_path / "o")])
    capsys.readouterr()
    assert main(["tiny", "--grid", "--seeds", "0,1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "rank-weight=0.0",
        "rank-weight=1.0",
        "grid: 2 trial(s) x 2 seed(s) over rank-weight",
    ]


# ---- real sweeps ------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sweep_runs_reports_and_resumes(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "sweep"
    scenario = load_scenario("tiny")  # rank-weight in [0.0, 1.0]; 2 clients, 1 round
    # one worker, one start of the simulation runtime, both trials; seeds 0 and 1 are repeats
    result = run_sweep(scenario, "grid", out, seeds=[0, 1])
    printed = capsys.readouterr().out
    assert result.completed == 2 and not result.failed and result.finished_here == 2
    assert "start  trial 0" in printed and "[  2/2] done" in printed  # progress lines
    for trial in result.trials:
        assert set(trial.user_attrs["values"]) == {"0", "1"}
        values = list(trial.user_attrs["values"].values())
        assert trial.value == pytest.approx(sum(values) / 2)
        assert trial.user_attrs["std"] >= 0.0
    assert len({t.user_attrs["worker"] for t in result.trials}) == 1  # one runtime start

    runs = find_runs([out / "runs"])
    assert len(runs) == 4 and all(r.complete and r.last_round == 1 for r in runs)
    assert sorted({float(r.config["rank-weight"]) for r in runs}) == [0.0, 1.0]
    assert len(list((out / "teacher").glob("teacher-*"))) <= 2  # one per seed, shared
    trials_md = (out / "trials.md").read_text().splitlines()
    assert trials_md[0].startswith("| trial | state | rank-weight | ndcg@10 mean | ndcg@10 std")
    assert len(trials_md) == 4
    for png in ("trials.png", "ndcg_per_round.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.best is not None and result.best["runs"] == 2

    # the same command again: the study is done, nothing runs
    again = run_sweep(scenario, "grid", out, seeds=[0, 1])
    assert again.finished_here == 0 and again.completed == 2
    assert "resuming study 'tiny': 2 of 2" in capsys.readouterr().out


def _sweep_command(scenario: Path, out: Path, storage: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedrank.cli",
        "sweep",
        str(scenario),
        "--grid",
        "--workers",
        str(workers),
        "--out",
        str(out),
        "--storage",
        storage,
        "--study",
        "twelve",
    ]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_two_workers_interrupted_resumed_and_joined_by_a_second_process(tmp_path: Path) -> None:
    scenario = tmp_path / "twelve.toml"
    scenario.write_text(TWELVE_POINTS, encoding="utf-8")
    storage = default_storage(tmp_path / "a")
    (tmp_path / "a").mkdir()

    # 1. two workers share the store; interrupted once both took trials and one has finished
    first = subprocess.Popen(
        _sweep_command(scenario, tmp_path / "a", storage, 2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
        # Ctrl-C's default action even where this test was started in the background (a
        # non-interactive shell starts background jobs with SIGINT ignored, and Python keeps it)
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 900  # a busy machine: Ray may need a second start
    finished: list[optuna.trial.FrozenTrial] = []
    watched = None  # the study, opened once it exists, then re-read each time
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
        if watched is None:
            try:
                watched = optuna.load_study(study_name="twelve", storage=storage)
            except KeyError:
                continue
        trials = watched.get_trials()
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        takers = {t.user_attrs.get("worker") for t in trials} - {None}
        if finished and len(takers) >= 2:
            break
    first.send_signal(signal.SIGINT)
    log, _ = first.communicate(timeout=120)
    assert finished, log.decode(errors="replace")[-4000:]
    assert first.returncode != 0 and b"run the same command again to resume" in log
    study = optuna.load_study(study_name="twelve", storage=storage)
    before = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert not study.get_trials(states=(TrialState.RUNNING,))  # interrupted trials went back
    workers = {t.user_attrs["worker"] for t in study.get_trials() if "worker" in t.user_attrs}
    assert len(workers) >= 2  # two worker processes took trials (a restarted one: three)
    mtimes = {
        run: (tmp_path / "a" / "runs" / run / "summary.json").stat().st_mtime_ns
        for t in before.values()
        for run in t.user_attrs["runs"]
    }

    # 2. resumed here, and joined at the same time by a second process (its own folder, as on
    # another machine) with the same store and study
    resume = subprocess.Popen(
        _sweep_command(scenario, tmp_path / "a", storage, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    join = subprocess.Popen(
        _sweep_command(scenario, tmp_path / "b", storage, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    out_resume, _ = resume.communicate(timeout=600)
    out_join, _ = join.communicate(timeout=600)
    text = (out_resume + out_join).decode(errors="replace")
    assert resume.returncode == 0 and join.returncode == 0, text[-4000:]

    study = optuna.load_study(study_name="twelve", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    points = [json.dumps(t.params, sort_keys=True) for t in complete]
    # every grid point once, none repeated
    assert len(points) == GRID_POINTS and len(set(points)) == GRID_POINTS
    for number, trial in before.items():  # finished trials stay as they were, not run again
        assert study.get_trials()[number].state == TrialState.COMPLETE
        assert study.get_trials()[number].value == trial.value
    for run, mtime in mtimes.items():
        assert (tmp_path / "a" / "runs" / run / "summary.json").stat().st_mtime_ns == mtime
    # the joining process added trials: runs in its own folder, recorded in the shared study
    joined = [r for r in find_runs([tmp_path / "b" / "runs"]) if r.complete]
    assert joined, text[-4000:]
    assert "resuming study 'twelve'" in out_resume.decode()


def test_a_point_the_configuration_rejects_is_pruned_with_the_reason(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "clients": 2,
            "config": {"data-path": "synthetic:num_sets=120,min_items=8,max_items=12"},
            "sweep": {
                "space": {"label-weight": [0.0], "rank-label-weight": [0.0], "rank-weight": [0.0]}
            },
        },
        name="zeros",
    )
    spec = make_spec(scenario, "grid")
    study, spec = open_study(open_storage(default_storage(tmp_path)), "z", spec, "w:1")
    study.optimize(TrialRunner(spec, scenario, tmp_path, "w:1"), n_trials=1)  # no grid needed
    (trial,) = study.get_trials()
    assert trial.state == TrialState.PRUNED and "are 0" in trial.user_attrs["skipped"]
    assert trial.user_attrs["worker"] == "w:1" and not (tmp_path / "runs").exists()
    assert next_step(study, spec) == "done"
