"""ScoreTable: construction, subset/align, float16, versions, files (no pickle, corruption)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedrank.common.errors import CheckpointError, ScoreTableError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable


def make_sets(sizes=(3, 1, 4, 2), prefix="q", seed=0) -> ExampleSets:
    rng = np.random.default_rng(seed)
    n = int(sum(sizes))
    return ExampleSets(
        features=rng.normal(size=(n, 5)).astype(np.float32),
        labels=rng.integers(0, 3, size=n).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"{prefix}{i}" for i in range(len(sizes))],
    )


@pytest.fixture
def table_and_sets():
    sets = make_sets()
    scores = np.arange(sets.num_items, dtype=np.float32) / 7.0 - 0.5
    return ScoreTable.from_scores(sets, scores), sets, scores


def test_from_scores_basics(table_and_sets):
    table, sets, scores = table_and_sets
    assert table.num_sets == 4 and table.num_items == 10
    assert table.set_ids.tolist() == ["q0", "q1", "q2", "q3"]
    assert table.dtype == np.float32
    assert len(table.version) == 16 and int(table.version, 16) >= 0
    assert table.version == table.checksum
    np.testing.assert_array_equal(table.get("q2"), scores[4:8])
    np.testing.assert_array_equal(table.align(sets), scores)
    # payload bytes: 10 float32 + 5 int64 offsets + 8 id bytes
    assert table.nbytes == 10 * 4 + 5 * 8 + 8


def test_from_scores_wrong_length_raises():
    sets = make_sets()
    with pytest.raises(ScoreTableError, match="one per item"):
        ScoreTable.from_scores(sets, np.zeros(3, np.float32))


def test_non_finite_scores_name_the_set():
    sets = make_sets()
    scores = np.zeros(sets.num_items, np.float32)
    scores[5] = np.nan  # item 5 belongs to set q2 (items 4..7)
    with pytest.raises(ScoreTableError, match="'q2'"):
        ScoreTable.from_scores(sets, scores)


def test_does_not_freeze_caller_arrays(table_and_sets):
    _, sets, scores = table_and_sets
    assert sets.offsets.flags.writeable and scores.flags.writeable


def test_subset_keeps_version_and_order(table_and_sets):
    table, sets, scores = table_and_sets
    sub = table.subset(["q3", "q0"])
    assert sub.set_ids.tolist() == ["q3", "q0"]
    assert sub.version == table.version and sub.checksum != table.checksum
    np.testing.assert_array_equal(sub.scores, np.concatenate([scores[8:10], scores[0:3]]))
    np.testing.assert_array_equal(
        sub.align(sets.subset(["q0", "q3"])), np.r_[scores[0:3], scores[8:10]]
    )
    assert sub.nbytes < table.nbytes


def test_subset_missing_names_the_set(table_and_sets):
    table, _, _ = table_and_sets
    with pytest.raises(ScoreTableError, match="'nope'"):
        table.subset(["q1", "nope"])


def test_align_missing_set_names_it(table_and_sets):
    table, sets, _ = table_and_sets
    local = ExampleSets.concat([sets.subset(["q0"]), make_sets((2,), prefix="other")])
    with pytest.raises(ScoreTableError, match="'other0'.*not in the teacher score table"):
        table.align(local)


def test_align_wrong_length_names_the_set(table_and_sets):
    table, _, _ = table_and_sets
    local = make_sets((3, 2, 4, 2))  # q1 has 2 items locally, 1 in the table
    with pytest.raises(ScoreTableError, match=r"'q1' has 2 items locally but 1 teacher scores"):
        table.align(local)


def test_align_is_in_local_order(table_and_sets):
    table, sets, scores = table_and_sets
    local = sets.subset(["q2", "q1"])
    np.testing.assert_array_equal(table.align(local), np.r_[scores[4:8], scores[3:4]])


def test_version_changes_when_scores_change(table_and_sets):
    table, sets, scores = table_and_sets
    changed = scores.copy()
    changed[0] += 1e-3
    assert ScoreTable.from_scores(sets, changed).version != table.version
    assert ScoreTable.from_scores(sets, scores.copy()).version == table.version
    renamed = make_sets(prefix="r")
    assert ScoreTable.from_scores(renamed, scores).version != table.version
    assert ScoreTable.from_scores(sets, scores, version="teacher-7").version == "teacher-7"


def test_float16(table_and_sets):
    table, sets, scores = table_and_sets
    half = table.to_float16()
    assert half.dtype == np.float16 and half.version == table.version
    assert half.scores.nbytes == table.scores.nbytes // 2
    aligned = half.align(sets)
    assert aligned.dtype == np.float32
    np.testing.assert_allclose(aligned, scores, rtol=1e-3, atol=1e-3)
    assert half.to_float16() is half
    np.testing.assert_array_equal(half.to_float32().scores, half.scores.astype(np.float32))


def test_float16_out_of_range_raises():
    sets = make_sets((2,))
    with pytest.raises(ScoreTableError, match="float16 range"):
        ScoreTable.from_scores(sets, np.array([1e6, 0.0], np.float32)).to_float16()


@pytest.mark.parametrize("half", [False, True])
def test_save_load_round_trip(tmp_path: Path, table_and_sets, half):
    table, sets, _ = table_and_sets
    table = table.to_float16() if half else table
    path = table.save(tmp_path / "sub" / "teacher_scores.npz")
    loaded = ScoreTable.load(path)
    assert loaded.equals(table) and loaded.dtype == table.dtype
    np.testing.assert_array_equal(loaded.align(sets), table.align(sets))
    # plain arrays: readable without pickle
    with np.load(path, allow_pickle=False) as data:
        assert data["scores"].dtype == table.dtype
        assert data["set_ids"].dtype.kind == "U"
    assert [p.name for p in path.parent.iterdir()] == ["teacher_scores.npz"]  # no temp files


def test_empty_table_round_trip(tmp_path: Path, table_and_sets):
    table, _, _ = table_and_sets
    empty = table.subset([])
    assert empty.num_sets == 0 and empty.num_items == 0
    assert ScoreTable.load(empty.save(tmp_path / "e.npz")).equals(empty)


def test_truncated_file_raises_checkpoint_error(tmp_path: Path, table_and_sets):
    table, _, _ = table_and_sets
    path = table.save(tmp_path / "t.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.npz"):
        ScoreTable.load(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="t.npz"):
        ScoreTable.load(path)


def test_missing_file_raises_checkpoint_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="missing.npz"):
        ScoreTable.load(tmp_path / "missing.npz")


def _rewrite(path: Path, **replace: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(replace)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_tampered_scores_fail_checksum(tmp_path: Path, table_and_sets):
    table, _, scores = table_and_sets
    path = table.save(tmp_path / "t.npz")
    tampered = scores.copy()
    tampered[3] = 42.0
    _rewrite(path, scores=tampered)
    with pytest.raises(CheckpointError, match=r"t\.npz does not match its checksum"):
        ScoreTable.load(path)


def test_bad_offsets_in_file_raise_checkpoint_error(tmp_path: Path, table_and_sets):
    table, _, _ = table_and_sets
    path = table.save(tmp_path / "t.npz")
    _rewrite(path, offsets=np.array([0, 3, 4], np.int64))
    with pytest.raises(CheckpointError, match="t.npz"):
        ScoreTable.load(path)


def test_object_arrays_are_refused(tmp_path: Path, table_and_sets):
    table, _, _ = table_and_sets
    path = table.save(tmp_path / "t.npz")
    _rewrite(path, set_ids=np.array(["q0", "q1", "q2", "q3"], dtype=object))
    with pytest.raises(CheckpointError, match="t.npz"):
        ScoreTable.load(path)


def test_duplicate_ids_rejected():
    with pytest.raises(ScoreTableError, match="repeat"):
        ScoreTable(["a", "a"], [0, 1, 2], np.zeros(2, np.float32))


def test_file_is_a_zip_of_npy(tmp_path: Path, table_and_sets):
    table, _, _ = table_and_sets
    path = table.save(tmp_path / "t.npz")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(
            f"{k}.npy" for k in ("format", "set_ids", "offsets", "scores", "version", "checksum")
        )
