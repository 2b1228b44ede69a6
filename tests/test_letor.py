"""LETOR / SVMlight reader: real MQ2008 statistics, malformed input, gzip, cache."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedrank.common import letor
from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import read_letor, read_letor_folder, read_letor_slow

# verified statistics from ../shared/data/MQ2008/SOURCE.txt: lines, queries, label histogram
PARTS = {
    "S1": (2933, 157, {0: 2316, 1: 427, 2: 190}),
    "S2": (3635, 157, {0: 3080, 1: 385, 2: 170}),
    "S3": (3062, 157, {0: 2424, 1: 411, 2: 227}),
    "S4": (2707, 157, {0: 2140, 1: 400, 2: 167}),
    "S5": (2874, 156, {0: 2319, 1: 378, 2: 177}),
}
FOLD1 = {"train": (9630, 471), "vali": (2707, 157), "test": (2874, 156)}


def histogram(sets: ExampleSets) -> dict[int, int]:
    values, counts = np.unique(sets.labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def assert_same(a: ExampleSets, b: ExampleSets) -> None:
    assert np.array_equal(a.features, b.features)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.set_ids, b.set_ids)
    if a.item_ids is None or b.item_ids is None:
        assert a.item_ids is None and b.item_ids is None
    else:
        assert np.array_equal(a.item_ids, b.item_ids)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


# ---- real data -------------------------------------------------------------------------------
def test_mq2008_parts_match_published_statistics(mq2008_dir: Path) -> None:
    parts = {}
    for name, (lines, queries, labels) in PARTS.items():
        sets = read_letor(mq2008_dir / f"{name}.txt.gz", cache=False)
        assert (sets.num_items, sets.num_sets, sets.num_features) == (lines, queries, 46), name
        assert histogram(sets) == labels, name
        assert sets.item_ids is not None and sets.item_ids[0].startswith("GX")
        parts[name] = sets
    everything = ExampleSets.concat(list(parts.values()))  # raises if a qid is in two parts
    assert (everything.num_items, everything.num_sets) == (15211, 784)
    assert histogram(everything) == {0: 12279, 1: 2001, 2: 931}
    sizes = everything.sizes
    assert (sizes.min(), sizes.max(), round(float(sizes.mean()), 1)) == (5, 121, 19.4)
    no_relevant = np.add.reduceat((everything.labels > 0).astype(int), everything.offsets[:-1]) == 0
    assert int(no_relevant.sum()) == 220
    assert everything.set_ids[0] == "10002"
    pairs = np.char.add(np.repeat(everything.set_ids, sizes), everything.item_ids)
    assert np.unique(pairs).size == pairs.size  # no duplicate (qid, docid)
    assert everything.features.min() >= 0 and everything.features.max() <= 1  # QueryLevelNorm


def test_mq2008_fold_folder(mq2008_dir: Path) -> None:
    fold = read_letor_folder(mq2008_dir / "Fold1")
    assert list(fold) == ["train", "vali", "test"]
    for name, (lines, queries) in FOLD1.items():
        assert (fold[name].num_items, fold[name].num_sets) == (lines, queries), name
    # train is S1 + S2 + S3 byte for byte
    s123 = ExampleSets.concat([read_letor(mq2008_dir / f"S{i}.txt.gz") for i in (1, 2, 3)])
    assert_same(fold["train"], s123)
    assert_same(fold["test"], read_letor(mq2008_dir / "S5.txt.gz"))


def test_fast_path_equals_line_parser_on_real_file(mq2008_dir: Path) -> None:
    path = mq2008_dir / "S4.txt.gz"
    assert_same(read_letor(path, cache=False), read_letor_slow(path))


def test_first_lines_equal_an_independent_reference_parse(mq2008_dir: Path, tmp_path: Path) -> None:
    text = gzip.decompress((mq2008_dir / "S1.txt.gz").read_bytes()).decode()
    lines = text.splitlines()[:25]
    sets = read_letor(write(tmp_path / "head.txt", "\n".join(lines) + "\n"), cache=False)
    assert sets.num_items == 25
    for row, line in enumerate(lines):
        body, _, comment = line.partition("#")
        label, qid, *pairs = body.split()
        expected = np.zeros(46, dtype=np.float32)
        for pair in pairs:
            i, v = pair.split(":")
            expected[int(i) - 1] = np.float32(float(v))
        assert sets.labels[row] == float(label)
        assert np.array_equal(sets.features[row], expected)
        set_pos = np.searchsorted(sets.offsets, row, side="right") - 1
        assert sets.set_ids[set_pos] == qid.removeprefix("qid:")
        assert sets.item_ids[row] == comment.split("=")[1].split()[0]


# ---- format details --------------------------------------------------------------------------
def test_sparse_dense_signs_exponents_comments_and_crlf(tmp_path: Path) -> None:
    text = (
        "# header comment\n"
        "2 qid:a 1:0.5 3:-1.25 # docid = d1 extra\r\n"
        "\n"
        "0 qid:a 2:1e-3 3:+7 4:12345678901234567890 #docid=d2\n"
        "1.5 qid:b\n"  # no features at all
        "0 qid:b 1:.5 2:-0. 4:3.0E2 #docid = d4\n"
    )
    sets = read_letor(write(tmp_path / "mixed.txt", text), cache=False)
    expected = np.array(
        [
            [0.5, 0, -1.25, 0],
            [0, 1e-3, 7, 12345678901234567890],
            [0, 0, 0, 0],
            [0.5, -0.0, 0, 300],
        ],
        dtype=np.float32,
    )
    assert np.array_equal(sets.features, expected)
    assert sets.labels.tolist() == [2, 0, 1.5, 0]
    assert sets.set_ids.tolist() == ["a", "b"]
    assert sets.sizes.tolist() == [2, 2]
    assert sets.item_ids is None  # one line has no docid
    assert_same(sets, read_letor_slow(tmp_path / "mixed.txt"))
    wide = read_letor(tmp_path / "mixed.txt", num_features=6, cache=False)
    assert wide.num_features == 6 and np.array_equal(wide.features[:, :4], expected)
    assert not wide.features[:, 4:].any()


def test_many_values_match_python_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(size=300) * 10.0 ** rng.integers(-8, 8, 300), rng.integers(-99, 99, 100)]
    )
    formats = ["{:.6f}", "{:.15g}", "{:.3e}", "{}", "{:.10f}"]
    tokens = [formats[i % len(formats)].format(v) for i, v in enumerate(values)]
    lines = [
        f"0 qid:{i // 10} " + " ".join(f"{j + 1}:{t}" for j, t in enumerate(tokens[i : i + 8]))
        for i in range(0, len(tokens), 8)
    ]
    path = write(tmp_path / "values.txt", "\n".join(lines))
    sets = read_letor(path, cache=False)
    flat = [np.float32(float(t)) for t in tokens]
    got = [sets.features[k // 8, k % 8] for k in range(len(tokens))]
    assert np.array_equal(np.array(got), np.array(flat))
    assert_same(sets, read_letor_slow(path))


def test_gzip_and_plain_are_identical(mq2008_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "S5.txt"
    plain.write_bytes(gzip.decompress((mq2008_dir / "S5.txt.gz").read_bytes()))
    assert_same(read_letor(plain, cache=False), read_letor(mq2008_dir / "S5.txt.gz", cache=False))


def test_folder_with_mixed_extensions_and_missing_train(tmp_path: Path) -> None:
    write(tmp_path / "train.txt", "1 qid:1 1:1\n0 qid:1 2:1\n")
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(b"1 qid:9 1:1 3:2\n"))
    parts = read_letor_folder(tmp_path, cache=False)
    assert list(parts) == ["train", "test"]
    assert parts["train"].num_features == parts["test"].num_features == 3  # widened
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="train.txt"):
        read_letor_folder(empty)
    with pytest.raises(DataFormatError, match="no such data"):
        read_letor(tmp_path / "missing.txt")


# ---- malformed input -------------------------------------------------------------------------
GOOD = "1 qid:7 1:0.5 2:0.25\n0 qid:7 1:0.1 2:0.2\n"
MALFORMED = [
    # (file text, line number of the error, words the message must contain)
    (GOOD + "0 qid:8 1:0.5 2-0.3\n", 3, "'<index>:<value>'"),
    (GOOD + "0 qid:8 1:0.5 2:0.3:4\n", 3, "'<index>:<value>'"),
    (GOOD + "0 1:0.5 2:0.3\n", 3, "qid"),
    (GOOD + "0\n", 3, "qid"),
    (GOOD + "0 qid: 1:0.5\n", 3, "qid"),
    ("1 qid:7 1:0.5 2:abc\n" + GOOD, 1, "numeric value"),
    (GOOD + "0 qid:8 1:nan\n", 3, "finite numeric value"),
    (GOOD + "x qid:8 1:1\n", 3, "numeric label"),
    (GOOD + "1_0 qid:8 1:1\n", 3, "numeric label"),
    (GOOD + "0 qid:8 1:1_0\n", 3, "numeric value"),
    (GOOD + "0 qid:8 x:1\n", 3, "integer feature index"),
    (GOOD + "0 qid:8 0:1\n", 3, "start at 1"),
    (GOOD + "0 qid:8 2:1 1:1\n", 3, "increase"),
    (GOOD + "0 qid:8 1:1 1:2\n", 3, "increase"),
    (GOOD + "0 qid:8 1:1 :2\n", 3, "'<index>:<value>'"),
    (GOOD + "0 qid:8 1:1\n\n1 qid:7 1:1\n", 5, "split across"),
]


@pytest.mark.parametrize(("text", "line", "words"), MALFORMED)
def test_malformed_input_names_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataFormatError) as err:
        read_letor(path, cache=False)
    message = str(err.value)
    assert str(path) in message and f"line {line}:" in message and words in message, message


def test_feature_index_past_declared_count(tmp_path: Path) -> None:
    path = write(tmp_path / "wide.txt", GOOD + "0 qid:8 1:1 47:0.5\n")
    assert read_letor(path, cache=False).num_features == 47
    with pytest.raises(DataFormatError, match=r"wide\.txt, line 3: feature index 47 is past .* 46"):
        read_letor(path, num_features=46, cache=False)


def test_split_set_message_names_first_occurrence(tmp_path: Path) -> None:
    path = write(tmp_path / "split.txt", GOOD + "0 qid:8 1:1\n1 qid:7 1:1\n")
    with pytest.raises(DataFormatError, match=r"line 4: items of set qid:7 .*first seen on line 1"):
        read_letor(path, cache=False)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "empty.txt", text)
    with pytest.raises(DataFormatError, match=r"empty\.txt: empty file"):
        read_letor(path, cache=False)


def test_malformed_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(gzip.compress(GOOD.encode())[:-12])  # truncated
    with pytest.raises(DataFormatError, match=r"bad\.txt\.gz: not a readable gzip"):
        read_letor(path, cache=False)
    path.write_bytes(gzip.compress((GOOD + "0 qid:8 1:x\n").encode()))
    with pytest.raises(DataFormatError, match=r"bad\.txt\.gz, line 3"):
        read_letor(path, cache=False)


# ---- hostile sizes, encodings and values ----------------------------------------------------
def test_huge_feature_index_is_refused_before_allocating(tmp_path: Path, capsys) -> None:
    """A 37-byte file whose feature index 10^9 would make a 7.45 GiB dense matrix."""
    import tracemalloc

    from fedrank.cli import main as fedrank

    path = write(tmp_path / "tiny.txt", "1 qid:1 1:0.5\n0 qid:1 1000000000:1.5\n")
    assert path.stat().st_size == 37
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError) as err:
            read_letor(path, cache=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    message = str(err.value)
    assert f"{path}, line 2: feature index 1000000000" in message
    assert "7.45 GiB" in message and "4.00 GiB" in message and "FEDRANK_MAX_DATA_BYTES" in message
    with pytest.raises(DataFormatError, match=r"line 2: feature index 1000000000"):
        read_letor_slow(path)
    assert fedrank(["data", "stats", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_data_limit_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path / "ok.txt", GOOD)
    monkeypatch.setenv("FEDRANK_MAX_DATA_BYTES", "8")  # 2 items x 2 features x 4 bytes = 16
    with pytest.raises(DataFormatError, match=r"ok\.txt, line 1: feature index 2 makes .* 2 items"):
        read_letor(path, cache=False)
    monkeypatch.setenv("FEDRANK_MAX_DATA_BYTES", "16")
    assert read_letor(path, cache=False).num_items == 2
    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"0 qid:1 1:0\n" * 100_000))  # 1.2 MB from ~2 kB
    monkeypatch.setenv("FEDRANK_MAX_DATA_BYTES", "1e6")
    with pytest.raises(DataFormatError, match=r"bomb\.txt\.gz: decompresses to more than"):
        read_letor(bomb, cache=False)
    monkeypatch.setenv("FEDRANK_MAX_DATA_BYTES", "lots")
    with pytest.raises(DataFormatError, match="FEDRANK_MAX_DATA_BYTES must be a number"):
        read_letor(path, cache=False)


def test_running_out_of_memory_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """With the limit lifted, an 80 TB matrix fails in numpy: reported naming the file."""
    monkeypatch.setenv("FEDRANK_MAX_DATA_BYTES", "1e18")
    path = write(tmp_path / "huge.txt", "1 qid:1 10000000000000:1\n0 qid:1 1:1\n")
    with pytest.raises(DataFormatError, match=r"huge\.txt: not enough memory to read it"):
        read_letor(path, cache=False)


def test_set_ids_must_be_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"1 qid:caf\xe9 1:1\n0 qid:caf\xe9 2:1\n")
    with pytest.raises(
        DataFormatError, match=r"latin1\.txt, line 1: the set id .* not valid UTF-8"
    ):
        read_letor(bad, cache=False)
    good = tmp_path / "utf8.txt"
    good.write_bytes("1 qid:café 1:1\n0 qid:café 2:1\n1 qid:b 1:1\n".encode())
    fast, slow = read_letor(good, cache=False), read_letor_slow(good)
    assert fast.set_ids.tolist() == ["café", "b"]
    assert_same(fast, slow)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("1e39 qid:1 1:1\n", "label '1e39'"),
        ("1 qid:1 1:1 2:-1e39\n", "value '2:-1e39'"),
        ("1 qid:1 1:1 2:340282350000000000000000000000000000001.5\n", "value '2:3402823"),
    ],
)
def test_values_past_float32_are_refused(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path / "big.txt", "0 qid:1 1:0\n" + text)
    with pytest.raises(DataFormatError) as err:
        read_letor(path, cache=False)
    message = str(err.value)
    assert f"{path}, line 2: {what}" in message and "float32 range" in message
    edge = write(tmp_path / "edge.txt", "3.4e38 qid:1 1:-3.4e38\n")
    sets = read_letor(edge, cache=False)
    assert np.isfinite(sets.labels).all() and np.isfinite(sets.features).all()


# ---- cache -----------------------------------------------------------------------------------
def test_cache_hit_is_identical_and_skips_parsing(mq2008_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "S2.txt.gz"
    src.write_bytes((mq2008_dir / "S2.txt.gz").read_bytes())
    first = read_letor(src)
    cache_file = src.with_name(src.name + letor.CACHE_SUFFIX)
    assert cache_file.is_file()  # writable folder: the cache sits beside the file
    parses = letor.STATS["parses"]
    second = read_letor(src)
    assert letor.STATS["parses"] == parses  # no re-parse
    assert_same(first, second)
    assert second.features.dtype == np.float32 and second.offsets.dtype == np.int64
    # same content with a new mtime (a copy) is still a hit; the key is the content hash
    os.utime(src, ns=(10**18, 10**18))
    assert_same(read_letor(src), first)
    assert letor.STATS["parses"] == parses


def test_changed_source_and_corrupt_cache_are_reparsed(tmp_path: Path) -> None:
    src = write(tmp_path / "small.txt", GOOD)
    read_letor(src)
    cache_file = src.with_name(src.name + letor.CACHE_SUFFIX)
    write(src, GOOD + "2 qid:9 1:1\n")
    parses = letor.STATS["parses"]
    assert read_letor(src).num_sets == 2
    assert letor.STATS["parses"] == parses + 1
    for garbage in (b"not a zip file", cache_file.read_bytes()[:100]):
        cache_file.write_bytes(garbage)
        assert read_letor(src).num_sets == 2  # silently re-parsed
        assert letor.STATS["parses"] == parses + 2
        parses += 1
        with np.load(cache_file, allow_pickle=False) as z:  # and overwritten with a good one
            assert z["features"].shape == (3, 2)
    # a different declared feature count is a different result: not served from the cache
    assert read_letor(src, num_features=5).num_features == 5


def test_read_only_folder_falls_back_to_user_cache(tmp_path: Path, monkeypatch) -> None:
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("FEDRANK_CACHE_DIR", str(user_cache))
    folder = tmp_path / "readonly"
    folder.mkdir()
    src = write(folder / "data.txt", GOOD)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        read_letor(src)
        assert not any(p.name.endswith(letor.CACHE_SUFFIX) for p in folder.iterdir())
        cached = list((user_cache / "letor").glob(f"*{letor.CACHE_SUFFIX}"))
        assert len(cached) == 1 and letor.cache_path_for(src) == cached[0]
        parses = letor.STATS["parses"]
        read_letor(src)
        assert letor.STATS["parses"] == parses
    finally:
        folder.chmod(stat.S_IRWXU)


def test_shared_data_gets_no_cache_files(mq2008_dir: Path) -> None:
    read_letor(mq2008_dir / "S3.txt.gz")
    assert not list(mq2008_dir.rglob(f"*{letor.CACHE_SUFFIX}"))
