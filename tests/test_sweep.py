"""A tiny sweep through Flower's simulation runtime: 2 configurations, 2 clients, 1 round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedrank.common.errors import FedrankError
from fedrank.simulations.report import find_runs
from fedrank.simulations.scenarios import load_scenario
from fedrank.simulations.sweep import main, run_sweep


@pytest.mark.slow
def test_tiny_sweep_runs_reports_both_rows_and_resumes(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "sweep"
    scenario = load_scenario("tiny")  # space: rank-weight in [0.0, 1.0]; 2 clients, 1 round
    # one worker process serves both runs: one start of the simulation runtime
    result = run_sweep(scenario, "grid", out, jobs=1, batch=2)
    assert not result.failed and len(result.finished) == 2
    printed = capsys.readouterr().out
    assert "[  1/2] start" in printed and "[  2/2] done" in printed  # progress lines

    runs = find_runs([out])
    assert len(runs) == 2 and all(r.complete for r in runs)
    weights = sorted(float(r.config["rank-weight"]) for r in runs)
    assert weights == [0.0, 1.0]
    for run in runs:
        assert run.last_round == 1
        assert (run.path / "sweep.json").is_file()
        assert json.loads((run.path / "config.json").read_text())["num-server-rounds"] == 1
        # the folder name is the hash of the configuration
        meta = json.loads((run.path / "sweep.json").read_text())
        assert meta["params"] == {"rank-weight": float(run.config["rank-weight"])}
    # the two runs share one teacher, trained once
    assert len(list((out / "teacher").glob("teacher-*"))) == 1

    # the report has both rows
    table = (out / "report.md").read_text().splitlines()
    rows = [line for line in table[2:] if line.startswith("| rank-weight=")]
    assert len(rows) == 2
    assert {r.split("|")[1].strip() for r in rows} == {
        "rank-weight=0.0 seed=0",
        "rank-weight=1.0 seed=0",
    }
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,rank-weight,ndcg@10") and len(csv_lines) == 3
    for png in ("ndcg_per_round.png", "ndcg_vs_log_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.best is not None and result.best["runs"] == 1

    # run again: both runs are found complete and reused, nothing is started
    again = run_sweep(scenario, "grid", out, jobs=1, batch=2)
    assert len(again.resumed) == 2 and not again.finished and not again.failed
    assert "resuming: 2 of 2" in capsys.readouterr().out


def test_sweep_cli_mistakes_are_clear(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        main(["tiny"])  # a mode is required
    monkeypatch.setitem(sys.modules, "optuna", None)  # optuna not installed
    with pytest.raises(FedrankError, match="pip install optuna"):
        main(["tiny", "--optuna", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(FedrankError, match="--seeds"):
        main(["tiny", "--grid", "--seeds", "a,b", "--dry-run"])


def test_dry_run_lists_the_planned_runs(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["tiny", "--grid", "--seeds", "0,1", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("4 run(s)")
    assert sum("todo" in line for line in lines) == 4
