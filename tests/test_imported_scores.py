"""Imported teacher scores: every file format, matching by id and by position, and each error
(missing, duplicated, extra item, bad numbers, malformed files) named by file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedrank.cli import main as fedrank
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable
from fedrank.server import imported_scores
from fedrank.server.imported_scores import detect_format, import_score_table, import_scores
from fedrank.server.teacher import concat_splits
from fedrank.server.teacher_cli import main as teacher_main
from fedrank.server.teachers import load_imported_table

SCORES = {("q1", "d1"): 0.5, ("q1", "d2"): -1.25, ("q1", "d3"): 3.0, ("q2", "e1"): 2.0}
SCORES[("q2", "e2")] = 0.125
EXPECTED = np.array([0.5, -1.25, 3.0, 2.0, 0.125], np.float32)


def make_sets(item_ids: bool = True) -> ExampleSets:
    return ExampleSets(
        features=np.zeros((5, 3), np.float32),
        labels=np.array([0, 1, 2, 0, 1], np.float32),
        offsets=[0, 3, 5],
        set_ids=["q1", "q2"],
        item_ids=["d1", "d2", "d3", "e1", "e2"] if item_ids else None,
    )


def trec_text(rows) -> str:
    return "".join(f"{q} Q0 {d} {r} {s!r} mine\n" for r, ((q, d), s) in enumerate(rows, 1))


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def sets() -> ExampleSets:
    return make_sets()


# ---- formats -------------------------------------------------------------------------------
def test_every_format_gives_the_same_table(tmp_path: Path, sets: ExampleSets):
    rows = list(SCORES.items())[::-1]  # any order
    trec = tmp_path / "run.txt"
    trec.write_text("\n" + trec_text(rows) + "\n")  # blank lines are skipped
    trec_gz = tmp_path / "run.trec.gz"
    trec_gz.write_bytes(gzip.compress(trec_text(rows).encode()))
    csv = tmp_path / "scores.csv"
    csv.write_text("QID,docid,extra,Score\n" + "".join(f"{q},{d},x,{s}\n" for (q, d), s in rows))
    tsv = tmp_path / "scores.tsv.gz"
    body = "set_id\titem_id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for (q, d), s in rows)
    tsv.write_bytes(gzip.compress(body.encode()))
    parquet = write_parquet(
        tmp_path / "scores.parquet",
        {
            "set_id": [q for (q, _), _ in rows],
            "item_id": [d for (_, d), _ in rows],
            "score": [s for _, s in rows],
        },
    )
    files = {"trec": [trec, trec_gz], "csv": [csv, tsv], "parquet": [parquet]}
    expected = ScoreTable.from_scores(sets, EXPECTED)
    for fmt, paths in files.items():
        for path in paths:
            assert detect_format(path) == fmt
            np.testing.assert_array_equal(import_scores(path, sets), EXPECTED)
            table = import_score_table(path, sets)
            assert table.version == expected.version  # the content hash, whatever the format


def test_positions_match_when_the_data_has_no_item_ids(tmp_path: Path):
    sets = make_sets(item_ids=False)
    rows = [
        ((q, str(i)), s)
        for q, n in (("q1", 3), ("q2", 2))
        for i, s in zip(range(n), (EXPECTED[:3] if q == "q1" else EXPECTED[3:]), strict=True)
    ]
    trec = tmp_path / "run"
    trec.write_text(trec_text([(k, float(s)) for k, s in rows]))
    np.testing.assert_array_equal(import_scores(trec, sets), EXPECTED)
    with pytest.raises(DataFormatError, match=r"run:1: item 'd1' of set 'q1' is not a position"):
        trec.write_text(trec_text([(("q1", "d1"), 1.0)]))
        import_scores(trec, sets)


def test_a_position_column_matches_by_position_even_with_item_ids(tmp_path: Path, sets):
    csv = tmp_path / "s.csv"
    csv.write_text("set,position,score\nq2,1,0.125\nq2,0,2\nq1,2,3\nq1,0,0.5\nq1,1,-1.25\n")
    np.testing.assert_array_equal(import_scores(csv, sets), EXPECTED)
    parquet = write_parquet(
        tmp_path / "s.pq",
        {"qid": [1, 1], "position": [0, 1], "score": [1.0, 2.0]},  # integer set ids
    )
    data = ExampleSets(np.zeros((2, 1)), np.zeros(2), [0, 2], ["1"])
    np.testing.assert_array_equal(import_scores(parquet, data), [1.0, 2.0])


# ---- errors --------------------------------------------------------------------------------
def _trec_case(tmp_path: Path, lines: str) -> Path:
    path = tmp_path / "run.txt"
    path.write_text(lines)
    return path


ALL = trec_text(SCORES.items())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            ALL.replace("q2 Q0 e2 5 0.125 mine\n", ""),
            r"run.txt: item 'e2' of set 'q2' has no "
            r"score \(missing item; 1 of 5",
        ),
        (
            ALL + "q1 Q0 d2 6 9.0 mine\n",
            r"run.txt:6: item 'd2' of set 'q1' is scored twice "
            r"\(first on line 2\): duplicated item",
        ),
        (ALL + "q9 Q0 d1 6 1.0 mine\n", r"run.txt:6: set 'q9' is not in the data \(extra item\)"),
        (ALL + "q1 Q0 zz 6 1.0 mine\n", r"run.txt:6: item 'zz' is not in set 'q1' of the data"),
        (ALL.replace("0.125", "nan"), r"run.txt:5: score 'nan' is not finite"),
        (ALL.replace("3.0", "-inf"), r"run.txt:3: score '-inf' is not finite"),
        (ALL.replace("3.0", "1e39"), r"run.txt:3: score 1e\+39 overflows float32"),
        (ALL.replace("3.0", "high"), r"run.txt:3: score 'high' is not a number"),
        (ALL.replace("q1 Q0 d3 3 3.0 mine", "q1 d3 3 3.0"), r"run.txt:3: expected 6 fields"),
    ],
)
def test_trec_errors_name_the_file_and_line(tmp_path: Path, sets, text: str, message: str):
    with pytest.raises(DataFormatError, match=message):
        import_scores(_trec_case(tmp_path, text), sets)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("set_id,score\nq1,1\n", r"s.csv:1: expected exactly one item column"),
        ("set_id,item_id,position,score\n", r"s.csv:1: expected exactly one item column"),
        ("item_id,score\nd1,1\n", r"s.csv:1: no set column"),
        ("set_id,item_id\nq1,d1\n", r"s.csv:1: no score column"),
        ("qid,set_id,item,score\n", r"all name the set"),
        ("set_id,item_id,score\nq1,d1\n", r"s.csv:2: 2 fields, the header has 3"),
        ("set_id,item_id,score\nq1,d1,NaN\n", r"s.csv:2: score 'NaN' is not finite"),
        ("set,position,score\nq1,3,1\n", r"s.csv:2: position 3 is outside set 'q1' \(3 items"),
        ("", r"s.csv: empty file, expected a header line"),
    ],
)
def test_csv_errors_name_the_file_and_line(tmp_path: Path, sets, text: str, message: str):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        import_scores(path, sets)


def test_parquet_errors_name_the_file_and_row(tmp_path: Path, sets):
    cols = {
        "set_id": ["q1", "q1", "q1", "q2", "q2"],
        "item_id": ["d1", "d2", "d3", "e1", "e2"],
        "score": [0.5, -1.25, 3.0, float("nan"), 0.125],
    }
    path = write_parquet(tmp_path / "s.parquet", cols)
    with pytest.raises(DataFormatError, match=r"s.parquet: row 4: score nan is not finite"):
        import_scores(path, sets)
    dup = write_parquet(
        tmp_path / "d.parquet",
        {**cols, "score": [1.0] * 5, "item_id": ["d1", "d2", "d3", "e1", "e1"]},
    )
    with pytest.raises(
        DataFormatError,
        match=r"d.parquet: row 5: item 'e1' of set 'q2' is "
        r"scored twice \(first on row 4\)",
    ):
        import_scores(dup, sets)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match=r"x.parquet: not a readable Parquet file"):
        import_scores(tmp_path / "x.parquet", sets)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, sets, monkeypatch):
    path = write_parquet(
        tmp_path / "s.parquet", {"set_id": ["q1"], "item_id": ["d1"], "score": [1.0]}
    )
    monkeypatch.setattr(imported_scores, "pq", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedrank\[parquet\]'"):
        import_scores(path, sets)


def test_data_that_repeats_an_item_id_cannot_be_matched_by_id(tmp_path: Path):
    data = ExampleSets(np.zeros((2, 1)), np.zeros(2), [0, 2], ["q"], item_ids=["a", "a"])
    path = _trec_case(tmp_path, "q Q0 a 1 1 x\n")
    with pytest.raises(DataFormatError, match=r"set 'q' of the data holds item id 'a' twice"):
        import_scores(path, data)


def test_missing_file_and_unknown_format(tmp_path: Path, sets):
    with pytest.raises(DataFormatError, match="no such score file"):
        import_scores(tmp_path / "nope.txt", sets)
    with pytest.raises(ConfigError, match="format must be one of trec, csv, parquet"):
        import_scores(_trec_case(tmp_path, ALL), sets, fmt="xml")


# ---- the command and the server's loading --------------------------------------------------
def _mq2008_run(tmp_path: Path, mq2008_dir: Path) -> tuple[Path, ExampleSets, np.ndarray]:
    """A TREC run over every item of MQ2008 Fold1 from a simple scorer (sum of features)."""
    all_sets = concat_splits(load_dataset(str(mq2008_dir / "Fold1")).splits)
    scores = all_sets.features[:, [19, 24, 37]].sum(1).astype(np.float32)  # BM25-like columns
    lines = []
    for k in range(all_sets.num_sets):
        lo, hi = int(all_sets.offsets[k]), int(all_sets.offsets[k + 1])
        order = np.argsort(-scores[lo:hi], kind="stable")
        for rank, i in enumerate(order, 1):
            doc = all_sets.item_ids[lo + i]
            lines.append(f"{all_sets.set_ids[k]} Q0 {doc} {rank} {float(scores[lo + i])!r} bm25\n")
    path = tmp_path / "bm25.run"
    path.write_text("".join(lines))
    return path, all_sets, scores


def test_cli_imports_a_run_and_the_server_loads_it(tmp_path: Path, mq2008_dir: Path, capsys):
    run, all_sets, scores = _mq2008_run(tmp_path, mq2008_dir)
    out = tmp_path / "teacher"
    data = str(mq2008_dir / "Fold1")
    assert teacher_main(["--scores", str(run), "--data", data, "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "imported 15211 scores" in printed and 'teacher-kind = "imported"' in printed
    table = ScoreTable.load(out / "scores")
    np.testing.assert_array_equal(table.align(all_sets), scores)
    info = json.loads((out / "teacher.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert info["kind"] == metrics["kind"] == "imported" and info["source_format"] == "trec"
    assert info["score_table_version"] == table.version == metrics["score_table"]["version"]
    assert 0.2 < metrics["splits"]["test"]["ndcg@10"] < 0.7
    # what `teacher-kind = "imported"` loads: the output folder, the table, or the run itself
    dataset = load_dataset(data)
    for spec in (out, out / "scores", run):
        bundle = load_imported_table(str(spec), dataset)
        assert bundle.model is None and bundle.table.version == table.version


def test_cli_errors_are_one_line(tmp_path: Path, mq2008_dir: Path, capsys):
    run, _, _ = _mq2008_run(tmp_path, mq2008_dir)
    lines = run.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.run"
    bad.write_text("".join(lines[:100] + lines[101:]))  # one item missing
    data = str(mq2008_dir / "Fold1")
    code = fedrank(["teacher", "--scores", str(bad), "--data", data, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.run: item" in err and "has no score" in err
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert fedrank(["teacher", "--scores", str(run), "--kind", "lightgbm", "--data", data]) == 2


def test_server_refuses_a_table_of_other_data(tmp_path: Path, mq2008_dir: Path):
    run, all_sets, scores = _mq2008_run(tmp_path, mq2008_dir)
    other = ScoreTable.from_scores(all_sets.take(np.arange(10)), scores[: all_sets.offsets[10]])
    other.save(tmp_path / "other")
    dataset = load_dataset(str(mq2008_dir / "Fold1"))
    with pytest.raises(ConfigError, match=r"'teacher-scores' .*other.*is not in the teacher"):
        load_imported_table(str(tmp_path / "other"), dataset)
    with pytest.raises(ConfigError, match=r"'teacher-scores' .* does not exist"):
        load_imported_table(str(tmp_path / "missing"), dataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"folder without a score table"):
        load_imported_table(str(tmp_path / "empty"), dataset)
