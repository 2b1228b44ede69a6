"""Score table folders: streamed building, memory-mapped serving, same hashes as in memory,
atomic replacement and refusal of damaged folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedrank.common.errors import CheckpointError, ScoreTableError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.records import score_table_from_record, score_table_to_record
from fedrank.common.score_table import META_FILE, ScoreTable, ScoreTableWriter
from fedrank.server.teacher_scoring import score_to_table


def random_table(num_sets: int = 300, seed: int = 0) -> ScoreTable:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 25, size=num_sets)  # empty sets included
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = [f"set-{i}-é" if i % 7 == 0 else f"q{i}" for i in rng.permutation(num_sets)]
    return ScoreTable(ids, offsets, rng.normal(size=int(offsets[-1])).astype(np.float32))


def sets_for(table: ScoreTable, ids: list[str]) -> ExampleSets:
    sizes = [len(table.get(s)) for s in ids]
    n = sum(sizes)
    return ExampleSets(
        features=np.zeros((n, 2), np.float32),
        labels=np.zeros(n, np.float32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=ids,
    )


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_folder_round_trip_keeps_hashes_and_serves_subsets(tmp_path: Path):
    table = random_table()
    path = table.save(tmp_path / "table")
    opened = ScoreTable.load(path)
    assert opened.path == path and isinstance(opened.scores, np.memmap)
    assert opened.version == table.version and opened.checksum == table.checksum
    assert opened.equals(table) and opened.nbytes == table.nbytes
    np.testing.assert_array_equal(opened.set_ids, table.set_ids)
    np.testing.assert_array_equal(opened.offsets, table.offsets)
    np.testing.assert_array_equal(np.asarray(opened.scores), table.scores)
    wanted = [s for s in table.set_ids.tolist() if len(table.get(s))][10:60:3][::-1]
    sub = opened.subset(wanted)
    assert sub.path is None and sub.equals(table.subset(wanted))
    assert sub.version == table.version and sub.set_ids.tolist() == wanted
    local = sets_for(table, wanted)
    np.testing.assert_array_equal(opened.align(local), table.align(local))
    assert wanted[0] in opened and "not-there" not in opened
    np.testing.assert_array_equal(opened.get(wanted[1]), table.get(wanted[1]))
    with pytest.raises(ScoreTableError, match="'not-there' is not in the teacher score table"):
        opened.subset([wanted[0], "not-there"])
    assert no_temp_files(tmp_path)


def test_float16_view_of_a_folder_matches_an_in_memory_float16_table(tmp_path: Path):
    table = random_table(seed=1)
    opened = ScoreTable.load(table.save(tmp_path / "t"))
    half, expected = opened.to_float16(), table.to_float16()
    assert half.dtype == np.float16 and half.checksum == expected.checksum
    assert half.version == table.version
    ids = table.set_ids[:40].tolist()
    assert half.subset(ids).equals(expected.subset(ids))
    np.testing.assert_array_equal(half.scores, expected.scores)
    assert half.to_float32().equals(table)
    # a float16 table saved as a folder reads back as float16
    assert ScoreTable.load(half.save(tmp_path / "h")).equals(expected)


def test_writer_streams_chunks_into_the_same_table(tmp_path: Path):
    table = random_table(seed=2)
    with ScoreTableWriter(tmp_path / "w") as writer:
        for a, b in [(0, 1), (1, 120), (120, 121), (121, table.num_sets)]:
            lo, hi = int(table.offsets[a]), int(table.offsets[b])
            writer.add(table.set_ids[a:b], table.sizes[a:b], table.scores[lo:hi])
    assert writer.table is not None and writer.table.equals(table)
    # a given version stamps the table; the checksum stays the content hash
    with ScoreTableWriter(tmp_path / "v", version="teacher-7") as writer:
        writer.add(table.set_ids, table.sizes, table.scores)
    assert writer.table.version == "teacher-7" and writer.table.checksum == table.checksum
    # records carry a folder table like any other
    back = score_table_from_record(score_table_to_record(writer.table))
    assert back.equals(writer.table)


def test_empty_table_folder(tmp_path: Path):
    empty = ScoreTable([], [0], np.zeros(0, np.float32))
    opened = ScoreTable.load(empty.save(tmp_path / "e"))
    assert opened.num_sets == 0 and opened.equals(empty) and "x" not in opened


def test_writer_refuses_bad_chunks_and_leaves_nothing(tmp_path: Path):
    target = tmp_path / "w"
    cases = [
        (["a", "b"], [1, 1], [0.0, np.nan], "non-finite teacher score in set 'b'"),
        (["a", "b"], [1], [0.0], "2 set ids need as many sizes"),
        (["a"], [2], [0.0], "2 items in all came with 1 scores"),
        (["a", "a"], [1, 1], [0.0, 1.0], "set ids repeat"),
        ([""], [1], [0.0], "must not be empty"),
    ]
    for ids, sizes, scores, message in cases:
        with pytest.raises(ScoreTableError, match=message), ScoreTableWriter(target) as writer:
            writer.add(ids, sizes, np.asarray(scores, np.float32))
        assert not target.exists() and no_temp_files(tmp_path)


def test_replacing_a_table_folder_is_atomic_and_an_error_keeps_the_old_one(tmp_path: Path):
    first, second = random_table(seed=3), random_table(seed=4)
    path = first.save(tmp_path / "t")
    second.save(path)
    assert ScoreTable.load(path).equals(second) and no_temp_files(tmp_path)
    with pytest.raises(RuntimeError), ScoreTableWriter(path) as writer:
        writer.add(first.set_ids, first.sizes, first.scores)
        raise RuntimeError("interrupted")
    assert ScoreTable.load(path).equals(second) and no_temp_files(tmp_path)


def test_writer_never_replaces_other_things(tmp_path: Path):
    table = random_table(num_sets=5)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ScoreTableError, match="is not a score table folder"):
        table.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    real = table.save(tmp_path / "real")
    os.symlink(real, tmp_path / "link")
    with pytest.raises(ScoreTableError, match="symbolic link"):
        table.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and ScoreTable.load(real).equals(table)


def _damage(path: Path, name: str, how: str) -> None:
    file = path / name
    data = bytearray(file.read_bytes())
    if how == "flip":
        data[-3] ^= 0x40
        file.write_bytes(bytes(data))
    elif how == "truncate":
        file.write_bytes(bytes(data[: len(data) - 5]))
    elif how == "delete":
        file.unlink()


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        ("scores.npy", "flip", "does not match its checksum"),
        ("offsets.npy", "flip", "offsets|checksum"),
        ("set_ids.npy", "flip", "checksum|index"),
        ("index_ids.npy", "flip", "index is corrupt"),
        ("index_pos.npy", "flip", "index is corrupt"),
        ("scores.npy", "truncate", "scores.npy is missing, corrupt or truncated"),
        ("index_pos.npy", "delete", "index_pos.npy is missing"),
        (META_FILE, "delete", "has no meta.json"),
        (META_FILE, "flip", "meta.json"),
    ],
)
def test_damaged_folders_are_refused(tmp_path: Path, name: str, how: str, message: str):
    path = random_table(seed=5).save(tmp_path / "t")
    _damage(path, name, how)
    with pytest.raises(CheckpointError, match=message):
        ScoreTable.load(path)


def test_meta_that_disagrees_with_the_files_is_refused(tmp_path: Path):
    path = random_table(seed=6).save(tmp_path / "t")
    meta = json.loads((path / META_FILE).read_text())
    for change, message in [
        ({"num_items": meta["num_items"] + 1}, "expected"),
        ({"dtype": "float16"}, "float16"),
        ({"format": "other"}, "has format 'other'"),
        ({"version": 3}, "'version' is missing or malformed"),
    ]:
        (path / META_FILE).write_text(json.dumps({**meta, **change}))
        with pytest.raises(CheckpointError, match=message):
            ScoreTable.load(path)


def test_teachers_score_the_data_in_chunks_of_whole_sets(tmp_path: Path):
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 12, size=200)
    n = int(sizes.sum())
    sets = ExampleSets(
        features=rng.normal(size=(n, 3)).astype(np.float32),
        labels=np.zeros(n, np.float32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"s{i}" for i in range(200)],
    )
    seen: list[int] = []

    def scorer(part: ExampleSets) -> np.ndarray:
        seen.append(part.num_sets)
        return part.features @ np.array([1.0, -2.0, 0.5], np.float32)

    expected = ScoreTable.from_scores(sets, sets.features @ np.array([1.0, -2.0, 0.5], np.float32))
    streamed = score_to_table(sets, scorer, tmp_path / "t", chunk_items=50)
    assert len(seen) > 10 and sum(seen) == 200  # chunks of whole sets, each set once
    assert streamed.path == tmp_path / "t" and streamed.equals(expected)
    assert score_to_table(sets, scorer, chunk_items=64).equals(expected)  # in memory
    with pytest.raises(ScoreTableError, match="returned 3 scores for"):
        score_to_table(sets, lambda part: np.zeros(3, np.float32), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize("on_disk", [False, True])
def test_lookup_of_ids_longer_or_shorter_than_every_id(tmp_path: Path, on_disk: bool):
    table = ScoreTable(["abc", "abcdef"], [0, 1, 3], np.array([1.0, 2.0, 3.0], np.float32))
    if on_disk:
        table = ScoreTable.load(table.save(tmp_path / "t"))
    assert "abc" in table and "abcdef" in table
    for absent in ("abcdefg", "abcdefgh-much-longer", "ab", ""):
        assert absent not in table
    with pytest.raises(ScoreTableError, match="'abcdefg' is not in the teacher score table"):
        table.subset(["abc", "abcdefg"])
    assert table.subset(["abcdef", "abc"]).set_ids.tolist() == ["abcdef", "abc"]


def test_the_content_hash_keeps_its_definition(tmp_path: Path):
    """The version of a table stays what it was (cached tables and clients keep their
    versions): SHA-256 over the format, dtype, each id (8-byte length, utf-8 bytes), the
    offsets and the scores; more ids than one hashing chunk."""
    rng = np.random.default_rng(9)
    n = 70_000
    sizes = rng.integers(0, 3, size=n)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids = [f"é{i}" if i % 3 else f"q{i}" for i in range(n)]
    scores = rng.normal(size=int(offsets[-1])).astype(np.float32)
    digest = hashlib.sha256(b"fedrank-score-table-v1float32")
    for set_id in ids:
        digest.update(len(set_id.encode()).to_bytes(8, "little") + set_id.encode())
    digest.update(offsets.astype("<i8").tobytes() + scores.astype("<f4").tobytes())
    table = ScoreTable(ids, offsets, scores)
    assert table.version == digest.hexdigest()[:16]
    assert ScoreTable.load(table.save(tmp_path / "t")).version == table.version
