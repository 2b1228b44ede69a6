"""``fedrank report``: run folders -> CSV, Markdown and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedrank.common.errors import DataFormatError, FedrankError
from fedrank.common.run_folder import read_metrics, read_summary
from fedrank.simulations.report import (
    find_runs,
    group_rows,
    main,
    run_rows,
    varying_keys,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    config: dict,
    curve: list[float],
    log_loss: float,
    *,
    complete: bool = True,
    teacher: float = 0.8,
) -> Path:
    """A run folder in the format the ServerApp writes (config, metrics per round, summary)."""
    path = root / name
    path.mkdir(parents=True)
    full = {"num-server-rounds": len(curve) - 1, "out-dir": str(path), **config}
    (path / "config.json").write_text(json.dumps(full))
    rows = [
        {
            "round": i,
            "ndcg@10": v,
            "map": v / 2,
            "log_loss": log_loss + 0.1 * (len(curve) - 1 - i),
            "kendall_tau": v / 3,
            "bytes_to_clients": 1000 * i,
            "seconds": 1.5,
        }
        for i, v in enumerate(curve)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if complete:
        final = {k: v for k, v in rows[-1].items() if k not in ("round", "bytes_to_clients")}
        summary = {"student": {"metrics": final}, "teacher": {"metrics": {"ndcg@10": teacher}}}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep" / "runs"
    for seed in (0, 1):
        make_run(
            root, f"a{seed}", {"rank-weight": 0.0, "seed": seed}, [0.3, 0.5, 0.55 + seed / 100], 0.5
        )
        make_run(
            root,
            f"b{seed}",
            {"rank-weight": 1.0, "seed": seed},
            [0.3, 0.6, 0.70 + seed / 100],
            0.52,
        )
    make_run(root, "c0", {"rank-weight": 4.0, "seed": 0}, [0.3, 0.4], 0.9, complete=False)
    return tmp_path / "sweep"


def test_runs_are_found_below_a_folder(sweep: Path) -> None:
    runs = find_runs([sweep])
    assert [r.path.name for r in runs] == ["a0", "a1", "b0", "b1", "c0"]
    assert [r.complete for r in runs] == [True, True, True, True, False]
    assert varying_keys(runs) == ["num-server-rounds", "rank-weight", "seed"]  # not out-dir
    # a run folder given directly, twice, is one run
    assert len(find_runs([sweep / "runs" / "a0", sweep / "runs" / "a0"])) == 1


def test_table_rows_are_sorted_by_final_ndcg(sweep: Path) -> None:
    header, rows = run_rows(find_runs([sweep]))
    assert header[:4] == ["run", "num-server-rounds", "rank-weight", "seed"]
    assert {"ndcg@10", "map", "log_loss", "kendall_tau", "teacher_ndcg@10"} <= set(header)
    col = header.index("ndcg@10")
    assert [r[0] for r in rows] == ["b1", "b0", "a1", "a0", "c0"]
    assert rows[0][col] == pytest.approx(0.71)
    assert rows[0][header.index("log_loss")] == pytest.approx(0.52)
    assert rows[0][header.index("rounds")] == 2
    assert rows[0][header.index("bytes_to_clients")] == 3000
    assert rows[-1][header.index("status")] == "incomplete"


def test_seeds_are_grouped_with_mean_and_spread(sweep: Path) -> None:
    header, rows = group_rows(find_runs([sweep]))
    by_weight = {r[header.index("rank-weight")]: r for r in rows}
    b = by_weight[1.0]
    assert b[header.index("runs")] == 2
    assert b[header.index("ndcg@10_mean")] == pytest.approx(0.705)
    assert b[header.index("ndcg@10_std")] == pytest.approx(0.005)
    assert by_weight[4.0][header.index("runs")] == 1


def test_write_report_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = write_report(find_runs([sweep]), out)
    assert set(written) >= {"csv", "markdown", "groups_csv", "rounds_png", "tradeoff_png"}
    with open(out / "report.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 5 and table[0]["run"] == "b1" and table[0]["ndcg@10"] == "0.7100"
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("| run |") and len(md) == 2 + 5
    for name in ("ndcg_per_round.png", "ndcg_vs_log_loss.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000


def test_cli_prints_the_table_and_writes_into_the_folder(sweep: Path, capsys) -> None:  # noqa: ANN001
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "| b1 |" in printed and "5 run(s) (1 incomplete)" in printed
    assert (sweep / "report.md").is_file() and (sweep / "ndcg_per_round.png").is_file()


def test_torn_last_line_is_tolerated_but_corruption_is_not(tmp_path: Path) -> None:
    path = make_run(tmp_path, "r", {"rank-weight": 1.0}, [0.2, 0.4], 0.5, complete=False)
    with open(path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "ndcg')  # a run killed while writing its last line
    (run,) = find_runs([path])
    assert run.last_round == 1
    lines = (path / "metrics.jsonl").read_text().splitlines()
    (path / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(DataFormatError, match=r"metrics.jsonl:2"):
        find_runs([path])


def test_nothing_to_report_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FedrankError, match="no runs found"):
        write_report(find_runs([tmp_path]), tmp_path / "out")
    with pytest.raises(DataFormatError, match="no such directory"):
        find_runs([tmp_path / "missing"])


def test_run_folders_written_before_snake_case_keys_are_read_in_the_new_style(
    tmp_path: Path,
) -> None:
    """A run folder of an older fedrank (hyphenated metric keys such as ``true-ndcg@10``,
    ``eval-seconds``, ``loss-total``) reports like a new one: metric keys renamed on reading,
    configuration keys (hyphenated by Flower's rule) left alone."""
    old = make_run(tmp_path / "runs", "old", {"rank-weight": 1.0}, [0.3, 0.6], 0.5)
    rows = [json.loads(x) for x in (old / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update({"true-ndcg@10": 0.4, "eval-seconds": 0.1, "num-examples": 10.0})
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((old / "summary.json").read_text())
    summary["student"]["metrics"]["loss-total"] = 1.25
    summary["config"] = {"rank-weight": 1.0, "num-server-rounds": 1}
    (old / "summary.json").write_text(json.dumps(summary))
    make_run(tmp_path / "runs", "new", {"rank-weight": 0.0}, [0.3, 0.5], 0.5)

    migrated = read_metrics(old)
    assert {"true_ndcg@10", "eval_seconds", "num_examples"} <= set(migrated[-1])
    assert not any("-" in key for row in migrated for key in row)
    read = read_summary(old)
    assert read["student"]["metrics"]["loss_total"] == 1.25
    assert read["config"] == {"rank-weight": 1.0, "num-server-rounds": 1}
    header, table = run_rows(find_runs([tmp_path / "runs"]))
    assert "rank-weight" in header and not any("-" in h for h in header if h != "rank-weight")
    assert [r[0] for r in table] == ["old", "new"]  # both runs, compared in one table
