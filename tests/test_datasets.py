"""load_dataset for synthetic and LETOR data, and ``fedrank data stats``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedrank import cli
from fedrank.common.datasets import Dataset, load_dataset
from fedrank.common.errors import ConfigError, DataFormatError


def test_synthetic_dataset() -> None:
    ds = load_dataset("synthetic", seed=0)
    assert isinstance(ds, Dataset) and ds.name == "synthetic"
    assert list(ds.splits) == ["train", "vali", "test"]
    assert ds.num_features == 16
    assert ds.student_columns.tolist() == list(range(12))
    assert ds.privileged_columns.tolist() == [12, 13, 14, 15]
    assert ds.train.num_sets == 1500 and ds.vali.num_sets == 250 and ds.test.num_sets == 250
    again, other = load_dataset("synthetic", seed=0), load_dataset("synthetic", seed=1)
    assert ds.fingerprint() == again.fingerprint() != other.fingerprint()
    with pytest.raises(AttributeError):
        ds.name = "x"  # frozen


def test_synthetic_overrides() -> None:
    ds = load_dataset("synthetic:num_sets=80, max_items=12,vali_fraction=0", seed=5)
    assert ds.train.sizes.max() <= 12
    assert sum(s.num_sets for s in ds.splits.values()) == 80
    assert any("vali split off train" in n for n in ds.notes)
    with pytest.raises(ConfigError, match="unknown synthetic option 'bogus'"):
        load_dataset("synthetic:bogus=1")
    with pytest.raises(DataFormatError, match="key=value"):
        load_dataset("synthetic:num_sets")


def test_letor_fold_folder_and_data_root(mq2008_dir: Path) -> None:
    fold = load_dataset(str(mq2008_dir / "Fold2"))
    assert fold.name == "MQ2008/Fold2" and fold.notes == ()
    assert (fold.train.num_items, fold.vali.num_items, fold.test.num_items) == (9404, 2874, 2933)
    assert fold.num_features == 46
    assert fold.student_columns.tolist() == list(range(46)) and fold.privileged_columns.size == 0
    root = load_dataset(str(mq2008_dir))
    assert root.name == "MQ2008/Fold1" and "Fold1" in root.notes[0]
    assert (root.train.num_sets, root.vali.num_sets, root.test.num_sets) == (471, 157, 156)


def test_single_file_gets_seeded_vali_and_test(mq2008_dir: Path) -> None:
    ds = load_dataset(str(mq2008_dir / "S1.txt.gz"), seed=3)
    sizes = [ds.splits[k].num_sets for k in ("train", "vali", "test")]
    assert sum(sizes) == 157 and sizes[1] >= 10 and sizes[2] >= 10
    assert sum(s.num_items for s in ds.splits.values()) == 2933
    ids = [set(s.set_ids) for s in ds.splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [n.split(":")[0] for n in ds.notes] == ["vali split off train", "test split off train"]
    same, other = (
        load_dataset(str(mq2008_dir / "S1.txt.gz"), seed=3),
        load_dataset(str(mq2008_dir / "S1.txt.gz"), seed=4),
    )
    assert np.array_equal(same.test.set_ids, ds.test.set_ids)
    assert not np.array_equal(other.test.set_ids, ds.test.set_ids)


def test_folder_without_vali_test_and_bad_paths(tmp_path: Path) -> None:
    lines = "".join(f"{q % 2} qid:{q} 1:{q / 10} 2:1\n{0} qid:{q} 1:0.5\n" for q in range(30))
    (tmp_path / "train.txt.gz").write_bytes(gzip.compress(lines.encode()))
    ds = load_dataset(str(tmp_path))
    assert [ds.splits[k].num_sets for k in ("train", "vali", "test")] == [24, 3, 3]
    with pytest.raises(DataFormatError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataFormatError, match="expected a LETOR file"):
        load_dataset(str(tmp_path / "other"))
    single = tmp_path / "one.txt"
    single.write_text("1 qid:1 1:1\n")
    with pytest.raises(DataFormatError, match="cannot split"):
        load_dataset(str(single))


# ---- fedrank data stats ----------------------------------------------------------------------
def test_stats_fold_folder(mq2008_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "stats", str(mq2008_dir / "Fold1")]) == 0
    out = capsys.readouterr().out
    assert "train: 471 sets, 9630 items, 46 features" in out
    assert "vali: 157 sets, 2707 items, 46 features" in out
    assert "test: 156 sets, 2874 items, 46 features" in out
    assert "all: 784 sets, 15211 items, 46 features" in out
    assert "labels: 0: 12279  1: 2001  2: 931" in out
    assert "min 5" in out and "mean 19.4" in out and "max 121" in out
    assert "sets with no relevant item: 220 (28.1%)" in out


def test_stats_file_json_and_synthetic(
    mq2008_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["data", "stats", str(mq2008_dir / "S3.txt.gz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s3 = report["parts"]["S3.txt.gz"]
    assert (s3["sets"], s3["items"], s3["features"]) == (157, 3062, 46)
    assert s3["labels"] == {"0": 2424, "1": 411, "2": 227}
    assert s3["set_size"]["min"] <= s3["set_size"]["p50"] <= s3["set_size"]["max"]
    assert cli.main(["data", "stats", "synthetic:num_sets=200"]) == 0
    out = capsys.readouterr().out
    assert "train: 150 sets" in out and "privileged (teacher-only) columns: [12, 13, 14, 15]" in out


def test_stats_missing_path_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["data", "stats", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and err.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("1 qid:1 1:1\n0 1:2\n")
    assert cli.main(["data", "stats", str(bad)]) == 2
    assert "bad.txt, line 2:" in capsys.readouterr().err
